#!/usr/bin/env bash
# Side-by-side benchmark of twinsan against the incumbent, tgt, on the SAME backing file:
# fio (built with the libiscsi engine) over loopback iSCSI, one server at a time.
#
# Usage: benches/compare-tgt.sh
#
# For every job, tgt and then twinsan with each of its I/O engines (io_uring, threads), and
# with TWINSAN_BIN_BASE an older twinsan binary (twinsan-base), run back to back (each server is started fresh for the job and stopped by PID afterwards;
# with BENCH_REPEAT>1 the order rotates every repetition), so all see the same machine
# state as closely as possible. The backing file is filled with random data once before the first job, so
# reads never hit holes. Writes a markdown report to benches/results/compare-tgt-<date>.md
# and prints it; raw fio JSON and server logs are kept in target/bench/<stamp>/.
#
# Environment (all optional):
#   BENCH_ONLY=tgt|twinsan      run one server only (default: both)
#   TWINSAN_ENGINES=io_uring,threads   twinsan's `server.io_engine` values to run, each as a
#                               server of its own (twinsan-io_uring, twinsan-threads)
#   BENCH_RUNTIME=20            seconds measured per job (fio --runtime, --time_based)
#   BENCH_RAMP=3                seconds of ramp before measuring (fio --ramp_time)
#   BENCH_JOBS=a,b              subset of jobs by name (default: all six, see JOBS below)
#   BENCH_REPEAT=1              repetitions of the whole job list (median reported)
#   BENCH_SIZE_MIB=1024         backing file size
#   BENCH_FILE=PATH             use this backing file (overwritten by preconditioning!)
#   BENCH_PRECONDITION=1        0 = do not fill the file first (only with BENCH_FILE)
#   BENCH_DIR=DIR               scratch dir for the file and twinsan data (default: first
#                               non-tmpfs of $TMPDIR, /tmp, /var/tmp, <repo>/target)
#   BENCH_OUT=PATH              report path (default benches/results/compare-tgt-<date>.md)
#   TGT_PORT=3261 TWINSAN_PORT=3262 TGT_CONTROL_PORT=61
#   TGT_BSOPTS="--bsoflags direct"   extra tgtadm logicalunit options (default: none)
#   TWINSAN_DIRECT=true         twinsan's `direct` LUN setting (O_DIRECT); false = page cache.
#                               Compare like with like: TWINSAN_DIRECT=false against tgt's
#                               default (buffered), TWINSAN_DIRECT=true against
#                               TGT_BSOPTS="--bsoflags direct".
#   TWINSAN_WORKER_THREADS=0    twinsan's `server.worker_threads` (0 = half the CPUs)
#   TWINSAN_IO_THREADS=0        twinsan's `server.io_threads` (threads engine; 0 = default)
#   TWINSAN_BIN=<repo>/target/release/twinsan   TWINSAN_FIO=<fio with libiscsi>
#   TWINSAN_BIN_BASE=PATH       an older twinsan binary (refactor check): adds the server
#                               twinsan-base (same configuration and io_engine as the first of
#                               TWINSAN_ENGINES, this binary) and a table of paired ratios
#                               new/base per job (IOPS, server CPU per I/O), median and range.
#                               Unset: no base server, the report is as without it.
#   TWINSAN_METRICS=ADDR        the twinsan servers other than twinsan-base serve Prometheus
#                               metrics on ADDR (`server.metrics_listen`, e.g. 127.0.0.1:9942)
#                               and are scraped once a second while they run. With
#                               TWINSAN_BIN_BASE=TWINSAN_BIN the new/base table is then the
#                               cost of metrics: on (scraped) / off, same binary.
#   RUST_LOG=warn               log level for twinsan while measuring
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

