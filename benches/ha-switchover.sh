#!/usr/bin/env bash
# HA switchover benchmark (issue 4's goals): two twinsan daemons (release build) with [ha] in
# network namespaces (host A, host B, a client on a bridge that lives in its own namespace, a
# direct replication link); the client writes tagged 4 KiB blocks to the floating IP and logs in
# again whenever its connection drops. Each repetition measures
#   - a planned switchover in manual mode (become-secondary on the primary, become-primary on
#     the secondary): the longest I/O pause the client sees (goal <= 1 s) and the time until an
#     iSCSI login through the VIP reaches the new host;
#   - a pool master change (test XAPI event + pool.conf rewrite): the time until the new host
#     serves on the VIP (goal <= 2 s) and the I/O pause.
# The measuring code is the ignored test `ha_switchover_benchmark` in tests/ha.rs (it shares the
# namespace harness of the acceptance tests); it writes benches/results/ha-switchover.md.
#
# Needs root and iproute2 (network namespaces); all traffic stays inside the namespaces it
# creates, which are deleted at the end (also on failure).
#
# Usage: sudo benches/ha-switchover.sh
# Environment (optional):
#   HA_BENCH_REPS=5          repetitions (each: one planned switchover, one master change)
#   HA_BENCH_NOTE="..."      machine description written into the report
#   CARGO_TARGET_DIR         as usual
#   TWINSAN_LOG=warn         daemon log level while measuring
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

[ "$(id -u)" -eq 0 ] || die "ha-switchover.sh needs root (network namespaces)"
command -v ip >/dev/null || die "iproute2 missing: run scripts/install-deps.sh"
command -v arping >/dev/null || die "arping missing: run scripts/install-deps.sh"

export HA_BENCH_REPS="${HA_BENCH_REPS:-5}"
export HA_BENCH_NOTE="${HA_BENCH_NOTE:-$(nproc) CPUs, $(uname -r), release build}"
export TWINSAN_LOG="${TWINSAN_LOG:-warn}"
cd "$REPO"
log "building the release test binary"
cargo test --release --test ha --no-run
log "running $HA_BENCH_REPS repetitions"
cargo test --release --test ha -- --ignored --exact ha_switchover_benchmark --nocapture --test-threads=1
log "report: benches/results/ha-switchover.md"
cat benches/results/ha-switchover.md
