#!/usr/bin/env bash
# What synchronous replication costs (issue 12 item 2): one replicated pair (host A primary,
# host B secondary: two twinsan daemons on 127.0.0.1 with their own ports, data dirs, control
# sockets and backing files, protocol C over a loopback replication link) and one unreplicated
# twinsan on the same kind of backing file, measured in the same run under fio with the
# libiscsi engine, alternating between the two setups job by job (order rotated every
# repetition), several repetitions; paired ratios replicated/unreplicated per repetition with
# median and range, as compare-tgt.sh does.
#
# Usage: benches/replication.sh
#
# Sections (BENCH_SECTIONS, default all four):
#   main    the job list below on both setups: IOPS, MiB/s, mean and p99 latency, and the CPU
#           seconds per million I/Os of every server process (primary, secondary,
#           unreplicated): utime + stime from /proc/PID/stat, sampled at the end of fio's
#           ramp and after the run, divided by the I/Os fio completed.
#   resync  full resync (invalidate on B) throughput with resync_rate capped
#           (BENCH_RESYNC_RATE) and uncapped, each without and with application writes on A
#           (4k random writes QD8). The pair is restarted with each resync_rate.
#   delay   the replication link through benches/delay_proxy.py (a user-space TCP proxy; this
#           kernel has no netem) with 0 and with BENCH_DELAY_US added to each direction,
#           alternating per repetition: the added write latency against the round trip.
#   volumes one pair with BENCH_VOLUMES replicated LUNs (each its own volume and replication
#           link): per job of BENCH_VOLUME_JOBS, LUN 0 written alone and all LUNs written at
#           once (one fio job per LUN, the same job each), alternating per repetition: the
#           aggregate against the one volume's rate, and each volume's share.
#
# All servers of the main section are started once, before the first job, and run until the
# end (idle ones only exchange pings); before every replicated measurement the pair must be
# Connected and UpToDate/UpToDate with nothing out of sync (`twinsan status --json`).
# Every process is stopped by the PID recorded when it was started, also on failure and Ctrl-C.
# Writes a markdown report to benches/results/replication-<date>.md (printed too); raw fio
# JSON, CPU samples, status snapshots, configurations and daemon logs in target/bench/repl-<stamp>/.
#
# Environment (all optional):
#   BENCH_RUNTIME=20            seconds measured per job (fio --runtime, --time_based)
#   BENCH_RAMP=3                seconds of ramp before measuring (fio --ramp_time)
#   BENCH_REPEAT=3              repetitions of the whole job list (1..20)
#   BENCH_SIZE_MIB=1024         backing file size (each server has its own copy; the data area
#                               fio uses is the pair's usable size, the same on all setups)
#   BENCH_JOBS=a,b              subset of jobs by name (default: all five, see JOBS below)
#   BENCH_SECTIONS=main,resync,delay
#   BENCH_DIR=DIR               scratch dir for the backing files and data dirs (default: first
#                               non-tmpfs of $TMPDIR, /tmp, /var/tmp, <repo>/target)
#   BENCH_OUT=PATH              report path (default benches/results/replication-<date>.md)
#   BENCH_PORT_BASE=3300        first TCP port; each binary uses 10 (iSCSI A, B, unreplicated,
#                               replication A, B, proxies): 3300-3309 new, 3310-3319 base;
#                               the volumes section 3320 on (iSCSI A, B, two per volume)
#   BENCH_RESYNC_RATE=200M      the capped resync_rate of the resync section
#   BENCH_RESYNC_UNCAPPED=100G  the "uncapped" resync_rate (the setting has no "off")
#   BENCH_RESYNC_SECS=BENCH_RUNTIME   longest measured stretch of one resync case
#   BENCH_DELAY_US=200          delay added to each direction of the replication link
#   BENCH_DELAY_JOBS=randwrite-4k-qd1,randwrite-4k-qd32   jobs of the delay section
#   BENCH_VOLUMES=4             replicated LUNs of the volumes section (2..8)
#   BENCH_VOLUME_SIZE_MIB=256   backing file size of each of them
#   BENCH_VOLUME_JOBS=randwrite-4k-qd32,seqwrite-1m-qd8   jobs of the volumes section
#   TWINSAN_DIRECT=false        the LUNs' `direct` setting; false (page cache) is the default,
#                               like the issue's measurement; true = O_DIRECT
#   TWINSAN_ENGINE=auto         `server.io_engine` of every server (auto, io_uring, threads)
#   TWINSAN_WORKER_THREADS=0    `server.worker_threads`; TWINSAN_IO_THREADS=0 `server.io_threads`
#   TWINSAN_BIN=<repo>/target/release/twinsan   TWINSAN_FIO=<fio with libiscsi>
#   TWINSAN_BIN_BASE=PATH       an older twinsan binary (refactor check): the replicated pair
#                               and the unreplicated server run with both binaries (setups
#                               replicated-base, unreplicated-base, in the same rotation) and
#                               the report adds paired ratios new/base per job (IOPS, CPU per
#                               I/O) with median and range. Main section only.
#   RUST_LOG=warn               log level of the daemons while measuring
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