HOST=127.0.0.1
TGT_PORT="${TGT_PORT:-3261}"
TWINSAN_PORT="${TWINSAN_PORT:-3262}"
TGT_IQN="iqn.2026-11.org.twinsan.bench:tgt"
TWINSAN_IQN="iqn.2026-11.org.twinsan.bench:twinsan"
FIO_INITIATOR="iqn.2026-11.org.twinsan.bench:fio"
RUNTIME="${BENCH_RUNTIME:-20}"
RAMP="${BENCH_RAMP:-3}"
REPEAT="${BENCH_REPEAT:-1}"
SIZE_MIB="${BENCH_SIZE_MIB:-1024}"
TWINSAN_BIN="${TWINSAN_BIN:-$REPO/target/release/twinsan}"
FIO="$(fio_bin)"
export RUST_LOG="${RUST_LOG:-warn}"

# name|rw|bs|iodepth
JOBS=(
    "randread-4k-qd1|randread|4k|1"
    "randwrite-4k-qd1|randwrite|4k|1"
    "randread-4k-qd32|randread|4k|32"
    "randwrite-4k-qd32|randwrite|4k|32"
    "seqread-1m-qd8|read|1M|8"
    "seqwrite-1m-qd8|write|1M|8"
)

TWINSAN_SERVERS=()
IFS=',' read -r -a engines <<<"${TWINSAN_ENGINES:-io_uring,threads}"
for e in "${engines[@]}"; do
    case "$e" in
        io_uring|threads) TWINSAN_SERVERS+=("twinsan-$e") ;;
        *) die "TWINSAN_ENGINES: unknown engine '${e}' (io_uring, threads)" ;;
    esac
done
TWINSAN_BIN_BASE="${TWINSAN_BIN_BASE:-}"
BASE_ENGINE=""
if [ -n "$TWINSAN_BIN_BASE" ]; then
    [ "${#TWINSAN_SERVERS[@]}" -gt 0 ] || die "TWINSAN_BIN_BASE needs at least one engine in TWINSAN_ENGINES"
    BASE_ENGINE="${TWINSAN_SERVERS[0]#twinsan-}"
    TWINSAN_SERVERS+=("twinsan-base")
fi
case "${BENCH_ONLY:-both}" in
    both) SERVERS=(tgt "${TWINSAN_SERVERS[@]}") ;;
    tgt) SERVERS=(tgt) ;;
    twinsan) SERVERS=("${TWINSAN_SERVERS[@]}") ;;
    *) die "BENCH_ONLY must be tgt, twinsan or both (got '${BENCH_ONLY}')" ;;
esac
for v in RUNTIME RAMP REPEAT SIZE_MIB; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "BENCH_${v} must be a whole number (got '${!v}')"
done
if [ "$RUNTIME" -lt 1 ] || [ "$RUNTIME" -gt 3600 ]; then die "BENCH_RUNTIME must be 1..3600 s"; fi
if [ "$REPEAT" -lt 1 ] || [ "$REPEAT" -gt 20 ]; then die "BENCH_REPEAT must be 1..20"; fi
if [ -n "${BENCH_JOBS:-}" ]; then
    sel=()
    IFS=',' read -r -a want <<<"$BENCH_JOBS"
    for w in "${want[@]}"; do
        found=0
        for j in "${JOBS[@]}"; do [ "${j%%|*}" = "$w" ] && { sel+=("$j"); found=1; }; done
        [ "$found" = 1 ] || die "unknown job '${w}' (jobs: $(printf '%s ' "${JOBS[@]%%|*}"))"
    done
    JOBS=("${sel[@]}")
fi

# ------------------------------------------------------------------ preflight
if ! { [ -x "$FIO" ] && "$FIO" --enghelp 2>/dev/null | grep -qw libiscsi; }; then
    die "fio with libiscsi engine not found at ${FIO} (run scripts/install-deps.sh or set TWINSAN_FIO)"
