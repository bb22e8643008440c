#!/usr/bin/env python3
"""A delaying TCP proxy for benches/replication.sh: this kernel has no netem, so the added
latency of a slower replication link is simulated in user space.

Usage:
    delay_proxy.py --listen 127.0.0.1:PORT --target 127.0.0.1:PORT [--listen ... --target ...]
                   --delay-file FILE --max-seconds N [--stats-file FILE]

Every --listen address forwards to the --target given after it (pairs in order). Every chunk
of bytes read from one side is written to the other side no earlier than DELAY after it was
read, in both directions, preserving order (a pipe whose transit time is DELAY, not a rate
limit). DELAY is read (in microseconds, a whole number) from --delay-file every 0.2 s, so the
caller can change it without reconnecting; a missing or unreadable file means 0. A word after
the number in that file labels the run: with --stats-file, the proxy keeps per label and per
direction the number of chunks and the sum of their actual transit times (read until written
out, so the sleep overshoot under the run's own load is in it) and writes them as JSON
{label: {direction: [chunks, sum_us]}} every 0.2 s and at exit; a direction is the listen
address followed by ">" (towards the target) or "<" (back).

Sub-millisecond delays need precise sleeps: asyncio's timers go through epoll, whose timeout
has a resolution of 1 ms, so each direction of each connection has a reader thread (recv,
timestamp, queue) and a writer thread (sleep until due with time.sleep, which uses
clock_nanosleep, then sendall). With DELAY = 0 the proxy still costs one thread hand-off per
chunk: run it at 0 as the baseline to separate that constant from the delay.

--calibrate US measures the proxy alone (an echo server behind it on an ephemeral loopback
port, 64-byte ping-pong, at most ~2 s per setting) at 0 and at US per direction and prints
JSON {"delay_us": US, "rtt0_us": median, "rtt_delay_us": median, "samples": n}: the expected
added round trip is 2*US; the rest is the proxy's sleep overshoot on this machine.

Only loopback addresses are accepted. The proxy exits by itself after --max-seconds (and on
SIGTERM / SIGINT), closing every connection.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import sys
import threading
import time

DELAY_US = 0
LABEL = ""
STOP = threading.Event()
# label -> direction -> [chunks, sum of transit in us]
STATS: dict[str, dict[str, list[float]]] = {}
STATS_LOCK = threading.Lock()


def loopback(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host.startswith("127."):
        raise SystemExit(f"refusing non-loopback address {addr}")
    return host, int(port)


def watch_delay(path: str, stats_file: str | None) -> None:
    global DELAY_US, LABEL
    while not STOP.is_set():
        try:
            with open(path, encoding="ascii") as f:
                words = f.read().split()
            DELAY_US = max(0, int(words[0])) if words else 0
            LABEL = words[1] if len(words) > 1 else ""
        except (OSError, ValueError):
            DELAY_US, LABEL = 0, ""
        if stats_file:
            write_stats(stats_file)
        STOP.wait(0.2)


def write_stats(path: str) -> None:
    import json

    with STATS_LOCK:
        text = json.dumps(STATS)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, path)


def pipe(src: socket.socket, dst: socket.socket, direction: str) -> None:
    """One direction: a reader (this thread) and a writer thread joined by a queue."""
    q: collections.deque = collections.deque()
    cv = threading.Condition()
    done = [False]

    def writer() -> None:
        try:
            while True:
                with cv:
                    while not q and not done[0] and not STOP.is_set():
                        cv.wait(0.5)
                    if not q:
                        return
                    read_at, due, label, data = q.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
                if label:
                    transit = (time.monotonic() - read_at) * 1e6
                    with STATS_LOCK:
                        acc = STATS.setdefault(label, {}).setdefault(direction, [0, 0.0])
                        acc[0] += 1
                        acc[1] += transit
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    try:
        while not STOP.is_set():
            data = src.recv(256 * 1024)
            if not data:
                break
            now = time.monotonic()
            with cv:
                q.append((now, now + DELAY_US / 1e6, LABEL, data))
                cv.notify()
    except OSError:
        pass
    finally:
        with cv:
            done[0] = True
            cv.notify()


def bind(listen: tuple[str, int]) -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(listen)
    ls.listen(16)
    ls.settimeout(0.5)
    return ls


def serve(ls: socket.socket, target: tuple[str, int], name: str = "") -> None:
    while not STOP.is_set():
        try:
            c, _ = ls.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        try:
            t = socket.create_connection(target, timeout=2)
        except OSError:
            c.close()
            continue
        for s in (c, t):
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pipe, args=(c, t, name + ">"), daemon=True).start()
        threading.Thread(target=pipe, args=(t, c, name + "<"), daemon=True).start()


def calibrate(delay_us: int) -> int:
    global DELAY_US
    import json
    import statistics

    echo = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    echo.bind(("127.0.0.1", 0))
    echo.listen(1)

    def echo_loop() -> None:
        c, _ = echo.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                c.sendall(d)
        except OSError:
            return

    threading.Thread(target=echo_loop, daemon=True).start()
    ls = bind(("127.0.0.1", 0))
    threading.Thread(target=serve, args=(ls, echo.getsockname()), daemon=True).start()
    c = socket.create_connection(ls.getsockname(), timeout=5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    res = {"delay_us": delay_us}
    n = 0
    for key, d in (("rtt0_us", 0), ("rtt_delay_us", delay_us)):
        DELAY_US = d
        lat = []
        end = time.monotonic() + 2.0
        while time.monotonic() < end and len(lat) < 2000:
            t = time.perf_counter()
            c.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(c.recv(64 - got))
            lat.append((time.perf_counter() - t) * 1e6)
        res[key] = round(statistics.median(lat), 1)
        n = max(n, len(lat))
    res["samples"] = n
    STOP.set()
    c.close()
    print(json.dumps(res))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate", type=int, metavar="US")
    ap.add_argument("--listen", action="append")
    ap.add_argument("--target", action="append")
    ap.add_argument("--delay-file")
    ap.add_argument("--max-seconds", type=float)
    ap.add_argument("--stats-file")
    a = ap.parse_args()
    if a.calibrate is not None:
        return calibrate(a.calibrate)
    if not (a.listen and a.target and a.delay_file and a.max_seconds):
        ap.error("--listen, --target, --delay-file and --max-seconds are required")
    if len(a.listen) != len(a.target):
        ap.error("give one --target per --listen")
    if not 0 < a.max_seconds <= 86400:
        ap.error("--max-seconds must be in (0, 86400]")
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    signal.signal(signal.SIGINT, lambda *_: STOP.set())
    threading.Thread(target=watch_delay, args=(a.delay_file, a.stats_file), daemon=True).start()
    # Bound before the daemons are told about them: a refused dial would only be retried.
    pairs = [(bind(loopback(lst)), loopback(t)) for lst, t in zip(a.listen, a.target)]
    for (ls, t), lst in zip(pairs, a.listen):
        threading.Thread(target=serve, args=(ls, t, lst), daemon=True).start()
    print(f"delay_proxy pid {os.getpid()} up", file=sys.stderr, flush=True)
    STOP.wait(a.max_seconds)
    STOP.set()
    time.sleep(0.6)
    if a.stats_file:
        write_stats(a.stats_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