HOST=127.0.0.1
IQN="iqn.2026-11.org.twinsan.bench:repl"
FIO_INITIATOR="iqn.2026-11.org.twinsan.bench:fio"
VOLUME="r0"
SECRET="bench-replication-secret"
RUNTIME="${BENCH_RUNTIME:-20}"
RAMP="${BENCH_RAMP:-3}"
REPEAT="${BENCH_REPEAT:-3}"
SIZE_MIB="${BENCH_SIZE_MIB:-1024}"
PORT_BASE="${BENCH_PORT_BASE:-3300}"
RESYNC_RATE="${BENCH_RESYNC_RATE:-200M}"
RESYNC_UNCAPPED="${BENCH_RESYNC_UNCAPPED:-100G}"
RESYNC_SECS="${BENCH_RESYNC_SECS:-$RUNTIME}"
DELAY_US="${BENCH_DELAY_US:-200}"
NVOL="${BENCH_VOLUMES:-4}"
VOL_SIZE_MIB="${BENCH_VOLUME_SIZE_MIB:-256}"
DIRECT="${TWINSAN_DIRECT:-false}"
ENGINE="${TWINSAN_ENGINE:-auto}"
TWINSAN_BIN="${TWINSAN_BIN:-$REPO/target/release/twinsan}"
TWINSAN_BIN_BASE="${TWINSAN_BIN_BASE:-}"
FIO="$(fio_bin)"
export RUST_LOG="${RUST_LOG:-warn}"

# name|rw|bs|iodepth|rwmixread
JOBS=(
    "randwrite-4k-qd1|randwrite|4k|1|"
    "randwrite-4k-qd32|randwrite|4k|32|"
    "seqwrite-1m-qd8|write|1M|8|"
    "randread-4k-qd32|randread|4k|32|"
    "randrw70-4k-qd32|randrw|4k|32|70"
)
ALL_JOBS=("${JOBS[@]}")

# ------------------------------------------------------------------ arguments
for v in RUNTIME RAMP REPEAT SIZE_MIB PORT_BASE RESYNC_SECS DELAY_US NVOL VOL_SIZE_MIB; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "${v} must be a whole number (got '${!v}')"
done
if [ "$RUNTIME" -lt 1 ] || [ "$RUNTIME" -gt 3600 ]; then die "BENCH_RUNTIME must be 1..3600 s"; fi
if [ "$RAMP" -gt 600 ]; then die "BENCH_RAMP must be 0..600 s"; fi
if [ "$REPEAT" -lt 1 ] || [ "$REPEAT" -gt 20 ]; then die "BENCH_REPEAT must be 1..20"; fi
if [ "$SIZE_MIB" -lt 64 ]; then die "BENCH_SIZE_MIB must be at least 64"; fi
if [ "$RESYNC_SECS" -lt 1 ] || [ "$RESYNC_SECS" -gt 3600 ]; then die "BENCH_RESYNC_SECS must be 1..3600"; fi
if [ "$DELAY_US" -gt 100000 ]; then die "BENCH_DELAY_US must be at most 100000"; fi
if [ "$NVOL" -lt 2 ] || [ "$NVOL" -gt 8 ]; then die "BENCH_VOLUMES must be 2..8"; fi
if [ "$VOL_SIZE_MIB" -lt 64 ]; then die "BENCH_VOLUME_SIZE_MIB must be at least 64"; fi
if [ "$PORT_BASE" -lt 1024 ] || [ "$PORT_BASE" -gt 65000 ]; then die "BENCH_PORT_BASE must be 1024..65000"; fi
case "$DIRECT" in true|false) ;; *) die "TWINSAN_DIRECT must be true or false" ;; esac
case "$ENGINE" in auto|io_uring|threads) ;; *) die "TWINSAN_ENGINE must be auto, io_uring or threads" ;; esac

select_jobs() {  # comma list -> SELECTED
    local w j found
    SELECTED=()
    IFS=',' read -r -a want <<<"$1"
    for w in "${want[@]}"; do
        found=0
        for j in "${ALL_JOBS[@]}"; do [ "${j%%|*}" = "$w" ] && { SELECTED+=("$j"); found=1; }; done
        [ "$found" = 1 ] || die "unknown job '${w}' (jobs: $(printf '%s ' "${ALL_JOBS[@]%%|*}"))"
    done
}
if [ -n "${BENCH_JOBS:-}" ]; then select_jobs "$BENCH_JOBS"; JOBS=("${SELECTED[@]}"); fi
select_jobs "${BENCH_DELAY_JOBS:-randwrite-4k-qd1,randwrite-4k-qd32}"
DELAY_JOBS=("${SELECTED[@]}")
select_jobs "${BENCH_VOLUME_JOBS:-randwrite-4k-qd32,seqwrite-1m-qd8}"
VOLUME_JOBS=("${SELECTED[@]}")

SECTIONS=",${BENCH_SECTIONS:-main,resync,delay,volumes},"
for s in ${SECTIONS//,/ }; do
    case "$s" in main|resync|delay|volumes) ;; *) die "BENCH_SECTIONS: unknown section '${s}' (main, resync, delay, volumes)" ;; esac
done
want_section() { [[ "$SECTIONS" == *",$1,"* ]]; }

VARIANTS=(new)
if [ -n "$TWINSAN_BIN_BASE" ]; then
    [ -x "$TWINSAN_BIN_BASE" ] || die "TWINSAN_BIN_BASE ${TWINSAN_BIN_BASE} is not an executable"
    VARIANTS+=(base)
