#!/usr/bin/env python3
"""Summarise a libiscsi `iscsi-test-cu` verbose log: per-suite pass/skip/fail counts and
the list of failed tests.

Usage:
    parse-cu.py LOG [--list LISTFILE] [--allow-fail FILE] [--json OUT] [--quiet]

LOG is the stdout+stderr of `iscsi-test-cu` in its default verbose mode (-v), e.g. as
written by scripts/conformance.sh. The format (CUnit 2.1 verbose + libiscsi logging):

    Suite: Inquiry
      Test: Standard ...passed
      Test: BlockLimits ...    [SKIPPED] Logical unit is fully provisioned. Skipping test
    passed
      Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful but should have failed ...
    FAILED
        1. test_get_lba_status_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)

CUnit's verdict is the word `passed`/`FAILED` right after "..." or at the start of a line;
libiscsi's own messages are indented, and a "[FAILED]" message may even be printed after
the verdict by the next test's setup, so only the verdict counts. A test that prints
"[SKIPPED]" before its verdict still says "passed": it is counted as a skip. A test that
started but has no verdict (target hang, crash, timeout) is counted as failed ("no verdict").

The log only names suites, not families (ALL, SCSI, iSCSI, LINUX); iscsi-test-cu runs them
in the order of `iscsi-test-cu -l`, so with --list (that listing saved to a file) every
suite is named FAMILY.Suite. Without it, suites are named by their bare name and a repeated
suite name gets a "#2", "#3" suffix.

--allow-fail FILE: one test name per line (FAMILY.Suite.Test or Suite.Test, '#' comments);
failures listed there are reported but do not make the exit status non-zero.

Exit status: 0 no (unexpected) failures, 1 some test failed, 2 log unusable (no tests).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import OrderedDict

SUITE_RE = re.compile(r"^Suite: (\S+)\s*$")
TEST_RE = re.compile(r"^  Test: (.+?) \.\.\.(.*)$")
VERDICT_RE = re.compile(r"^(passed|FAILED)(.*)$")
ASSERT_RE = re.compile(r"^\s+\d+\. (\S+:\d+)\s+- (.*)$")
SUMMARY_TESTS_RE = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")


def load_suite_order(path: str) -> list[str]:
    """FAMILY.Suite entries from `iscsi-test-cu -l`, in run order."""
    order = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.strip().split(".")
            if len(parts) == 2 and all(parts):
                order.append(line.strip())
    return order


class Parser:
    def __init__(self, suite_order: list[str] | None):
        self.suite_order = suite_order or []
        self.order_pos = 0
        self.seen_bare: dict[str, int] = {}
        self.suites: "OrderedDict[str, list[dict]]" = OrderedDict()
        self.cur_suite: str | None = None
        self.cur_test: dict | None = None  # test waiting for its verdict
        self.last_test: dict | None = None  # test whose verdict we saw (for assert lines)
        self.summary_tests: tuple[int, ...] | None = None

    def suite_name(self, bare: str) -> str:
        # Advance through the -l listing to the next FAMILY.<bare>.
        for i in range(self.order_pos, len(self.suite_order)):
            if self.suite_order[i].split(".", 1)[1] == bare:
                self.order_pos = i + 1
                return self.suite_order[i]
        n = self.seen_bare.get(bare, 0) + 1
        self.seen_bare[bare] = n
        return bare if n == 1 else f"{bare}#{n}"

    def finish_without_verdict(self) -> None:
        if self.cur_test is not None:
            self.cur_test["result"] = "fail"
            self.cur_test["reason"].insert(0, "no verdict (target hang, crash or timeout?)")
            self.cur_test = None

    def verdict(self, word: str) -> None:
        t = self.cur_test
        assert t is not None
        if word == "FAILED":
            t["result"] = "fail"
        else:
            t["result"] = "skip" if t["skipped"] else "pass"
        self.last_test, self.cur_test = t, None

    def output(self, text: str) -> None:
        """libiscsi output between "..." and the verdict belongs to the current test."""
        t = self.cur_test
        text = text.strip()
        if t is None or not text:
            return
        if "[SKIPPED]" in text:
            t["skipped"] = True
            if not t["skip_reason"]:
                t["skip_reason"] = text.split("[SKIPPED]", 1)[1].strip()
        if "[FAILED]" in text:
            t["reason"].append(text.split("[FAILED]", 1)[1].strip())

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        m = SUITE_RE.match(line)
        if m:
            self.finish_without_verdict()
            self.cur_suite = self.suite_name(m.group(1))
            self.suites.setdefault(self.cur_suite, [])
            self.last_test = None
            return
        m = TEST_RE.match(line)
        if m and self.cur_suite is not None:
            self.finish_without_verdict()
            t = {
                "suite": self.cur_suite,
                "test": m.group(1),
                "result": None,
                "skipped": False,
                "skip_reason": "",
                "reason": [],
                "asserts": [],
            }
            self.suites[self.cur_suite].append(t)
            self.cur_test = t
            rest = m.group(2)
            v = VERDICT_RE.match(rest)
            if v:
                self.verdict(v.group(1))
            else:
                self.output(rest)
            return
        if self.cur_test is not None:
            v = VERDICT_RE.match(line)
            if v:
                self.verdict(v.group(1))
            else:
                self.output(line)
            return
        m = SUMMARY_TESTS_RE.match(line)
        if m:
            self.summary_tests = tuple(int(x) for x in m.groups())
            return
        m = ASSERT_RE.match(line)
        if m and self.last_test is not None and self.last_test["result"] == "fail":
            self.last_test["asserts"].append(f"{m.group(1)} {m.group(2)}")

    def close(self) -> None:
        self.finish_without_verdict()


def full_name(t: dict) -> str:
    return f"{t['suite']}.{t['test']}"


def load_allow(path: str | None) -> set[str]:
    if not path:
        return set()
    allow = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                allow.add(line)
    return allow


def allowed(name: str, allow: set[str]) -> bool:
    if name in allow:
        return True
    # FAMILY.Suite.Test also matches an entry written as Suite.Test
    parts = name.split(".")
    return len(parts) >= 3 and ".".join(parts[1:]) in allow


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--list", help="output of `iscsi-test-cu -l`, to name families")
    ap.add_argument("--allow-fail", help="file of test names whose failure is expected")
    ap.add_argument("--json", help="also write the parsed results as JSON to this file")
    ap.add_argument("--quiet", action="store_true", help="only the totals and failures")
    args = ap.parse_args()

    p = Parser(load_suite_order(args.list) if args.list else None)
    with open(args.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            p.feed(line)
    p.close()

    tests = [t for ts in p.suites.values() for t in ts]
    if not tests:
        print(f"parse-cu: no tests found in {args.log}", file=sys.stderr)
        return 2
    allow = load_allow(args.allow_fail)

    width = max([len("suite"), len("TOTAL")] + [len(s) for s in p.suites]) + 2
    header = f"{'suite':<{width}}{'pass':>6}{'skip':>6}{'fail':>6}{'total':>7}"
    tot = {"pass": 0, "skip": 0, "fail": 0}
    rows = []
    for suite, ts in p.suites.items():
        c = {"pass": 0, "skip": 0, "fail": 0}
        for t in ts:
            c[t["result"]] += 1
        for k in tot:
            tot[k] += c[k]
        rows.append(f"{suite:<{width}}{c['pass']:>6}{c['skip']:>6}{c['fail']:>6}{len(ts):>7}")
    if not args.quiet:
        print(header)
        print("\n".join(rows))
    print(f"{'TOTAL':<{width}}{tot['pass']:>6}{tot['skip']:>6}{tot['fail']:>6}{len(tests):>7}")
    distinct = {}
    for t in tests:  # a test run in several families counts once (worst result wins)
        key = (t["suite"].split(".", 1)[-1].split("#", 1)[0], t["test"])
        rank = {"pass": 0, "skip": 1, "fail": 2}
        if key not in distinct or rank[t["result"]] > rank[distinct[key]]:
            distinct[key] = t["result"]
    if len(distinct) != len(tests):
        d = {k: sum(1 for r in distinct.values() if r == k) for k in ("pass", "skip", "fail")}
        print(f"{'DISTINCT':<{width}}{d['pass']:>6}{d['skip']:>6}{d['fail']:>6}{len(distinct):>7}")

    if p.summary_tests is not None:
        _total, ran, passed, failed, _inactive = p.summary_tests
        if ran != len(tests) or failed != tot["fail"]:
            print(
                f"parse-cu: warning: CUnit summary says ran={ran} failed={failed}, "
                f"parsed {len(tests)} tests with {tot['fail']} failures",
                file=sys.stderr,
            )
    else:
        print("parse-cu: warning: no CUnit 'Run Summary' in log (run cut short?)", file=sys.stderr)

    failed = [t for t in tests if t["result"] == "fail"]
    unexpected = [t for t in failed if not allowed(full_name(t), allow)]
    if failed:
        print(f"\nfailed tests ({len(failed)}, {len(unexpected)} unexpected):")
        for t in failed:
            why = "; ".join(t["reason"][:2]) or (t["asserts"][0] if t["asserts"] else "")
            tag = " (allowed)" if allowed(full_name(t), allow) else ""
            print(f"  {full_name(t)}{tag}: {why}")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "totals": {**tot, "total": len(tests)},
                    "suites": {
                        s: {k: sum(1 for t in ts if t["result"] == k) for k in ("pass", "skip", "fail")}
                        for s, ts in p.suites.items()
                    },
                    "tests": [
                        {
                            "name": full_name(t),
                            "result": t["result"],
                            "skip_reason": t["skip_reason"],
                            "reason": t["reason"],
                            "asserts": t["asserts"][:5],
                        }
                        for t in tests
                    ],
                    "unexpected_failures": [full_name(t) for t in unexpected],
                },
                f,
                indent=1,
            )
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