fi
command -v iscsi-inq >/dev/null || die "iscsi-inq not found (run scripts/install-deps.sh)"
for s in "${SERVERS[@]}"; do
    case "$s" in
        tgt)
            if ! command -v tgtd >/dev/null || ! command -v tgtadm >/dev/null; then
                die "tgtd/tgtadm not found (run scripts/install-deps.sh)"
            fi
            [ "$(id -u)" -eq 0 ] || die "tgtd needs root"
            if port_open "$HOST" "$TGT_PORT"; then die "${HOST}:${TGT_PORT} (TGT_PORT) is already in use"; fi
            ;;
        twinsan-*)
            [ -x "$TWINSAN_BIN" ] || die "twinsan binary not found at ${TWINSAN_BIN}: build it with
    cargo build --release --bin twinsan
or point TWINSAN_BIN at it, or run only the tgt half with BENCH_ONLY=tgt"
            if [ "$s" = twinsan-base ] && [ ! -x "$TWINSAN_BIN_BASE" ]; then
                die "TWINSAN_BIN_BASE ${TWINSAN_BIN_BASE} is not an executable"
            fi
            if port_open "$HOST" "$TWINSAN_PORT"; then die "${HOST}:${TWINSAN_PORT} (TWINSAN_PORT) is already in use"; fi
            ;;
    esac
done

base_dir="$(bench_base_dir "$SIZE_MIB")" || die "no non-tmpfs directory with $((SIZE_MIB + 512)) MiB free (set BENCH_DIR)"
WORK="$(mktemp -d "${base_dir%/}/twinsan-bench.XXXXXX")"
STAMP="$(date +%Y%m%d-%H%M%S)"
RAW="$REPO/target/bench/$STAMP"
mkdir -p "$RAW"