fi
bin_of() { if [ "$1" = base ]; then echo "$TWINSAN_BIN_BASE"; else echo "$TWINSAN_BIN"; fi; }
# Ports of variant index I: iSCSI A, B, unreplicated = +0, +1, +2; replication listen A, B =
# +3, +4; delay proxies A->B, B->A = +5, +6. The volumes section's pair (variant "vol"): iSCSI
# A, B = +20, +21, replication listen of volume I on A, B = +22 + 2I, +23 + 2I.
port_of() {  # variant role
    local off=0
    [ "$1" = base ] && off=10
    if [ "$1" = vol ]; then
        case "$2" in
            a) echo $((PORT_BASE + 20)) ;;
            b) echo $((PORT_BASE + 21)) ;;
            rla*) echo $((PORT_BASE + 22 + 2 * ${2#rla})) ;;
            rlb*) echo $((PORT_BASE + 23 + 2 * ${2#rlb})) ;;
        esac
        return
    fi
    case "$2" in
        a) echo $((PORT_BASE + off)) ;;
        b) echo $((PORT_BASE + off + 1)) ;;
        s) echo $((PORT_BASE + off + 2)) ;;
        rla) echo $((PORT_BASE + off + 3)) ;;
        rlb) echo $((PORT_BASE + off + 4)) ;;
        pab) echo $((PORT_BASE + off + 5)) ;;
        pba) echo $((PORT_BASE + off + 6)) ;;
    esac
}

# ------------------------------------------------------------------ preflight
if ! { [ -x "$FIO" ] && "$FIO" --enghelp 2>/dev/null | grep -qw libiscsi; }; then
    die "fio with libiscsi engine not found at ${FIO} (run scripts/install-deps.sh or set TWINSAN_FIO)"
fi
command -v iscsi-inq >/dev/null || die "iscsi-inq not found (run scripts/install-deps.sh)"
command -v python3 >/dev/null || die "python3 not found"
[ -x "$TWINSAN_BIN" ] || die "twinsan binary not found at ${TWINSAN_BIN}: build it with
    cargo build --release --bin twinsan
or point TWINSAN_BIN at it"
for var in "${VARIANTS[@]}"; do
    for r in a b s rla rlb pab pba; do
        p="$(port_of "$var" "$r")"
        if port_open "$HOST" "$p"; then die "${HOST}:${p} is already in use (set BENCH_PORT_BASE)"; fi
    done
done
if [[ "$SECTIONS" == *",volumes,"* ]]; then
    for ((p = PORT_BASE + 20; p < PORT_BASE + 22 + 2 * NVOL; p++)); do
        if port_open "$HOST" "$p"; then die "${HOST}:${p} is already in use (set BENCH_PORT_BASE)"; fi
    done
fi

