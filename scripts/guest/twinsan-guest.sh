# shellcheck shell=sh
# /lib/twinsan-guest.sh: helpers for the guest's /test/run.sh (busybox sh). Source it:
#   . /lib/twinsan-guest.sh
# The control channel to the host is /dev/ttyS1 (raw, no echo, set up by /init).

TWINSAN_CTL="${TWINSAN_CTL:-/dev/ttyS1}"

# uptime_ms: milliseconds since boot.
uptime_ms() {
    read -r _up _ </proc/uptime
    _s="${_up%.*}"
    _f="${_up#*.}"
    echo $((_s * 1000 + ${_f#0} * 10))
}

# host_say TEXT...: one line TEXT to the host on the control port.
host_say() {
    printf '%s\n' "$*" >"$TWINSAN_CTL"
}

# host_wait WORD [SECONDS]: read lines from the host until one is WORD or starts with
# "WORD "; prints the rest of that line (after "WORD ") on stdout. Returns 1 after
# SECONDS (default 300) without such a line.
host_wait() {
    _word="$1"
    _secs="${2:-300}"
    _end=$(($(uptime_ms) + _secs * 1000))
    while :; do
        _left=$(((_end - $(uptime_ms) + 999) / 1000))
        [ "$_left" -gt 0 ] || return 1
        _line=""
        # shellcheck disable=SC3045  # busybox ash has read -t
        if IFS= read -r -t "$_left" _line <"$TWINSAN_CTL"; then :; else
            # a partial line (no newline yet) is kept by the tty; only give up at the deadline
            [ -n "$_line" ] || continue
        fi
        _line="$(printf '%s' "$_line" | tr -d '\r')"
        if [ "$_line" = "$_word" ]; then
            return 0
        fi
        case "$_line" in
            "$_word "*) printf '%s\n' "${_line#"$_word" }"; return 0 ;;
        esac
    done
}

# fail MSG: report a failure on the console and end the test script.
fail() {
    echo "TWINSAN-GUEST-FAIL: $*" >/dev/console
    exit 1
}

# step NAME: mark a step on the console, with seconds.milliseconds since boot.
step() {
    _ms=$(uptime_ms)
    printf 'TWINSAN-GUEST-STEP: %s [%d.%03d]\n' "$*" $((_ms / 1000)) $((_ms % 1000)) >/dev/console
}
