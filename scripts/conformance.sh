#!/usr/bin/env bash
# Run libiscsi's conformance suite (iscsi-test-cu) against a running iSCSI target and
# summarise it with scripts/parse-cu.py (per-suite pass/skip/fail + failed tests).
#
# Usage: scripts/conformance.sh ISCSI-URL [TEST-SPEC]
#   ISCSI-URL  iscsi://[user%pass@]127.0.0.1:PORT/TARGET-IQN/LUN  (loopback only)
#   TEST-SPEC  FAMILY[.SUITE[.TEST]] as listed by `iscsi-test-cu -l`, default ALL
#              (ALL holds every distinct test once; SCSI/iSCSI/LINUX are subsets of it)
#
# Runs: iscsi-test-cu -d -i iqn.2026-11.org.twinsan.test:init1 -I iqn.2026-11.org.twinsan.test:init2
#         -t TEST-SPEC URL URL      (URL twice, so the MultipathIO suite runs)
# Destructive (-d): the LUN's data is overwritten.
#
# Environment:
#   CU_LOG_DIR       where logs go (default: <repo>/target/conformance)
#   CU_TIMEOUT       seconds before the run is killed (default 1800)
#   CU_ALLOW_FAIL    file of test names whose failure is expected (see parse-cu.py)
#   CU_MULTIPATH=0   give the URL only once (MultipathIO suite then skips)
#   CU_SCSI_VERBOSE=1  add -V (log every SCSI command; very large logs)
#   CU_EXTRA_ARGS    more iscsi-test-cu arguments (word-split)
#
# Exit status: 0 no unexpected failures, 1 failures, 2 unusable log, 3 run timed out/crashed.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
case "$1" in -h|--help) usage ;; esac
URL="$1"
SPEC="${2:-ALL}"
command -v iscsi-test-cu >/dev/null || die "iscsi-test-cu not found (run scripts/install-deps.sh)"

# Loopback only: pull the host out of iscsi://[cred@]HOST[:PORT]/IQN/LUN.
case "$URL" in iscsi://*) ;; *) die "not an iscsi:// URL: ${URL}" ;; esac
hostport="${URL#iscsi://}"; hostport="${hostport%%/*}"; hostport="${hostport##*@}"
case "$hostport" in
    \[*\]*) host="${hostport%%]*}"; host="${host#[}" ;;
    *) host="${hostport%%:*}" ;;
esac
require_loopback "$host"

LOG_DIR="${CU_LOG_DIR:-$REPO/target/conformance}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
stamp="$(date +%Y%m%d-%H%M%S)"
base="$LOG_DIR/cu-${SPEC//[^A-Za-z0-9._-]/_}-${stamp}"
LOG="${base}.log"

args=(-d -i iqn.2026-11.org.twinsan.test:init1 -I iqn.2026-11.org.twinsan.test:init2 -t "$SPEC")
[ "${CU_SCSI_VERBOSE:-0}" = 1 ] && args+=(-V)
# shellcheck disable=SC2206  # intended word splitting
[ -n "${CU_EXTRA_ARGS:-}" ] && args+=(${CU_EXTRA_ARGS})
args+=("$URL")
[ "${CU_MULTIPATH:-1}" = 1 ] && args+=("$URL")

iscsi-test-cu -l >"${base}.list"
log "iscsi-test-cu ${args[*]}"
log "log: ${LOG}"
t0="$(now_s)"
rc=0
# Run inside the log dir: -x or core files land there, not in the caller's cwd.
(cd "$LOG_DIR" && timeout --kill-after=10 "${CU_TIMEOUT:-1800}" iscsi-test-cu "${args[@]}") >"$LOG" 2>&1 || rc=$?
secs="$(elapsed "$t0")"
ln -sfn "$(basename "$LOG")" "$LOG_DIR/latest.log"
log "iscsi-test-cu finished in ${secs} s (exit ${rc})"

status=0
parse_args=("$LOG" --list "${base}.list" --json "${base}.json")
[ -n "${CU_ALLOW_FAIL:-}" ] && parse_args+=(--allow-fail "$CU_ALLOW_FAIL")
python3 "$REPO/scripts/parse-cu.py" "${parse_args[@]}" || status=$?

if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    log "iscsi-test-cu was killed after ${CU_TIMEOUT:-1800} s; results above are partial"
    exit 3
fi
if [ "$rc" -gt 1 ] && { [ "$status" -eq 0 ] || [ "$status" -eq 2 ]; }; then
    # 0/1 are iscsi-test-cu's normal "all passed"/"some failed"; anything else is a crash
    # or a target it could not log in to.
    tail -n 20 "$LOG" >&2
    log "iscsi-test-cu exited with ${rc} (could it connect and log in to ${URL}?)"
    exit 3
fi
exit "$status"
