# shellcheck shell=bash
# Shared helpers for twinsan scripts. Source it; do not execute it.
#
# Rules every helper here follows:
#   * network traffic only to 127.0.0.1 (the only address helpers accept is loopback);
#   * every wait loop is bounded in count and time;
#   * processes are only ever stopped by the PID we recorded when we started them.

TWINSAN_TOOLS="${TWINSAN_TOOLS:-/var/cache/twinsan-tools}"
export TWINSAN_TOOLS

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

# now_s: seconds since epoch with sub-second precision.
now_s() { date +%s.%N; }

# elapsed START: seconds since START (one decimal).
elapsed() { awk -v s="$1" -v e="$(now_s)" 'BEGIN { printf "%.1f", e - s }'; }

# Timings are collected as "label<TAB>seconds" lines; print_timings prints them.
TIMINGS=()
# timed LABEL CMD...: run CMD, record how long it took, keep its exit status.
timed() {
    local label="$1"; shift
    local t0 rc=0
    t0="$(now_s)"
    "$@" || rc=$?
    TIMINGS+=("${label}"$'\t'"$(elapsed "$t0")")
    log "step '${label}' took $(elapsed "$t0") s (rc=${rc})"
    return "$rc"
}
print_timings() {
    local line
    [ "${#TIMINGS[@]}" -gt 0 ] || return 0
    printf '%-40s %8s\n' "step" "seconds" >&2
    for line in "${TIMINGS[@]}"; do
        printf '%-40s %8s\n' "${line%%$'\t'*}" "${line##*$'\t'}" >&2
    done
}

# require_loopback HOST: refuse anything that is not a loopback address.
require_loopback() {
    case "$1" in
        127.*|::1|'[::1]') ;;
        *) die "refusing non-loopback address '$1' (all traffic must stay on 127.0.0.0/8 or ::1)" ;;
    esac
}