TWINSAN_PID=""
cleanup() {
    local rc=$?
    stop_pid "$RUN_CPU_CHILD" 5 || true
    scraper_stop
    tgt_stop || true
    stop_pid "$TWINSAN_PID" 15 || true
    TWINSAN_PID=""
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

if [ -n "${BENCH_FILE:-}" ]; then
    FILE="$BENCH_FILE"
    if [ ! -f "$FILE" ]; then
        timed "precondition ${SIZE_MIB} MiB" make_backing_file "$FILE" "$SIZE_MIB"
    else
        SIZE_MIB=$(( $(stat -c %s "$FILE") / 1048576 ))
        [ "$SIZE_MIB" -ge 1 ] || die "BENCH_FILE ${FILE} is smaller than 1 MiB"
        if [ "${BENCH_PRECONDITION:-1}" = 1 ]; then
            timed "precondition ${SIZE_MIB} MiB" make_backing_file "$FILE" "$SIZE_MIB"
        fi
    fi
else
    FILE="$WORK/lun1.img"
    timed "precondition ${SIZE_MIB} MiB" make_backing_file "$FILE" "$SIZE_MIB"
fi
FILE="$(cd "$(dirname "$FILE")" && pwd)/$(basename "$FILE")"

# ------------------------------------------------------------------ servers
twinsan_config() {  # engine config-name
    cat <<TOML
[server]
data_dir = "$WORK/twinsan-data"
worker_threads = ${TWINSAN_WORKER_THREADS:-0}
io_engine = "$1"
io_threads = ${TWINSAN_IO_THREADS:-0}
$(if [ -n "${TWINSAN_METRICS:-}" ] && [ "$2" != twinsan-base ]; then echo "metrics_listen = \"$TWINSAN_METRICS\""; fi)

[[target]]
iqn = "$TWINSAN_IQN"
portals = ["$HOST:$TWINSAN_PORT"]

[[target.lun]]
number = 1
path = "$FILE"
direct = ${TWINSAN_DIRECT:-true}
TOML
}

twinsan_start() {  # engine logfile [binary config-name]
    local engine="$1" logf="$2" bin="${3:-$TWINSAN_BIN}" cname="${4:-twinsan-$1}"
    mkdir -p "$WORK/twinsan-data"
    twinsan_config "$engine" "$cname" >"$WORK/twinsan.toml"
    cp "$WORK/twinsan.toml" "$RAW/${cname}.toml"
    "$bin" serve --config "$WORK/twinsan.toml" >>"$logf" 2>&1 &
    TWINSAN_PID=$!
    if ! wait_port "$HOST" "$TWINSAN_PORT" 30 "$TWINSAN_PID"; then
        tail -n 30 "$logf" >&2 || true
        if kill -0 "$TWINSAN_PID" 2>/dev/null; then
            die "twinsan (pid ${TWINSAN_PID}) is not listening on ${HOST}:${TWINSAN_PORT} after 30 s; log: ${logf}"
        fi
        wait "$TWINSAN_PID" 2>/dev/null && true
        local rc=$?
        TWINSAN_PID=""
        die "twinsan exited at startup (exit ${rc}): ${bin} serve --config ${RAW}/${cname}.toml; log: ${logf}"
    fi
}

twinsan_stop() { scraper_stop; stop_pid "$TWINSAN_PID" 15; TWINSAN_PID=""; }

# With TWINSAN_METRICS: scrape the metrics endpoint once a second while the server runs (at
# most an hour), as a Prometheus server would, so the cost of keeping and encoding the
# metrics is in the measurement.
SCRAPER_PID=""
scraper_start() {  # logfile
    (
        for ((i = 0; i < 3600; i++)); do
            curl -fsS -o /dev/null --max-time 2 "http://${TWINSAN_METRICS}/metrics" || echo "scrape failed"
            sleep 1
        done
    ) >>"$1" 2>&1 &
    SCRAPER_PID=$!
}
scraper_stop() { stop_pid "$SCRAPER_PID" 15 || true; SCRAPER_PID=""; }

server_start() {
    case "$1" in
        tgt) tgt_start "$HOST" "$TGT_PORT" "$TGT_IQN" "$FILE" "$RAW/tgtd.$2.log" ;;
        twinsan-base) twinsan_start "$BASE_ENGINE" "$RAW/$1.log" "$TWINSAN_BIN_BASE" twinsan-base ;;
        twinsan-*)
            twinsan_start "${1#twinsan-}" "$RAW/$1.log"
            if [ -n "${TWINSAN_METRICS:-}" ]; then scraper_start "$RAW/$1.scrape.log"; fi
            ;;
    esac
    # A login + INQUIRY proves the target is usable before fio relies on it.
    local url iqn port
    iqn="$(server_iqn "$1")"; port="$(server_port "$1")"
    url="iscsi://${HOST}:${port}/${iqn}/1"
    # Retried for up to ~10 s: a server may open its port before its LUNs are ready.
    local i ok=0
    for ((i = 0; i < 20; i++)); do
        if timeout 10 iscsi-inq -i "$FIO_INITIATOR" "$url" >"$RAW/inq.$1.txt" 2>&1; then ok=1; break; fi
        sleep 0.5
    done
    if [ "$ok" != 1 ]; then
        cat "$RAW/inq.$1.txt" >&2
        die "$1 accepts TCP on ${HOST}:${port} but iSCSI login/INQUIRY on ${url} keeps failing"
    fi
}
server_stop() {
    case "$1" in
        tgt) tgt_stop ;;
        twinsan-*) twinsan_stop ;;
    esac
}
server_iqn() { if [ "$1" = tgt ]; then echo "$TGT_IQN"; else echo "$TWINSAN_IQN"; fi; }
server_port() { if [ "$1" = tgt ]; then echo "$TGT_PORT"; else echo "$TWINSAN_PORT"; fi; }

