#!/usr/bin/env python3
"""Turn the fio JSON files written by benches/compare-tgt.sh into a markdown report.

Usage:
    fio_report.py RAW_DIR META_JSON

RAW_DIR holds one fio JSON output per run, named SERVER__JOB__REP.json (SERVER is tgt or
twinsan-ENGINE; a run that failed has SERVER__JOB__REP.failed with the reason instead). META_JSON
has "jobs" (ordered list of {name, rw, bs, iodepth}), "servers" (list) and "facts"
(ordered list of [label, value]) for the header.

With several repetitions the run with the median IOPS is reported and the IOPS range is
shown. Throughput is in MiB/s (2^20 bytes/s); latency is fio's total latency (lat_ns,
submission to completion) in microseconds, p99 from lat_percentiles.

When the servers include twinsan-base (compare-tgt.sh with TWINSAN_BIN_BASE), a table of
paired ratios new/base follows: IOPS and server CPU per I/O, where the CPU time comes from
SERVER__JOB__REP.cpu (written by run_cpu_sampled in scripts/lib/common.sh).
"""

from __future__ import annotations

import json
import os
import statistics
import sys


def load_fio_json(path: str) -> dict:
    """fio may print notes before the JSON document; start at the first '{' line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("\n{")
    start = 0 if text.startswith("{") else (start + 1 if start >= 0 else -1)
    if start < 0:
        raise ValueError("no JSON document in fio output")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def summarise(doc: dict, rw: str) -> dict:
    job = doc["jobs"][0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    side = job["write" if "write" in rw else "read"]
    lat = side.get("lat_ns") or {}
    pct = lat.get("percentile") or side.get("clat_ns", {}).get("percentile") or {}
    p99 = pct.get("99.000000")
    if side.get("total_ios", 0) == 0:
        raise ValueError("no I/O completed")
    ios = sum(int(job.get(d, {}).get("total_ios", 0)) for d in ("read", "write", "trim"))
    return {
        "ios": ios,
        "iops": float(side["iops"]),
        "mibs": float(side["bw_bytes"]) / 2**20,
        "lat_mean_us": float(lat.get("mean", 0.0)) / 1000.0,
        "lat_p99_us": float(p99) / 1000.0 if p99 is not None else None,
    }


def cpu_seconds(path: str) -> dict[str, float] | None:
    """CPU seconds per process label over the measured part of a run, from a .cpu file:
    from the ramp-end sample to the end (from the start when there was no ramp)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    tck = float(d.get("clk_tck") or 100)
    out = {}
    for label, (t0, t1, t2) in d.get("procs", {}).items():
        start = t1 if float(d.get("ramp_s", 0)) > 0 else t0
        out[label] = max(0, t2 - start) / tck
    return out


def ratio_summary(xs: list[float]) -> str:
    """'median [min .. max]' of per-repetition ratios."""
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.median(xs):.2f} [{min(xs):.2f} .. {max(xs):.2f}]"