# port_open HOST PORT: true if something accepts TCP connections there.
port_open() {
    require_loopback "$1"
    # shellcheck disable=SC2016  # $0/$1 are expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# wait_port HOST PORT SECONDS [PID]: wait until the port accepts connections;
# fails early if PID (the server we started) has exited.
wait_port() {
    local host="$1" port="$2" secs="$3" pid="${4:-}" i
    for ((i = 0; i < secs * 10; i++)); do
        if port_open "$host" "$port"; then return 0; fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
        sleep 0.1
    done
    return 1
}

# stop_pid PID [SECONDS]: SIGTERM the process we started, SIGKILL after a bounded wait.
stop_pid() {
    local pid="$1" secs="${2:-10}" i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid ${pid} ignored SIGTERM for ${secs}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# proc_cpu_ticks PID: user + system CPU time of the process PID (all its threads, io_uring
# workers included) in clock ticks (getconf CLK_TCK per second); 0 when it is gone.
proc_cpu_ticks() {
    local stat rest
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return 0; }
    rest="${stat##*) }"    # the command name may hold spaces and ')': cut after the last ')'
    # rest starts at field 3 (state); utime and stime are fields 14 and 15.
    awk '{ print $12 + $13 }' <<<"$rest"
}

# run_cpu_sampled CPUFILE RAMP PROCS CMD...: run CMD (in the background, so that it can be
# sampled mid-run) and record the CPU time of the processes named in PROCS ("label=pid
# label=pid ...") three times: before CMD starts, RAMP seconds after (fio's ramp end,
# give or take its login) and after CMD exits. Writes CPUFILE as JSON: {"clk_tck": N,
# "ramp_s": RAMP, "procs": {label: [before, ramp_end, after], ...}} (ticks). Returns CMD's
# exit status. Nothing is logged (callers redirect CMD's output around this call).
# RUN_CPU_CHILD holds CMD's PID while it runs, for the caller's cleanup trap.
RUN_CPU_CHILD=""
run_cpu_sampled() {
    local cpuf="$1" ramp="$2" procs="$3" rc=0 i p label pid json
    shift 3
    local -a labels=() pids=() ticks_start=() ticks_ramp=() ticks_end=()
    for p in $procs; do labels+=("${p%%=*}"); pids+=("${p#*=}"); done
    for pid in "${pids[@]}"; do ticks_start+=("$(proc_cpu_ticks "$pid")"); done
    local t_ramp=$(( ${EPOCHREALTIME/./} + ramp * 1000000 ))   # microseconds (bash >= 5.0)
    "$@" &
    RUN_CPU_CHILD=$!
    # Until RAMP seconds after the start by the clock (not by counting sleeps, which run
    # late on a busy machine); bounded by the count too.
    for ((i = 0; i < ramp * 40 + 1; i++)); do
        [ "${EPOCHREALTIME/./}" -lt "$t_ramp" ] || break
        kill -0 "$RUN_CPU_CHILD" 2>/dev/null || break
        sleep 0.025
    done
    for pid in "${pids[@]}"; do ticks_ramp+=("$(proc_cpu_ticks "$pid")"); done
    wait "$RUN_CPU_CHILD" || rc=$?
    RUN_CPU_CHILD=""
    for pid in "${pids[@]}"; do ticks_end+=("$(proc_cpu_ticks "$pid")"); done
    json=""
    for ((i = 0; i < ${#labels[@]}; i++)); do
        label="${labels[$i]}"
        json="${json}${json:+, }\"${label}\": [${ticks_start[$i]}, ${ticks_ramp[$i]}, ${ticks_end[$i]}]"
    done
    printf '{"clk_tck": %s, "ramp_s": %s, "procs": {%s}}\n' "$(getconf CLK_TCK)" "$ramp" "$json" >"$cpuf"
    return "$rc"
}

# fio_bin: path of the fio built with the libiscsi engine.
fio_bin() {
    if [ -n "${TWINSAN_FIO:-}" ]; then printf '%s\n' "$TWINSAN_FIO"; return; fi
    printf '%s\n' "${TWINSAN_TOOLS}/bin/fio-libiscsi"
}

# fio_iscsi_filename HOST PORT IQN LUN: fio --filename value. fio splits filenames on ':',
# so every colon (after "iscsi", before the port, and inside the IQN) is escaped as '\:'.
fio_iscsi_filename() {
    local rest="$1:$2/$3/$4"
    printf 'iscsi\\://%s' "${rest//:/\\:}"
}

# make_backing_file PATH SIZE_MIB: create a fully written (non-sparse) file.
make_backing_file() {
    local path="$1" mib="$2"
    log "writing ${mib} MiB of random data to ${path} (preconditioning, no holes)"
    dd if=/dev/urandom of="$path" bs=1M count="$mib" conv=fsync status=none
}

# is_tmpfs DIR: true if DIR lives on tmpfs/ramfs (bad place for a benchmark backing file).
is_tmpfs() {
    local fstype
    fstype="$(stat -f -c %T "$1" 2>/dev/null || echo unknown)"
    [ "$fstype" = "tmpfs" ] || [ "$fstype" = "ramfs" ]
}

# bench_base_dir FILES_MIB: where a benchmark keeps its backing files: $BENCH_DIR if set (a
# warning if it is tmpfs), else the first non-tmpfs of $TMPDIR, /tmp, /var/tmp, <repo>/target
# with FILES_MIB + 512 MiB free. Prints the directory; returns 1 if none has room.
bench_base_dir() {
    local d need_kb=$((($1 + 512) * 1024)) avail
    if [ -n "${BENCH_DIR:-}" ]; then
        mkdir -p "$BENCH_DIR" || return 1
        is_tmpfs "$BENCH_DIR" && log "warning: BENCH_DIR ${BENCH_DIR} is tmpfs; numbers will not reflect a disk"
        printf '%s\n' "$BENCH_DIR"
        return 0
    fi
    for d in ${TMPDIR:+"$TMPDIR"} /tmp /var/tmp "$REPO/target"; do
        mkdir -p "$d" 2>/dev/null || continue
        is_tmpfs "$d" && continue
        avail="$(df -Pk "$d" | awk 'NR == 2 {print $4}')"
        [ "${avail:-0}" -ge "$need_kb" ] || continue
        printf '%s\n' "$d"
        return 0
    done
    return 1
}

# ---------------------------------------------------------------- tgt (incumbent)
# tgtd's control socket is chosen by --control-port, so several tgtd instances
# (bench, conformance, other engineers) never collide as long as they differ.
TGT_PID=""
TGT_CONTROL_PORT="${TGT_CONTROL_PORT:-61}"

tgtadm_c() { tgtadm -C "$TGT_CONTROL_PORT" --lld iscsi "$@"; }

# tgt_start HOST PORT IQN FILE LOGFILE: start tgtd in the foreground (backgrounded by us),
# export FILE as LUN 1 of IQN, allow all initiators. Sets TGT_PID.
tgt_start() {
    local host="$1" port="$2" iqn="$3" file="$4" logf="$5" i
    require_loopback "$host"
    command -v tgtd >/dev/null || die "tgtd not found (run scripts/install-deps.sh)"
    if port_open "$host" "$port"; then die "${host}:${port} is already in use; pick another port"; fi
    tgtd -f -C "$TGT_CONTROL_PORT" --iscsi "portal=${host}:${port}" >"$logf" 2>&1 &
    TGT_PID=$!
    # The control socket appears a moment after the listening socket; retry (bounded).
    for ((i = 0; i < 50; i++)); do
        kill -0 "$TGT_PID" 2>/dev/null || { tail -n 20 "$logf" >&2; die "tgtd exited at startup"; }
        if tgtadm_c --op show --mode target >/dev/null 2>&1; then break; fi
        sleep 0.1
    done
    tgtadm_c --op new --mode target --tid 1 -T "$iqn" \
        || die "tgtadm: could not create target ${iqn}"
    # shellcheck disable=SC2086  # TGT_BSOPTS is intentionally word-split (e.g. "--bsoflags direct")
    tgtadm_c --op new --mode logicalunit --tid 1 --lun 1 -b "$file" --bstype rdwr ${TGT_BSOPTS:-} \
        || die "tgtadm: could not add LUN 1 backed by ${file}"
    tgtadm_c --op bind --mode target --tid 1 -I ALL \
        || die "tgtadm: could not bind initiators"
    wait_port "$host" "$port" 10 "$TGT_PID" || die "tgtd is not listening on ${host}:${port}"
    log "tgtd pid ${TGT_PID} serving ${iqn} LUN 1 (${file}) on ${host}:${port}"
}

# tgt_stop: delete the target (forcefully, sessions may linger), then ask our tgtd to exit
# through its control socket (tgtd ignores SIGTERM), then make sure by PID.
tgt_stop() {
    local i
    [ -n "$TGT_PID" ] || return 0
    if kill -0 "$TGT_PID" 2>/dev/null; then
        tgtadm_c --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
        tgtadm -C "$TGT_CONTROL_PORT" --op delete --mode system >/dev/null 2>&1 || true
        for ((i = 0; i < 100; i++)); do
            # a zombie (exited, not yet reaped by us) counts as gone
            [ "$(ps -o stat= -p "$TGT_PID" 2>/dev/null | cut -c1)" = "" ] && break
            [ "$(ps -o stat= -p "$TGT_PID" 2>/dev/null | cut -c1)" = "Z" ] && break
            sleep 0.1
        done
    fi
    stop_pid "$TGT_PID" 5
    TGT_PID=""
}

tgt_version() { tgtadm --version 2>/dev/null | head -n1 || dpkg-query -W -f='${Version}' tgt 2>/dev/null; }