# ------------------------------------------------------------------ fio
FAILURES=0
run_job() {  # server job-spec rep
    local server="$1" spec="$2" rep="$3" name rw bs qd out filename rc=0 pid
    IFS='|' read -r name rw bs qd <<<"$spec"
    out="$RAW/${server}__${name}__${rep}"
    filename="$(fio_iscsi_filename "$HOST" "$(server_port "$server")" "$(server_iqn "$server")" 1)"
    log "${server}: ${name} (rep ${rep}/${REPEAT}, ${RAMP}+${RUNTIME} s)"
    if [ "$server" = tgt ]; then pid="$TGT_PID"; else pid="$TWINSAN_PID"; fi
    # Server CPU (utime + stime) is sampled around the run into ${out}.cpu; the report uses it
    # for the "Server CPU per I/O" table (every server) and the new/base table.
    run_cpu_sampled "${out}.cpu" "$RAMP" "server=${pid}" \
        timeout --kill-after=10 $((RUNTIME + RAMP + 60)) \
        "$FIO" --name="$name" --ioengine=libiscsi --filename="$filename" \
        --initiator="$FIO_INITIATOR" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --size="${SIZE_MIB}M" --runtime="$RUNTIME" --ramp_time="$RAMP" --time_based \
        --norandommap --randrepeat=0 --lat_percentiles=1 \
        --output-format=json --output="${out}.json" >"${out}.stderr" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        FAILURES=$((FAILURES + 1))
        { echo "fio exit ${rc}"; tail -n 5 "${out}.stderr"; } >"${out}.failed"
        rm -f "${out}.json"
        log "${server}: ${name} FAILED (fio exit ${rc}; see ${out}.stderr)"
    fi
}

# Fail fast, before spending minutes on tgt, if twinsan cannot start and serve LUN 1.
for server in "${TWINSAN_SERVERS[@]}"; do
    [[ " ${SERVERS[*]} " == *" ${server} "* ]] || continue
    log "checking that ${server} starts and serves ${TWINSAN_IQN} LUN 1"
    server_start "$server" smoke
    server_stop "$server"
done

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
T0="$(now_s)"
for ((rep = 1; rep <= REPEAT; rep++)); do
    # The order rotates by one server every repetition, so order effects cancel out.
    n="${#SERVERS[@]}"
    order=()
    for ((k = 0; k < n; k++)); do order+=("${SERVERS[$(((k + rep - 1) % n))]}"); done
    for spec in "${JOBS[@]}"; do
        for server in "${order[@]}"; do
            server_start "$server" "${spec%%|*}.$rep"
            run_job "$server" "$spec" "$rep"
            server_stop "$server"
        done
    done
done
BENCH_SECS="$(elapsed "$T0")"
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
order_note="order per job: ${SERVERS[*]}"
[ "${#SERVERS[@]}" -ge 2 ] && [ "$REPEAT" -gt 1 ] && order_note="${order_note} (rotated by one every repetition)"
busy_note=""
if awk -v l="${LOAD_START%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    busy_note="The machine was busy when the run started (1-min load ${LOAD_START%% *} on $(nproc) CPUs): other work competed for CPU; absolute numbers are low, the ratio is what counts."
    log "warning: ${busy_note}"
fi

# ------------------------------------------------------------------ report
tgt_ver="$(dpkg-query -W -f='${Version}' tgt 2>/dev/null || echo unknown)"
libiscsi_ver="$(dpkg-query -W -f='${Version}' libiscsi7 2>/dev/null || echo unknown)"
twinsan_ver="not run"
if [ "${#TWINSAN_SERVERS[@]}" -gt 0 ] && [ "${BENCH_ONLY:-both}" != tgt ]; then
    twinsan_ver="$("$TWINSAN_BIN" --version 2>/dev/null | head -n1 || true)"
    twinsan_ver="${twinsan_ver:-unknown} ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit'))"