def fmt(x, digits=0) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    raw_dir, meta_path = sys.argv[1], sys.argv[2]
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    servers = meta["servers"]

    runs: dict[tuple[str, str], list] = {}
    errors: dict[tuple[str, str], list[str]] = {}
    jobs_by_name = {j["name"]: j for j in meta["jobs"]}
    for fname in sorted(os.listdir(raw_dir)):
        parts = fname.rsplit(".", 1)
        if len(parts) != 2 or parts[1] not in ("json", "failed"):
            continue
        fields = parts[0].split("__")
        if len(fields) != 3 or fields[1] not in jobs_by_name:
            continue
        server, job, rep = fields
        path = os.path.join(raw_dir, fname)
        if parts[1] == "failed":
            with open(path, encoding="utf-8", errors="replace") as f:
                errors.setdefault((server, job), []).append(f.read().strip() or "failed")
            continue
        try:
            summary = summarise(load_fio_json(path), jobs_by_name[job]["rw"])
            summary["rep"] = rep
            cpu = cpu_seconds(os.path.join(raw_dir, parts[0] + ".cpu"))
            if cpu and "server" in cpu and summary["ios"] > 0:
                summary["cpu_us_per_io"] = cpu["server"] / summary["ios"] * 1e6
            runs.setdefault((server, job), []).append(summary)
        except (ValueError, KeyError, IndexError) as e:
            errors.setdefault((server, job), []).append(f"{fname}: {e}")

    def pick(server: str, job: str):
        rs = runs.get((server, job))
        if not rs:
            return None, None
        rs = sorted(rs, key=lambda r: r["iops"])
        med = rs[(len(rs) - 1) // 2]
        spread = (rs[0]["iops"], rs[-1]["iops"]) if len(rs) > 1 else None
        return med, spread

    def paired_ratios(server: str, job: str) -> list[float]:
        """server/tgt per repetition: both ran back to back, so a slow spell of a shared
        machine hits both sides of a pair alike, unlike the medians taken separately."""
        tgt = {r["rep"]: r["iops"] for r in runs.get(("tgt", job), [])}
        tw = {r["rep"]: r["iops"] for r in runs.get((server, job), [])}
        return [tw[k] / tgt[k] for k in sorted(tgt, key=int) if k in tw and tgt[k] > 0]

    out = []
    out.append(f"# twinsan vs tgt: fio over libiscsi ({meta.get('date', '')})")
    out.append("")
    for label, value in meta.get("facts", []):
        out.append(f"- **{label}**: {value}")
    out.append("")
    # Every twinsan engine is compared with tgt.
    others = [s for s in servers if s != "tgt"] if "tgt" in servers else []
    cols = ["job"]
    for s in servers:
        cols.append(f"{s} IOPS")
    paired = bool(others) and int(meta.get("repeat", 1)) > 1
    for s in others:
        cols.append(f"ratio {s}/tgt (IOPS)")
        if paired:
            cols.append(f"median paired ratio {s}/tgt")
    for s in servers:
        cols.append(f"{s} MiB/s")
    for s in servers:
        cols.append(f"{s} mean lat (us)")
    for s in servers:
        cols.append(f"{s} p99 lat (us)")
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
    spreads = []
    any_error = False
    for j in meta["jobs"]:
        name = j["name"]
        picked = {s: pick(s, name) for s in servers}
        row = [name]
        for s in servers:
            r, spread = picked[s]
            row.append(fmt(r["iops"]) if r else "**FAILED**")
            if spread:
                spreads.append(f"{name} {s}: {fmt(spread[0])} .. {fmt(spread[1])} IOPS")
        for s in others:
            a, b = picked["tgt"][0], picked[s][0]
            row.append(f"{b['iops'] / a['iops']:.2f}" if a and b and a["iops"] > 0 else "n/a")
            if paired:
                pr = paired_ratios(s, name)
                row.append(f"{statistics.median(pr):.2f}" if pr else "n/a")
                if pr:
                    spreads.append(f"{name} {s}/tgt per repetition: " + ", ".join(f"{x:.2f}" for x in pr))
        for key, digits in (("mibs", 1), ("lat_mean_us", 1), ("lat_p99_us", 1)):
            for s in servers:
                r = picked[s][0]
                row.append(fmt(r[key], digits) if r else "n/a")
        out.append("| " + " | ".join(row) + " |")
        for s in servers:
            if (s, name) in errors:
                any_error = True
    if spreads:
        out.append("")
        out.append(
            f"Median of {meta.get('repeat', '?')} repetitions shown (per server; the paired ratio is "
            "the median of the per-repetition ratios); IOPS range per job:"
        )
        out.append("")
        out.extend(f"- {x}" for x in spreads)
    # Server CPU per I/O of every server (issue 12): what one box measures fairly even when
    # the client is the bottleneck.
    if any(r.get("cpu_us_per_io") for rs in runs.values() for r in rs):
        out.append("")
        out.append("## Server CPU per I/O")
        out.append("")
        out.append(
            "utime + stime of the server process (all threads) from the end of the ramp to the "
            "end of the run, divided by the I/Os fio completed: CPU microseconds per I/O (= CPU "
            "seconds per million I/Os), median over the repetitions; lower is better. The ratio "
            "against tgt is paired per repetition, median [min .. max]."
        )
        out.append("")
        cols = ["job"] + [f"{s} us/I/O" for s in servers] + [f"{s}/tgt" for s in others]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
        for j in meta["jobs"]:
            name = j["name"]
            row = [name]
            for s in servers:
                xs = [r["cpu_us_per_io"] for r in runs.get((s, name), []) if r.get("cpu_us_per_io")]
                row.append(fmt(statistics.median(xs), 1) if xs else "n/a")
            tgt_cpu = {r["rep"]: r.get("cpu_us_per_io") for r in runs.get(("tgt", name), [])}
            for s in others:
                pr = [
                    r["cpu_us_per_io"] / tgt_cpu[r["rep"]]
                    for r in runs.get((s, name), [])
                    if r.get("cpu_us_per_io") and tgt_cpu.get(r["rep"])
                ]
                row.append(ratio_summary(pr))
            out.append("| " + " | ".join(row) + " |")
    # Refactor check: the new binary (first twinsan engine) against the base binary, which
    # ran with the same configuration and engine, paired per repetition.
    news = [s for s in servers if s.startswith("twinsan-") and s != "twinsan-base"]
    if "twinsan-base" in servers and news:
        new = news[0]
        out.append("")
        out.append(f"## New binary against base binary ({new} / twinsan-base)")
        out.append("")
        out.append(
            "Paired ratios per repetition (both ran back to back on the same file), median "
            "[min .. max] over the repetitions. IOPS: higher is better. Server CPU per I/O: "
            "utime + stime of the server process from the end of the ramp to the end of the "
            "run, divided by the I/Os fio completed (s/M I/O: CPU seconds per million I/Os, = us per I/O); lower is better."
        )
        out.append("")
        out.append(
            f"| job | IOPS {new}/base | CPU per I/O {new}/base | {new} CPU s/M I/O | "
            "twinsan-base CPU s/M I/O |"
        )
        out.append("|---|---:|---:|---:|---:|")
        for j in meta["jobs"]:
            name = j["name"]
            nr = {r["rep"]: r for r in runs.get((new, name), [])}
            br = {r["rep"]: r for r in runs.get(("twinsan-base", name), [])}
            reps = sorted((k for k in nr if k in br), key=int)
            iops = [nr[k]["iops"] / br[k]["iops"] for k in reps if br[k]["iops"] > 0]
            cpu = [
                nr[k]["cpu_us_per_io"] / br[k]["cpu_us_per_io"]
                for k in reps
                if nr[k].get("cpu_us_per_io") and br[k].get("cpu_us_per_io")
            ]

            def med_cpu(rs):
                xs = [r["cpu_us_per_io"] for r in rs.values() if r.get("cpu_us_per_io")]
                return fmt(statistics.median(xs), 2) if xs else "n/a"

            out.append(
                f"| {name} | {ratio_summary(iops)} | {ratio_summary(cpu)} | {med_cpu(nr)} | {med_cpu(br)} |"
            )
    if any_error:
        out.append("")
        out.append("## Failures")
        out.append("")
        for (s, name), msgs in sorted(errors.items()):
            for m in msgs:
                out.append(f"- {s} / {name}: {m.splitlines()[0] if m else 'failed'}")
    notes = meta.get("notes", [])
    if notes:
        out.append("")
        out.append("## Notes")
        out.append("")
        out.extend(f"- {n}" for n in notes)
    print("\n".join(out))
    return 1 if any_error else 0


if __name__ == "__main__":
    sys.exit(main())
