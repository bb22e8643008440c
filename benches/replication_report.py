#!/usr/bin/env python3
"""Turn what benches/replication.sh wrote into a markdown report.

Usage:
    replication_report.py RAW_DIR META_JSON

RAW_DIR holds, per fio run, SETUP__JOB__REP.json (fio JSON), .cpu (server CPU ticks, see
run_cpu_sampled in scripts/lib/common.sh) or .failed; SETUP is replicated, unreplicated,
replicated-base, unreplicated-base (main section) or delay<US> (delay section). resync.txt has
one line per resync case: label|resync_rate|app(0/1)|bytes|seconds|finished(0/1)|KiB/s the
sync source logged at the end ("-" if none), and
resync__<label>.json the fio run during a case with application writes.

Values per setup are medians over the repetitions; ratios are paired (both setups of one
repetition ran back to back) and shown as median [min .. max] of the per-repetition ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fio_report import cpu_seconds, fmt, load_fio_json, ratio_summary  # noqa: E402


def summarise(doc: dict) -> dict:
    """Totals over fio's jobs (one per LUN in the volumes section): IOPS and MiB/s summed,
    mean latency weighted by I/Os, p99 the worst job's; `per_job_iops` for the shares."""
    r = {"iops": 0.0, "mibs": 0.0, "ios": 0, "per_job_iops": []}
    acc = {d: [0, 0.0, None] for d in ("read", "write")}  # ios, sum of mean * ios, p99
    for job in doc["jobs"]:
        if job.get("error"):
            raise ValueError(f"fio job error {job['error']}")
        job_iops = 0.0
        for d in ("read", "write"):
            side = job.get(d) or {}
            ios = int(side.get("total_ios", 0))
            r["ios"] += ios
            job_iops += float(side.get("iops", 0.0))
            r["mibs"] += float(side.get("bw_bytes", 0)) / 2**20
            lat = side.get("lat_ns") or {}
            p99 = (lat.get("percentile") or {}).get("99.000000")
            if ios:
                acc[d][0] += ios
                acc[d][1] += float(lat.get("mean", 0.0)) * ios
                if p99 is not None:
                    acc[d][2] = max(acc[d][2] or 0.0, float(p99))
        r["iops"] += job_iops
        r["per_job_iops"].append(job_iops)
    for d, (ios, lat_sum, p99) in acc.items():
        r[f"{d}_mean_us"] = lat_sum / ios / 1000.0 if ios else None
        r[f"{d}_p99_us"] = p99 / 1000.0 if (ios and p99 is not None) else None
    if r["ios"] == 0:
        raise ValueError("no I/O completed")
    return r


def lat(run: dict, rw: str, key: str):
    """The latency that matters for the job: writes for write jobs, reads for read jobs,
    both (write / read) for mixed ones."""
    if rw in ("randrw", "rw", "readwrite"):
        return (run.get(f"write_{key}"), run.get(f"read_{key}"))
    return run.get(f"{'read' if 'read' in rw else 'write'}_{key}")


def fmt_lat(x) -> str:
    if isinstance(x, tuple):
        return f"w {fmt(x[0], 1)} / r {fmt(x[1], 1)}"
    return fmt(x, 1)


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    if isinstance(xs[0], tuple):
        return tuple(med([x[i] for x in xs]) for i in range(len(xs[0])))
    return statistics.median(xs)


