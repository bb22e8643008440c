#!/usr/bin/env bash
# Baseline: run scripts/conformance.sh against the incumbent, tgt, on a fresh 1 GiB file LUN.
#
# Usage: scripts/conformance-tgt.sh [TEST-SPEC]      (default ALL)
#
# Starts `tgtd -f --iscsi portal=127.0.0.1:${TGT_PORT:-3261}` (control port
# ${TGT_CONTROL_PORT:-62}), exports the file as LUN 1 of iqn.2026-11.org.twinsan.test:tgt
# (sparse) to all initiators, runs the suite, then stops tgtd by PID and deletes the file.
# Environment: TGT_PORT, TGT_CONTROL_PORT, CU_* (see conformance.sh), SIZE_MIB (1024).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TGT_CONTROL_PORT="${TGT_CONTROL_PORT:-62}"
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

PORT="${TGT_PORT:-3261}"
IQN="iqn.2026-11.org.twinsan.test:tgt"
[ "$(id -u)" -eq 0 ] || die "tgtd needs root"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/twinsan-cu-tgt.XXXXXX")"
# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() { tgt_stop || true; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sparse is fine here: the suite writes what it reads back, and tgt's rdwr backend does
# not report thin provisioning either way.
truncate -s "${SIZE_MIB:-1024}M" "$WORK/lun1.img"
tgt_start 127.0.0.1 "$PORT" "$IQN" "$WORK/lun1.img" "$WORK/tgtd.log"
rc=0
bash "$REPO/scripts/conformance.sh" "iscsi://127.0.0.1:${PORT}/${IQN}/1" "${1:-ALL}" || rc=$?
exit "$rc"