fi
base_fact=""
if [ -n "$TWINSAN_BIN_BASE" ] && [ "${BENCH_ONLY:-both}" != tgt ]; then
    base_fact="$("$TWINSAN_BIN_BASE" --version 2>/dev/null | head -n1 || true): ${TWINSAN_BIN_BASE} (sha256 $(sha256sum "$TWINSAN_BIN_BASE" | cut -c1-12)), io_engine = ${BASE_ENGINE}, otherwise configured as twinsan-${BASE_ENGINE}; new binary ${TWINSAN_BIN} (sha256 $(sha256sum "$TWINSAN_BIN" | cut -c1-12))"
    if [ -n "${TWINSAN_METRICS:-}" ]; then
        base_fact="${base_fact}; metrics: the new servers with metrics_listen = ${TWINSAN_METRICS}, scraped once a second, twinsan-base without"
    fi
fi
fs_type="$(stat -f -c %T "$FILE" 2>/dev/null || echo unknown)"
DATE="$(date +%Y-%m-%d)"
OUT="${BENCH_OUT:-$REPO/benches/results/compare-tgt-${DATE}.md}"
if [ -z "${BENCH_OUT:-}" ] && [ -e "$OUT" ]; then
    OUT="$REPO/benches/results/compare-tgt-${DATE}-$(date +%H%M%S).md"
fi
mkdir -p "$(dirname "$OUT")"

python3 - "$RAW/meta.json" <<PY
import json, sys
jobs = []
for spec in """$(printf '%s\n' "${JOBS[@]}")""".split():
    name, rw, bs, qd = spec.split("|")
    jobs.append({"name": name, "rw": rw, "bs": bs, "iodepth": int(qd)})
facts = [
    ["date", "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"],
    ["machine", "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)"],
    ["kernel", "$(uname -r)"],
    ["tgt", "$tgt_ver (tgtd, bstype rdwr${TGT_BSOPTS:+, $TGT_BSOPTS}, portal $HOST:$TGT_PORT)"],
    ["twinsan", "$twinsan_ver (direct = ${TWINSAN_DIRECT:-true}, worker_threads = ${TWINSAN_WORKER_THREADS:-0}, io_threads = ${TWINSAN_IO_THREADS:-0}, io_engine = ${TWINSAN_ENGINES:-io_uring,threads} each as its own server, portal $HOST:$TWINSAN_PORT)"],
    ["client", "$("$FIO" --version) with libiscsi engine, libiscsi $libiscsi_ver, one job, one session per run"],
    ["backing file", "$SIZE_MIB MiB on $fs_type ($FILE), filled with random data before the first job; both servers serve the same file, one at a time"],
    ["per job", "$RAMP s ramp + $RUNTIME s measured (--time_based), $order_note, repetitions: $REPEAT, wall time $BENCH_SECS s"],
    ["load average (1/5/15 min)", "start $LOAD_START, end $LOAD_END"],
]
if """$base_fact""":
    facts.insert(5, ["twinsan-base", """$base_fact"""])
notes = [
    "fio prints 'queue depth will be capped at 1' for the libiscsi engine (it is flagged FIO_SYNCIO) but it does keep iodepth commands in flight (Little's law on the numbers confirms it).",
    "Loopback numbers: the client, the target and the page cache share the same $(nproc) CPUs, so this compares CPU efficiency more than storage speed. Compare within one report, as a ratio.",
    "Raw fio JSON and server logs: target/bench/$STAMP/.",
]
if """$busy_note""":
    notes.insert(0, """$busy_note""")
json.dump({"date": "$DATE", "servers": "${SERVERS[*]}".split(), "repeat": $REPEAT,
           "jobs": jobs, "facts": facts, "notes": notes}, open(sys.argv[1], "w"), indent=1)
PY

report_rc=0
python3 "$REPO/benches/fio_report.py" "$RAW" "$RAW/meta.json" >"$OUT" || report_rc=$?
cp "$OUT" "$RAW/report.md"
cat "$OUT"
log "report written to ${OUT}"
if [ "$FAILURES" -gt 0 ] || [ "$report_rc" -ne 0 ]; then
    die "${FAILURES} fio run(s) failed; see the Failures section"
fi