def spread(xs: list[float], digits=1) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(statistics.median(xs), digits)} [{fmt(min(xs), digits)} .. {fmt(max(xs), digits)}]"


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    raw, meta_path = sys.argv[1], sys.argv[2]
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    jobs = {j["name"]: j for j in meta["jobs"] + meta.get("delay_jobs", []) + meta.get("volume_jobs", [])}

    runs: dict[tuple[str, str], dict[str, dict]] = {}
    errors: list[str] = []
    for fname in sorted(os.listdir(raw)):
        stem, _, ext = fname.rpartition(".")
        if ext not in ("json", "failed"):
            continue
        fields = stem.split("__")
        if len(fields) != 3 or fields[1] not in jobs:
            continue
        setup, job, rep = fields
        path = os.path.join(raw, fname)
        if ext == "failed":
            with open(path, encoding="utf-8", errors="replace") as f:
                errors.append(f"{setup} / {job} / rep {rep}: {(f.read().strip() or 'failed').splitlines()[0]}")
            continue
        try:
            r = summarise(load_fio_json(path))
        except (ValueError, KeyError, IndexError) as e:
            errors.append(f"{fname}: {e}")
            continue
        cpu = cpu_seconds(os.path.join(raw, stem + ".cpu")) or {}
        r["cpu"] = {k: v / r["ios"] * 1e6 for k, v in cpu.items()}  # s per million I/Os
        r["cpu_total"] = sum(r["cpu"].values()) if r["cpu"] else None
        runs.setdefault((setup, job), {})[rep] = r

    def paired(a: str, b: str, job: str, f) -> list[float]:
        ra, rb = runs.get((a, job), {}), runs.get((b, job), {})
        out = []
        for k in sorted(ra, key=int):
            if k in rb:
                x = f(ra[k], rb[k])
                if x is not None:
                    out.append(x)
        return out

    def div(x, y):
        return x / y if (x is not None and y) else None

    o: list[str] = []
    o.append(f"# twinsan: what synchronous replication costs ({meta.get('date', '')})")
    o.append("")
    for label, value in meta.get("facts", []):
        o.append(f"- **{label}**: {value}")
    sections = meta.get("sections", [])
    setups = meta.get("setups", [])

    if "main" in sections:
        o.append("")
        o.append("## Replicated pair against one unreplicated server")
        o.append("")
        o.append(
            f"Medians of {meta.get('repeat')} repetitions per setup; the ratio and the added "
            "latency are paired (replicated and unreplicated ran back to back in each "
            "repetition): median [min .. max] over the repetitions. Latency is fio's total "
            "latency (submission to completion) in microseconds; for the mixed job writes / reads "
            "(its added latency: writes)."
        )
        o.append("")
        o.append(
            "| job | replicated IOPS | unreplicated IOPS | IOPS replicated/unreplicated | "
            "replicated MiB/s | unreplicated MiB/s | replicated mean lat | unreplicated mean lat | "
            "added mean lat (us) | replicated p99 | unreplicated p99 |"
        )
        o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for j in meta["jobs"]:
            n, rw = j["name"], j["rw"]
            R = list(runs.get(("replicated", n), {}).values())
            U = list(runs.get(("unreplicated", n), {}).values())
            ratios = paired("replicated", "unreplicated", n, lambda a, b: div(a["iops"], b["iops"]))

            def added(a, b, rw=rw):
                x, y = lat(a, rw, "mean_us"), lat(b, rw, "mean_us")
                if isinstance(x, tuple):
                    x, y = x[0], y[0]  # writes: what replication delays
                return x - y if (x is not None and y is not None) else None

            adds = paired("replicated", "unreplicated", n, added)
            o.append(
                f"| {n} | {fmt(med([r['iops'] for r in R]))} | {fmt(med([r['iops'] for r in U]))} | "
                f"{ratio_summary(ratios)} | {fmt(med([r['mibs'] for r in R]), 1)} | "
                f"{fmt(med([r['mibs'] for r in U]), 1)} | {fmt_lat(med([lat(r, rw, 'mean_us') for r in R]))} | "
                f"{fmt_lat(med([lat(r, rw, 'mean_us') for r in U]))} | {spread(adds)} | "
                f"{fmt_lat(med([lat(r, rw, 'p99_us') for r in R]))} | {fmt_lat(med([lat(r, rw, 'p99_us') for r in U]))} |"
            )
        o.append("")
        o.append("### Server CPU seconds per million I/Os")
        o.append("")
        o.append(
            "utime + stime of each daemon over the measured time divided by the I/Os fio "
            "completed, times 10^6 (medians over the repetitions). The pair's cost is primary + "
            "secondary; the ratio against the unreplicated server is paired per repetition."
        )
        o.append("")
        o.append("| job | primary | secondary | primary + secondary | unreplicated | (primary + secondary)/unreplicated |")
        o.append("|---|---:|---:|---:|---:|---:|")
        for j in meta["jobs"]:
            n = j["name"]
            R = list(runs.get(("replicated", n), {}).values())
            U = list(runs.get(("unreplicated", n), {}).values())
            ratios = paired("replicated", "unreplicated", n, lambda a, b: div(a["cpu_total"], b["cpu_total"]))
            o.append(
                f"| {n} | {fmt(med([r['cpu'].get('primary') for r in R]), 2)} | "
                f"{fmt(med([r['cpu'].get('secondary') for r in R]), 2)} | {fmt(med([r['cpu_total'] for r in R]), 2)} | "
                f"{fmt(med([r['cpu'].get('server') for r in U]), 2)} | {ratio_summary(ratios)} |"
            )
        per_rep = []
        for j in meta["jobs"]:
            n = j["name"]
            for s in setups:
                rs = runs.get((s, n), {})
                if rs:
                    per_rep.append(
                        f"{n} {s}: IOPS "
                        + ", ".join(f"{fmt(rs[k]['iops'])}" for k in sorted(rs, key=int))
                        + "; CPU s/M I/O "
                        + ", ".join(fmt(rs[k]["cpu_total"], 2) for k in sorted(rs, key=int))
                    )
        if per_rep:
            o.append("")
            o.append("Per repetition (in order):")
            o.append("")
            o.extend(f"- {x}" for x in per_rep)

        if any(s.endswith("-base") for s in setups):
            o.append("")
            o.append("## New binary against base binary")
            o.append("")
            o.append(
                "Same setups run with TWINSAN_BIN_BASE in the same rotation. Paired ratios "
                "new/base per repetition, median [min .. max]. IOPS: higher is better; CPU per "
                "I/O (primary + secondary for the pair): lower is better."
            )
            o.append("")
            o.append("| job | setup | IOPS new/base | CPU per I/O new/base | new CPU s/M I/O | base CPU s/M I/O |")
            o.append("|---|---|---:|---:|---:|---:|")
            for j in meta["jobs"]:
                n = j["name"]
                for s in ("replicated", "unreplicated"):
                    b = s + "-base"
                    iops = paired(s, b, n, lambda x, y: div(x["iops"], y["iops"]))
                    cpu = paired(s, b, n, lambda x, y: div(x["cpu_total"], y["cpu_total"]))
                    nm = med([r["cpu_total"] for r in runs.get((s, n), {}).values()])
                    bm = med([r["cpu_total"] for r in runs.get((b, n), {}).values()])
                    o.append(f"| {n} | {s} | {ratio_summary(iops)} | {ratio_summary(cpu)} | {fmt(nm, 2)} | {fmt(bm, 2)} |")

    if "resync" in sections:
        o.append("")
        o.append("## Resync throughput")
        o.append("")
        o.append(
            "The pair restarted with the given resync_rate, then `twinsan replication invalidate` "
            "on B (a full resync from A). Bytes are A's resync_sent_bytes, followed every ~0.2 s "
            "through `twinsan status --json` for at most BENCH_RESYNC_SECS or until both are "
            "UpToDate (so the time includes up to one polling interval); the daemon's own rate is "
            "the one A logs when the resync finishes (bytes over the time from its start to the "
            "last block's ack), without that polling error. With application "
            "writes: fio 4k random writes QD8 on A during the stretch (resync backs off while "
            "application I/O runs); baseline-app: the same fio job on the pair in sync, no "
            "resync, as long (the last column's denominator)."
        )
        o.append("")
        o.append("| case | resync_rate | application writes | resync MiB | seconds | resync MiB/s (polled) | resync MiB/s (daemon's own) | finished | application IOPS | application mean lat (us) | application IOPS / baseline |")
        o.append("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
        try:
            with open(os.path.join(raw, "resync.txt"), encoding="utf-8") as f:
                lines = [x.strip() for x in f if x.strip()]
        except OSError:
            lines = []
        base_iops = None
        try:
            base_iops = summarise(load_fio_json(os.path.join(raw, "resync__baseline-app.json")))["iops"]
        except (OSError, ValueError, KeyError, IndexError):
            pass
        for line in lines:
            label, rate, app, nbytes, secs, done, own_kib = (line.split("|") + ["-"])[:7]
            mib = int(nbytes) / 2**20
            own = f"{int(own_kib) / 1024:,.1f} ({int(own_kib) * 1024 / 1e6:,.0f} MB/s)" if own_kib.isdigit() else "-"
            app_iops = app_lat = app_ratio = "-"
            if app == "1":
                p = os.path.join(raw, f"resync__{label}.json")
                try:
                    r = summarise(load_fio_json(p))
                    app_iops, app_lat = fmt(r["iops"]), fmt(r["write_mean_us"], 1)
                    if base_iops:
                        app_ratio = f"{r['iops'] / base_iops:.2f}"
                except (OSError, ValueError, KeyError, IndexError) as e:
                    app_iops = f"failed ({e})"
            o.append(
                f"| {label} | {rate} | {'yes' if app == '1' else 'no'} | {mib:,.1f} | {secs} | "
                f"{fmt(mib / float(secs), 1) if float(secs) > 0 else 'n/a'} | {own} | {'yes' if done == '1' else 'no (stopped measuring)'} | {app_iops} | {app_lat} | {app_ratio} |"
            )

    if "delay" in sections:
        d = int(meta.get("delay_us", 0))
        o.append("")
        o.append(f"## Replication link with {d} us added to each direction")
        o.append("")
        o.append(
            "The pair's replication link goes through benches/delay_proxy.py (user-space TCP "
            f"proxy) for the whole section; per repetition one run with 0 us and one with {d} us "
            "added to each direction (order alternating), so the proxy's own cost is in both and "
            f"the difference is what the delay adds. Expected: the round trip, {2 * d} us, plus a "
            "small constant (the proxy's sleep overshoot). Paired differences, median [min .. max]."
        )
        o.append("")
        o.append(f"| job | IOPS 0 us | IOPS {d} us | mean lat 0 us | mean lat {d} us | added mean lat (us) | added - round trip (us) | p99 0 us | p99 {d} us |")
        o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        a, b = f"delay{d}", "delay0"
        for j in meta.get("delay_jobs", []):
            n, rw = j["name"], j["rw"]
            D, Z = list(runs.get((a, n), {}).values()), list(runs.get((b, n), {}).values())
            adds = paired(a, b, n, lambda x, y, rw=rw: (lat(x, rw, "mean_us") or 0) - (lat(y, rw, "mean_us") or 0))
            o.append(
                f"| {n} | {fmt(med([r['iops'] for r in Z]))} | {fmt(med([r['iops'] for r in D]))} | "
                f"{fmt_lat(med([lat(r, rw, 'mean_us') for r in Z]))} | {fmt_lat(med([lat(r, rw, 'mean_us') for r in D]))} | "
                f"{spread(adds)} | {spread([x - 2 * d for x in adds])} | "
                f"{fmt_lat(med([lat(r, rw, 'p99_us') for r in Z]))} | {fmt_lat(med([lat(r, rw, 'p99_us') for r in D]))} |"
            )
        # The link's actual transit times in each run, as the proxy measured them
        # (delay_link_stats.json: label -> direction -> [chunks, sum_us]).
        try:
            with open(os.path.join(raw, "delay_link_stats.json"), encoding="utf-8") as f:
                link_stats = json.load(f)
        except (OSError, ValueError):
            link_stats = {}

        def link_rtt(setup: str, job: str, rep: str):
            """Mean transit forth plus back on the busiest proxied connection of one run."""
            best = None
            by_dir = link_stats.get(f"{setup}__{job}__{rep}", {})
            for name in {k[:-1] for k in by_dir}:
                fw, bw = by_dir.get(name + ">"), by_dir.get(name + "<")
                if not fw or not bw or not fw[0] or not bw[0]:
                    continue
                if best is None or fw[0] + bw[0] > best[0]:
                    best = (fw[0] + bw[0], fw[1] / fw[0] + bw[1] / bw[0])
            return best[1] if best else None

        if link_stats:
            o.append("")
            o.append(
                "The link's round trip as it was in each run: the mean transit time through the "
                "proxy (read to written out, under the run's own load) of a chunk towards the "
                "secondary plus one back, on the busiest proxied connection; its added part is the "
                f"same at {d} us minus at 0 us, paired. Added write latency minus that added "
                "round trip is what twinsan adds on top of the link's real round trip (the goal: "
                "at most 40 us)."
            )
            o.append("")
            o.append(f"| job | link round trip 0 us | link round trip {d} us | added round trip | added mean lat - added round trip (us) |")
            o.append("|---|---:|---:|---:|---:|")
            for j in meta.get("delay_jobs", []):
                n, rw = j["name"], j["rw"]
                reps = sorted(set(runs.get((a, n), {})) & set(runs.get((b, n), {})), key=int)
                r0 = [link_rtt(b, n, k) for k in reps]
                rd = [link_rtt(a, n, k) for k in reps]
                added_rtt, beyond = [], []
                for k, x0, xd in zip(reps, r0, rd):
                    if x0 is None or xd is None:
                        continue
                    added_rtt.append(xd - x0)
                    add = (lat(runs[(a, n)][k], rw, "mean_us") or 0) - (lat(runs[(b, n)][k], rw, "mean_us") or 0)
                    beyond.append(add - (xd - x0))
                o.append(
                    f"| {n} | {fmt_lat(med([x for x in r0 if x is not None]))} | {fmt_lat(med([x for x in rd if x is not None]))} | "
                    f"{spread(added_rtt)} | {spread(beyond)} |"
                )
        cal = []
        for when in ("before", "after"):
            try:
                with open(os.path.join(raw, f"delay_calibration.{when}.json"), encoding="utf-8") as f:
                    c = json.load(f)
                cal.append(
                    f"{when} the section: round trip {fmt(c['rtt0_us'], 1)} us at 0, {fmt(c['rtt_delay_us'], 1)} us at "
                    f"{c['delay_us']} us each way (added {fmt(c['rtt_delay_us'] - c['rtt0_us'], 1)} us, "
                    f"expected {2 * int(c['delay_us'])})"
                )
            except (OSError, ValueError, KeyError):
                pass
        if cal:
            o.append("")
            o.append(
                "The proxy alone (64-byte ping-pong through it to an echo server, median): "
                + "; ".join(cal)
                + ". Added latency beyond that is twinsan's (one round trip per write at QD1 means "
                "added = the proxy's added round trip)."
            )
        o.append("")
        o.append(
            "At QD1 every write waits for one replication round trip, so the added latency should "
            "be the round trip plus a constant; at QD32 the round trips of concurrent writes "
            "overlap, so the added mean latency shows how well the link is pipelined."
        )

    if "volumes" in sections:
        nv = int(meta.get("volumes", 0))
        one, many = "vol1", f"vol{nv}"
        o.append("")
        o.append(f"## {nv} replicated volumes on one pair")
        o.append("")
        o.append(
            f"One pair serving {nv} replicated LUNs (each its own volume and replication link). "
            f"Per job and repetition: LUN 0 written alone, and all {nv} written at once with one "
            "fio job (session) each, the same job on every LUN (order alternating). Aggregate / one: "
            "paired per repetition, median [min .. max]. Share: the slowest volume's IOPS over the "
            f"mean of the {nv} (1.00 = an even split). CPU: primary + secondary seconds per million I/Os."
        )
        o.append("")
        o.append(
            f"| job | one volume IOPS | {nv} volumes aggregate IOPS | aggregate / one | one volume MiB/s | "
            f"aggregate MiB/s | slowest volume's share | CPU s/M I/O, one | CPU s/M I/O, {nv} |"
        )
        o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for j in meta.get("volume_jobs", []):
            n = j["name"]
            A, M = list(runs.get((one, n), {}).values()), list(runs.get((many, n), {}).values())
            ratios = paired(many, one, n, lambda x, y: div(x["iops"], y["iops"]))
            shares = [min(r["per_job_iops"]) / statistics.mean(r["per_job_iops"]) for r in M if r["per_job_iops"] and statistics.mean(r["per_job_iops"])]
            o.append(
                f"| {n} | {fmt(med([r['iops'] for r in A]))} | {fmt(med([r['iops'] for r in M]))} | "
                f"{ratio_summary(ratios)} | {fmt(med([r['mibs'] for r in A]), 1)} | {fmt(med([r['mibs'] for r in M]), 1)} | "
                f"{spread(shares, 2)} | {fmt(med([r['cpu_total'] for r in A]), 2)} | {fmt(med([r['cpu_total'] for r in M]), 2)} |"
            )

    if errors:
        o.append("")
        o.append("## Failures")
        o.append("")
        o.extend(f"- {e}" for e in errors)
    notes = meta.get("notes", [])
    if notes:
        o.append("")
        o.append("## Notes")
        o.append("")
        o.extend(f"- {n}" for n in notes)
    print("\n".join(o))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