NEED_MIB=$((SIZE_MIB * (1 + 3 * ${#VARIANTS[@]}) + VOL_SIZE_MIB * (1 + 2 * NVOL)))
base_dir="$(bench_base_dir "$NEED_MIB")" || die "no non-tmpfs directory with room for ${NEED_MIB} MiB of backing files (set BENCH_DIR)"
WORK="$(mktemp -d "${base_dir%/}/twinsan-repl-bench.XXXXXX")"
STAMP="$(date +%Y%m%d-%H%M%S)"
RAW="$REPO/target/bench/repl-$STAMP"
mkdir -p "$RAW"

# ------------------------------------------------------------------ processes
declare -A PIDS=()      # "<variant>-<a|b|s>" -> daemon PID
PROXY_PID=""
FIO_BG_PID=""
stop_all_daemons() {
    local k
    # The secondaries first: a primary that loses its peer while stopping would start a new
    # data generation.
    for k in "${!PIDS[@]}"; do
        if [[ "$k" == *-b ]]; then stop_pid "${PIDS[$k]}" 20 || true; unset "PIDS[$k]"; fi
    done
    for k in "${!PIDS[@]}"; do stop_pid "${PIDS[$k]}" 20 || true; unset "PIDS[$k]"; done
    return 0
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$RUN_CPU_CHILD" 5 || true
    stop_pid "$FIO_BG_PID" 5 || true
    stop_all_daemons
    stop_pid "$PROXY_PID" 5 || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------ configuration
dir_of() { echo "$WORK/$1/$2"; }   # variant role

server_toml() {  # DIR PORT: the [server] section and the target, LUNs to follow
    cat <<TOML
[server]
data_dir = "$1/data"
control_socket = "$1/data/twinsan.sock"
worker_threads = ${TWINSAN_WORKER_THREADS:-0}
io_engine = "$ENGINE"
io_threads = ${TWINSAN_IO_THREADS:-0}

[[target]]
iqn = "$IQN"
portals = ["$HOST:$2"]
TOML
}

write_config() {  # variant role(a|b|s) [resync_rate] [proxied]
    local var="$1" r="$2" rate="${3:-$RESYNC_UNCAPPED}" proxied="${4:-0}" d listen peer role
    d="$(dir_of "$var" "$r")"
    mkdir -p "$d/data"
    {
        server_toml "$d" "$(port_of "$var" "$r")"
        cat <<TOML

[[target.lun]]
number = 0
path = "$d/disk.img"
direct = $DIRECT
TOML
        if [ "$r" != s ]; then
            if [ "$r" = a ]; then
                role=primary; listen="$(port_of "$var" rla)"
                if [ "$proxied" = 1 ]; then peer="$(port_of "$var" pab)"; else peer="$(port_of "$var" rlb)"; fi
            else
                role=secondary; listen="$(port_of "$var" rlb)"
                if [ "$proxied" = 1 ]; then peer="$(port_of "$var" pba)"; else peer="$(port_of "$var" rla)"; fi
            fi
            cat <<TOML

[target.lun.replication]
name = "$VOLUME"
listen = "$HOST:$listen"
peer = "$HOST:$peer"
secret = "$SECRET"
meta = "internal"
role = "$role"
resync_rate = "$rate"
TOML
        fi
    } >"$d/twinsan.toml"
}

start_daemon() {  # variant role tag
    local var="$1" r="$2" tag="$3" d bin logf pid
    d="$(dir_of "$var" "$r")"; bin="$(bin_of "$var")"
    logf="$RAW/${var}-${r}.log"
    cp "$d/twinsan.toml" "$RAW/${var}-${r}.${tag}.toml"
    printf '==== bench: start (%s) %s\n' "$tag" "$(date -u +%T)" >>"$logf"
    "$bin" serve --config "$d/twinsan.toml" >>"$logf" 2>&1 &
    pid=$!
    PIDS["$var-$r"]=$pid
    # Every daemon answers on its control socket once it runs; the primary and the unreplicated
    # one also serve iSCSI.
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$logf" >&2; die "${var}-${r}: twinsan exited at startup; log ${logf}"; }
        if "$bin" status --json --config "$d/twinsan.toml" >/dev/null 2>&1; then break; fi
        sleep 0.1
    done
    [ "$i" -lt 300 ] || die "${var}-${r}: no answer on the control socket after 30 s; log ${logf}"
}

stop_daemon() {  # variant role
    stop_pid "${PIDS[$1-$2]:-}" 20
    unset "PIDS[$1-$2]"
}

# vol_state VARIANT ROLE [VOLUME]: one line "connection disk peer_disk oos resync_sent
# resync_received size role" of the replicated volume (or "unreachable").
vol_state() {
    local d bin
    d="$(dir_of "$1" "$2")"; bin="$(bin_of "$1")"
    timeout 10 "$bin" status --json --config "$d/twinsan.toml" 2>/dev/null | python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)
    v = [x for x in d.get("volumes", []) if x.get("name") == sys.argv[1]][0]
    print(v["connection"], v["disk_state"], v.get("peer_disk_state") or "-", v["out_of_sync_bytes"],
          v["resync_sent_bytes"], v["resync_received_bytes"], v["size_bytes"], v["role"])
except Exception:
    print("unreachable")
' "${3:-$VOLUME}" || echo unreachable
}

in_sync() {  # "state line"
    local c d p o
    read -r c d p o _ <<<"$1"
    [ "$c" = Connected ] && [ "$d" = UpToDate ] && [ "$p" = UpToDate ] && [ "$o" = 0 ]
}

volumes_of() {  # variant: the names of its replicated volumes
    if [ "$1" = vol ]; then
        local i
        for ((i = 0; i < NVOL; i++)); do echo "v$i"; done
    else
        echo "$VOLUME"
    fi
}

wait_in_sync() {  # variant seconds: every volume of the pair
    local var="$1" secs="$2" i sa sb v ok
    for ((i = 0; i < secs * 5; i++)); do
        ok=1
        for v in $(volumes_of "$var"); do
            sa="$(vol_state "$var" a "$v")"; sb="$(vol_state "$var" b "$v")"
            if ! in_sync "$sa" || ! in_sync "$sb"; then ok=0; sa="${v}: ${sa}"; sb="${v}: ${sb}"; break; fi
        done
        if [ "$ok" = 1 ]; then return 0; fi
        kill -0 "${PIDS[$var-a]:-0}" 2>/dev/null || die "${var}-a exited; log $RAW/${var}-a.log"
        kill -0 "${PIDS[$var-b]:-0}" 2>/dev/null || die "${var}-b exited; log $RAW/${var}-b.log"
        sleep 0.2
    done
    die "${var} pair not Connected + UpToDate/UpToDate after ${secs} s (A: ${sa}; B: ${sb}); logs $RAW/${var}-[ab].log"
}

check_serving() {  # variant role
    local url ok=0 i
    url="iscsi://${HOST}:$(port_of "$1" "$2")/${IQN}/0"
    for ((i = 0; i < 20; i++)); do
        if timeout 10 iscsi-inq -i "$FIO_INITIATOR" "$url" >"$RAW/inq.$1-$2.txt" 2>&1; then ok=1; break; fi
        sleep 0.5
    done
    [ "$ok" = 1 ] || { cat "$RAW/inq.$1-$2.txt" >&2; die "$1-$2: iSCSI login/INQUIRY on ${url} keeps failing"; }
}

start_pair() {  # variant tag [resync_rate] [proxied]
    write_config "$1" a "${3:-}" "${4:-0}"
    write_config "$1" b "${3:-}" "${4:-0}"
    start_daemon "$1" a "$2"
    start_daemon "$1" b "$2"
    wait_in_sync "$1" 120
    check_serving "$1" a
}
stop_pair() { stop_daemon "$1" b; stop_daemon "$1" a; }

# create_md BIN CONFIG VOLUME TOKEN LABEL: fresh metadata on identical replicas (no initial
# sync); prints the volume's usable size in bytes. Output kept in $RAW/create-md.LABEL.txt.
create_md() {
    local out u
    out="$("$1" replication create-md --config "$2" --volume "$3" \
        --initial-sync skip-identical --skip-token "$4" 2>&1)" \
        || die "$5: create-md of $3 failed: ${out}"
    printf '%s\n' "$out" >"$RAW/create-md.$5.txt"
    u="$(grep -o 'size [0-9]* bytes' <<<"$out" | awk '{print $2}' | head -n1)"
    [ -n "$u" ] || die "$5: no usable size in create-md output: ${out}"
    echo "$u"
}

# ------------------------------------------------------------------ backing files
SRC="$WORK/source.img"
timed "precondition ${SIZE_MIB} MiB" make_backing_file "$SRC" "$SIZE_MIB"
USABLE=""
for var in "${VARIANTS[@]}"; do
    for r in a b s; do
        mkdir -p "$(dir_of "$var" "$r")"
        cp --sparse=never "$SRC" "$(dir_of "$var" "$r")/disk.img"
    done
    write_config "$var" a
    write_config "$var" b
    write_config "$var" s
    # Both replicas hold the same bytes: no initial sync (as for new, identical disks).
    for r in a b; do
        u="$(create_md "$(bin_of "$var")" "$(dir_of "$var" "$r")/twinsan.toml" "$VOLUME" \
            "bench-$STAMP" "${var}-${r}")" || exit 1
        if [ -z "$USABLE" ] || [ "$u" -lt "$USABLE" ]; then USABLE="$u"; fi
    done
done
rm -f "$SRC"
# fio's region: the pair's usable size in whole MiB, on every setup alike.
FIO_MIB=$((USABLE / 1048576))
log "usable size ${USABLE} bytes; fio uses the first ${FIO_MIB} MiB"

# ------------------------------------------------------------------ fio
FAILURES=0
# run_fio OUT_PREFIX PORT SPEC PROCS [RUNTIME] [LUNS]: one fio run against LUN 0 at PORT (or
# one fio job per LUN of the space-separated LUNS, all at once, each the whole SPEC), server
# CPU sampled for PROCS ("label=pid ...").
run_fio() {
    local out="$1" port="$2" spec="$3" procs="$4" runtime="${5:-$RUNTIME}" luns="${6:-0}" name rw bs qd mix rc=0 lun
    IFS='|' read -r name rw bs qd mix <<<"$spec"
    local -a extra=() targets=()
    [ -n "$mix" ] && extra+=("--rwmixread=$mix")
    for lun in $luns; do
        if [ "$luns" = 0 ]; then targets+=(--name="$name"); else targets+=(--name="${name}-lun${lun}"); fi
        targets+=(--filename="$(fio_iscsi_filename "$HOST" "$port" "$IQN" "$lun")")
    done
    # Options before the first --name apply to every job.
    run_cpu_sampled "${out}.cpu" "$RAMP" "$procs" \
        timeout --kill-after=10 $((runtime + RAMP + 60)) \
        "$FIO" --ioengine=libiscsi --initiator="$FIO_INITIATOR" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 "${extra[@]}" \
        --size="${FIO_MIB}M" --runtime="$runtime" --ramp_time="$RAMP" --time_based \
        --norandommap --randrepeat=0 --lat_percentiles=1 \
        "${targets[@]}" \
        --output-format=json --output="${out}.json" >"${out}.stderr" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        FAILURES=$((FAILURES + 1))
        { echo "fio exit ${rc}"; tail -n 5 "${out}.stderr"; } >"${out}.failed"
        rm -f "${out}.json"
        log "${name} FAILED (fio exit ${rc}; see ${out}.stderr)"
    fi
    return 0
}

# Setups of the main section: replicated / unreplicated per binary.
SETUPS=()
for var in "${VARIANTS[@]}"; do
    if [ "$var" = new ]; then SETUPS+=(replicated unreplicated); else SETUPS+=(replicated-base unreplicated-base); fi
done
setup_var() { if [[ "$1" == *-base ]]; then echo base; else echo new; fi; }

measure() {  # setup spec rep
    local setup="$1" spec="$2" rep="$3" var procs port
    var="$(setup_var "$setup")"
    if [[ "$setup" == replicated* ]]; then
        wait_in_sync "$var" 120
        vol_state "$var" a >"$RAW/${setup}__${spec%%|*}__${rep}.status-before"
        procs="primary=${PIDS[$var-a]} secondary=${PIDS[$var-b]}"
        port="$(port_of "$var" a)"
    else
        procs="server=${PIDS[$var-s]}"
        port="$(port_of "$var" s)"
    fi
    log "${setup}: ${spec%%|*} (rep ${rep}/${REPEAT}, ${RAMP}+${RUNTIME} s)"
    run_fio "$RAW/${setup}__${spec%%|*}__${rep}" "$port" "$spec" "$procs"
    for p in $procs; do
        kill -0 "${p#*=}" 2>/dev/null || die "${setup}: ${p%%=*} (pid ${p#*=}) died during ${spec%%|*}; logs in ${RAW}"
    done
}

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
T0="$(now_s)"
MAIN_SECS=""
if want_section main; then
    for var in "${VARIANTS[@]}"; do
        log "starting the ${var} servers ($(bin_of "$var"))"
        start_pair "$var" main
        start_daemon "$var" s main
        check_serving "$var" s
    done
    for ((rep = 1; rep <= REPEAT; rep++)); do
        n="${#SETUPS[@]}"
        for spec in "${JOBS[@]}"; do
            for ((k = 0; k < n; k++)); do
                measure "${SETUPS[$(((k + rep - 1) % n))]}" "$spec" "$rep"
            done
        done
    done
    # The replicas must still agree at the end.
    for var in "${VARIANTS[@]}"; do wait_in_sync "$var" 120; done
    MAIN_SECS="$(elapsed "$T0")"
    stop_all_daemons
fi

# ------------------------------------------------------------------ resync
# One case: restart the pair with resync_rate RATE, invalidate B (its whole replica out of
# sync and Inconsistent: a full resync from A), follow the resync bytes on A for at most
# RESYNC_SECS (or until in sync), optionally with fio writing on A meanwhile.
RESYNC_LINES=()
resync_case() {  # label rate with_app(0|1)
    local label="$1" rate="$2" app="$3" t_start t_end s0 s1 st i done_flag=0
    log "resync: ${label} (resync_rate ${rate}, application writes: ${app})"
    # info from the replication crate: its "resync finished" line has the resync's own rate.
    RUST_LOG="${RUST_LOG},twinsan_replication=info" start_pair new "resync-${label}" "$rate"
    local out inv
    out="$RAW/resync__${label}"
    inv="$(timeout 30 "$TWINSAN_BIN" replication invalidate --config "$(dir_of new b)/twinsan.toml" --volume "$VOLUME" 2>&1)" \
        || die "invalidate on B failed: ${inv}"
    t_start="$(now_s)"
    read -r _ _ _ _ s0 _ <<<"$(vol_state new a)"
    [[ "$s0" =~ ^[0-9]+$ ]] || s0=0
    if [ "$app" = 1 ]; then
        # 4k random writes QD8 on the primary for the whole stretch (no ramp: resync starts now).
        ( trap 'stop_pid "$RUN_CPU_CHILD" 5; exit 143' TERM
          RAMP=0; run_fio "${out}" "$(port_of new a)" "randwrite-4k-qd8|randwrite|4k|8|" \
            "primary=${PIDS[new-a]} secondary=${PIDS[new-b]}" "$RESYNC_SECS" ) &
        FIO_BG_PID=$!
    fi
    st=""
    # Bounded in count and in wall time (a status call can take a while on a busy machine).
    for ((i = 0; i < RESYNC_SECS * 5; i++)); do
        sleep 0.2
        st="$(vol_state new a)"
        if in_sync "$st" && in_sync "$(vol_state new b)"; then done_flag=1; break; fi
        if awk -v s="$t_start" -v n="$(now_s)" -v l="$RESYNC_SECS" 'BEGIN { exit !(n - s >= l) }'; then break; fi
    done
    t_end="$(now_s)"
    [ -n "$st" ] || st="$(vol_state new a)"
    read -r _ _ _ _ s1 _ <<<"$st"
    [[ "$s1" =~ ^[0-9]+$ ]] || s1="$s0"
    if [ -n "$FIO_BG_PID" ]; then wait "$FIO_BG_PID" || true; FIO_BG_PID=""; fi
    printf '%s\n' "$st" >"${out}.status"
    # The sync source's own rate over the resync (first block to last ack), from its log: the
    # polling above adds up to 0.2 s to a resync that may take about a second.
    local own_kib
    own_kib="$(awk -v m="==== bench: start (resync-${label})" '/^==== bench: start / { cur = (index($0, m) == 1) }
        cur && /resync finished \(sync source\)/ { if (match($0, /at [0-9]+ KiB\/s/)) r = substr($0, RSTART + 3, RLENGTH - 9) }
        END { print (r == "" ? "-" : r) }' "$RAW/new-a.log")"
    RESYNC_LINES+=("${label}|${rate}|${app}|$((s1 - s0))|$(awk -v a="$t_start" -v b="$t_end" 'BEGIN { printf "%.2f", b - a }')|${done_flag}|${own_kib}")
    if [ "$done_flag" = 0 ]; then
        log "resync ${label}: not finished after ${RESYNC_SECS} s; waiting for it before the next case"
        wait_in_sync new $((RESYNC_SECS * 20 + 120))
    fi
    stop_pair new
}
# The application's rate without a resync: the same fio job on the pair in sync, as long.
resync_baseline() {
    local t0
    log "resync: baseline (application writes, no resync)"
    start_pair new resync-baseline
    t0="$(now_s)"
    ( RAMP=0; run_fio "$RAW/resync__baseline-app" "$(port_of new a)" "randwrite-4k-qd8|randwrite|4k|8|" \
        "primary=${PIDS[new-a]} secondary=${PIDS[new-b]}" "$RESYNC_SECS" )
    RESYNC_LINES+=("baseline-app|-|1|0|$(elapsed "$t0")|1|-")
    stop_pair new
}
if want_section resync; then
    resync_baseline
    resync_case capped "$RESYNC_RATE" 0
    resync_case capped-app "$RESYNC_RATE" 1
    resync_case uncapped "$RESYNC_UNCAPPED" 0
    resync_case uncapped-app "$RESYNC_UNCAPPED" 1
fi
printf '%s\n' "${RESYNC_LINES[@]}" >"$RAW/resync.txt"

# ------------------------------------------------------------------ delay
if want_section delay; then
    DELAY_FILE="$WORK/delay_us"
    echo 0 >"$DELAY_FILE"
    # The proxy alone (echo server behind it): its own round trip at 0 and at DELAY_US.
    timeout 30 python3 "$REPO/benches/delay_proxy.py" --calibrate "$DELAY_US" >"$RAW/delay_calibration.before.json" \
        || log "warning: delay proxy calibration failed"
    budget=$(( (RAMP + RUNTIME + 90) * ${#DELAY_JOBS[@]} * REPEAT * 2 + 300 ))
    python3 "$REPO/benches/delay_proxy.py" \
        --listen "$HOST:$(port_of new pab)" --target "$HOST:$(port_of new rlb)" \
        --listen "$HOST:$(port_of new pba)" --target "$HOST:$(port_of new rla)" \
        --delay-file "$DELAY_FILE" --stats-file "$RAW/delay_link_stats.json" \
        --max-seconds "$budget" >>"$RAW/delay_proxy.log" 2>&1 &
    PROXY_PID=$!
    wait_port "$HOST" "$(port_of new pab)" 10 "$PROXY_PID" || die "delay proxy did not start; log $RAW/delay_proxy.log"
    start_pair new delay "" 1
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for spec in "${DELAY_JOBS[@]}"; do
            if [ $((rep % 2)) = 1 ]; then order=(0 "$DELAY_US"); else order=("$DELAY_US" 0); fi
            for d in "${order[@]}"; do
                # The label makes the proxy measure this run's actual link transit times.
                echo "$d delay${d}__${spec%%|*}__${rep}" >"$DELAY_FILE"
                sleep 0.5   # the proxy reads the file every 0.2 s
                wait_in_sync new 60
                log "delay ${d} us each way: ${spec%%|*} (rep ${rep}/${REPEAT})"
                run_fio "$RAW/delay${d}__${spec%%|*}__${rep}" "$(port_of new a)" "$spec" \
                    "primary=${PIDS[new-a]} secondary=${PIDS[new-b]}"
            done
        done
    done
    echo 0 >"$DELAY_FILE"
    wait_in_sync new 60
    stop_pair new
    stop_pid "$PROXY_PID" 5
    PROXY_PID=""
    timeout 30 python3 "$REPO/benches/delay_proxy.py" --calibrate "$DELAY_US" >"$RAW/delay_calibration.after.json" \
        || log "warning: delay proxy calibration failed"
fi
# ------------------------------------------------------------------ volumes
# One pair with NVOL replicated LUNs on one target, each its own volume (v0..) with its own
# replication link; per job and repetition, LUN 0 alone and all LUNs at once (order
# alternating). Setups vol1 / vol<N> in the raw file names.
write_vol_config() {  # role(a|b)
    local r="$1" d i role
    d="$(dir_of vol "$r")"
    mkdir -p "$d/data"
    role=primary; [ "$r" = b ] && role=secondary
    {
        server_toml "$d" "$(port_of vol "$r")"
        for ((i = 0; i < NVOL; i++)); do
            local listen peer
            if [ "$r" = a ]; then listen="$(port_of vol "rla$i")"; peer="$(port_of vol "rlb$i")"
            else listen="$(port_of vol "rlb$i")"; peer="$(port_of vol "rla$i")"; fi
            cat <<TOML

[[target.lun]]
number = $i
path = "$d/disk$i.img"
direct = $DIRECT

[target.lun.replication]
name = "v$i"
listen = "$HOST:$listen"
peer = "$HOST:$peer"
secret = "$SECRET"
meta = "internal"
role = "$role"
resync_rate = "$RESYNC_UNCAPPED"
TOML
        done
    } >"$d/twinsan.toml"
}

VOL_FIO_MIB=""
VOL_N_SETUP="vol${NVOL}"
if want_section volumes; then
    SRC="$WORK/vol-source.img"
    timed "precondition ${VOL_SIZE_MIB} MiB" make_backing_file "$SRC" "$VOL_SIZE_MIB"
    usable=""
    for r in a b; do
        mkdir -p "$(dir_of vol "$r")"
        write_vol_config "$r"
        for ((i = 0; i < NVOL; i++)); do
            cp --sparse=never "$SRC" "$(dir_of vol "$r")/disk$i.img"
            u="$(create_md "$TWINSAN_BIN" "$(dir_of vol "$r")/twinsan.toml" "v$i" \
                "bench-vol$i-$STAMP" "vol-${r}-v${i}")" || exit 1
            if [ -z "$usable" ] || [ "$u" -lt "$usable" ]; then usable="$u"; fi
        done
    done
    rm -f "$SRC"
    VOL_FIO_MIB=$((usable / 1048576))
    all_luns="$(seq -s ' ' 0 $((NVOL - 1)))"
    start_daemon vol a volumes
    start_daemon vol b volumes
    wait_in_sync vol 120
    check_serving vol a
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for spec in "${VOLUME_JOBS[@]}"; do
            if [ $((rep % 2)) = 1 ]; then order=(vol1 "$VOL_N_SETUP"); else order=("$VOL_N_SETUP" vol1); fi
            for setup in "${order[@]}"; do
                wait_in_sync vol 120
                luns=0; [ "$setup" = vol1 ] || luns="$all_luns"
                log "volumes: ${spec%%|*} on LUN(s) ${luns} (rep ${rep}/${REPEAT})"
                FIO_MIB="$VOL_FIO_MIB" run_fio "$RAW/${setup}__${spec%%|*}__${rep}" "$(port_of vol a)" "$spec" \
                    "primary=${PIDS[vol-a]} secondary=${PIDS[vol-b]}" "$RUNTIME" "$luns"
            done
        done
    done
    wait_in_sync vol 120
    stop_daemon vol b
    stop_daemon vol a
fi

BENCH_SECS="$(elapsed "$T0")"
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"

# ------------------------------------------------------------------ report
busy_note=""
if awk -v l="${LOAD_START%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    busy_note="The machine was busy when the run started (1-min load ${LOAD_START%% *} on $(nproc) CPUs): other work competed for CPU; absolute numbers are low, the paired ratios are what counts."
    log "warning: ${busy_note}"
fi
ver() { "$1" --version 2>/dev/null | head -n1 || echo unknown; }
new_fact="$(ver "$TWINSAN_BIN") ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit')), ${TWINSAN_BIN} (sha256 $(sha256sum "$TWINSAN_BIN" | cut -c1-12))"
base_fact=""
[ -n "$TWINSAN_BIN_BASE" ] && base_fact="$(ver "$TWINSAN_BIN_BASE"), ${TWINSAN_BIN_BASE} (sha256 $(sha256sum "$TWINSAN_BIN_BASE" | cut -c1-12))"
libiscsi_ver="$(dpkg-query -W -f='${Version}' libiscsi7 2>/dev/null || echo unknown)"
fs_type="$(stat -f -c %T "$WORK" 2>/dev/null || echo unknown)"
DATE="$(date +%Y-%m-%d)"
OUT="${BENCH_OUT:-$REPO/benches/results/replication-${DATE}.md}"
if [ -z "${BENCH_OUT:-}" ] && [ -e "$OUT" ]; then
    OUT="$REPO/benches/results/replication-${DATE}-$(date +%H%M%S).md"
fi
mkdir -p "$(dirname "$OUT")"
cache_word="page cache (direct = false: buffered I/O on the backing files, like the issue's measurement)"
[ "$DIRECT" = true ] && cache_word="O_DIRECT (direct = true)"

export R_DATE="$DATE" R_STAMP="$STAMP" R_REPEAT="$REPEAT" R_BUSY="$busy_note" R_DELAY_US="$DELAY_US" \
    R_NVOL="$NVOL" \
    R_SETUPS="${SETUPS[*]}" R_SECTIONS="$SECTIONS" R_RAMP="$RAMP" R_RUNTIME="$RUNTIME"
python3 - "$RAW/meta.json" \
    "$(printf '%s\n' "${JOBS[@]}")" "$(printf '%s\n' "${DELAY_JOBS[@]}")" "$(printf '%s\n' "${VOLUME_JOBS[@]}")" \
    "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
    "machine=$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)" \
    "kernel=$(uname -r)" \
    "twinsan=${new_fact}" \
    "twinsan-base=${base_fact}" \
    "servers=io_engine = ${ENGINE}, ${cache_word}, worker_threads = ${TWINSAN_WORKER_THREADS:-0}, io_threads = ${TWINSAN_IO_THREADS:-0}; every server its own copy of the same preconditioned file" \
    "replication=protocol C over 127.0.0.1 (A ${HOST}:$(port_of new rla) <-> B ${HOST}:$(port_of new rlb)), internal DRBD v08 metadata, create-md --initial-sync skip-identical on identical copies; the secondary writes to its own backing file" \
    "client=$("$FIO" --version) with libiscsi engine, libiscsi ${libiscsi_ver}, one job, one session per run, target the primary (replicated) or the single server" \
    "backing files=${SIZE_MIB} MiB each on ${fs_type} (${WORK}), random data; fio uses the first ${FIO_MIB} MiB (the pair's usable size) on every setup" \
    "volumes section=${NVOL} replicated LUNs of ${VOL_SIZE_MIB} MiB on one pair (one target, each LUN its own volume and replication link; fio uses the first ${VOL_FIO_MIB:-0} MiB of each)" \
    "per job=${RAMP} s ramp + ${RUNTIME} s measured (--time_based), setups per job: ${SETUPS[*]} (order rotated by one every repetition), repetitions: ${REPEAT}; main section ${MAIN_SECS:-not run} s, all ${BENCH_SECS} s" \
    "load average (1/5/15 min)=start ${LOAD_START}, end ${LOAD_END}" <<'PY'
import json, os, sys
out, jobs_txt, delay_txt, volume_txt, *facts = sys.argv[1:]
def jobs(txt):
    r = []
    for spec in txt.split():
        name, rw, bs, qd, mix = spec.split("|")
        r.append({"name": name, "rw": rw, "bs": bs, "iodepth": int(qd), "rwmixread": int(mix) if mix else None})
    return r
fl = []
for f in facts:
    k, _, v = f.partition("=")
    if v:
        fl.append([k, v])
notes = [
    "fio prints 'queue depth will be capped at 1' for the libiscsi engine (it is flagged FIO_SYNCIO) but it does keep iodepth commands in flight.",
    "Loopback: fio, both hosts of the pair and the page cache share the same CPUs, so replication's cost shows as CPU and latency, not as a network limit. Compare within one report, as paired ratios.",
    "Server CPU: utime + stime of each daemon (all threads) from /proc/PID/stat, sampled at the end of fio's ramp (RAMP seconds after fio started, give or take its login) and after fio exited, divided by the I/Os fio completed in the measured time; clock-tick resolution (10 ms).",
    f"Raw fio JSON, CPU samples, status snapshots, configurations and daemon logs: target/bench/repl-{os.environ['R_STAMP']}/.",
]
if os.environ.get("R_BUSY"):
    notes.insert(0, os.environ["R_BUSY"])
json.dump({"date": os.environ["R_DATE"], "repeat": int(os.environ["R_REPEAT"]),
           "setups": os.environ["R_SETUPS"].split(), "jobs": jobs(jobs_txt), "delay_jobs": jobs(delay_txt),
           "delay_us": int(os.environ["R_DELAY_US"]),
           "volume_jobs": jobs(volume_txt), "volumes": int(os.environ["R_NVOL"]), "sections": [s for s in os.environ["R_SECTIONS"].split(",") if s],
           "facts": fl, "notes": notes}, open(out, "w"), indent=1)
PY

report_rc=0
python3 "$REPO/benches/replication_report.py" "$RAW" "$RAW/meta.json" >"$OUT" || report_rc=$?
cp "$OUT" "$RAW/report.md"
cat "$OUT"
log "report written to ${OUT}"
if [ "$FAILURES" -gt 0 ] || [ "$report_rc" -ne 0 ]; then
    die "${FAILURES} fio run(s) failed; see the Failures section"
fi
