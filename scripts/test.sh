#!/usr/bin/env bash
# THE test command of twinsan: `bash scripts/test.sh` (CI runs it through .ci/run).
#
# Steps, in order:
#   1. scripts/install-deps.sh (Debian packages + fio with libiscsi; skipped with TWINSAN_SKIP_DEPS=1)
#   2. lint of the test tooling itself (shellcheck if installed, python3 -m py_compile),
#      scripts/check-cycles.py (no import cycle between the modules of a crate)
#      and a check that the release binary's dependency graph has no test XAPI (test-xapi)
#   3. cargo fmt --all -- --check
#   4. cargo clippy --workspace --all-targets -- -D warnings
#   5. cargo build --release --bin twinsan
#   6. cargo nextest run --workspace --release --no-fail-fast   (cargo test if nextest is missing)
#      with TWINSAN_BIN=<repo>/target/release/twinsan and TWINSAN_FIO=<fio with libiscsi>
#      exported for the integration tests (tests/kernel_initiator.rs boots a qemu guest with
#      the Linux kernel initiator: scripts/guest/build-image.sh builds and caches its image).
#      The fuzz targets of tests/fuzz.rs run in it, TWINSAN_FUZZ_SECS each (default 10 s, one at
#      a time: about a minute), and print their executions per second.
#   7. scripts/test-packaging.sh: the dom0 binary (cargo zigbuild, glibc 2.17 symbol versions,
#      NEEDED libraries, serves the embedded default) and the rpm / deb built from it
#      (file lists, config marking, unit identical to packaging/twinsan.service).
# fmt/clippy failures do not stop the run (you see every problem at once); a failed
# build does. Exit status is non-zero if any step failed. Every step is time-bounded.
#
# Environment:
#   TWINSAN_SKIP_DEPS=1     do not run install-deps.sh (e.g. not root, deps already there)
#   TWINSAN_FAIL_FAST=1     stop at the first failing step
#   TWINSAN_TEST_FILTER=... extra arguments for nextest / cargo test (word-split)
#   TWINSAN_TOOLS           tool cache (default /var/cache/twinsan-tools)
#   TWINSAN_SKIP_PACKAGING=1  skip step 7 (e.g. the packaging tools are not installed)
#   TWINSAN_FUZZ_SECS=N     seconds per fuzz target (default 10; README "Fuzzing")
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

T_ALL="$(now_s)"
STEPS=()   # "name<TAB>status<TAB>seconds"
FAILED=()

# step NAME TIMEOUT_S CMD...: run a step bounded in time, record status and duration.
step() {
    local name="$1" limit="$2" t0 rc=0 status
    shift 2
    log "=== ${name}"
    t0="$(now_s)"
    if declare -F "$1" >/dev/null; then
        "$@" || rc=$?   # shell function: cheap, runs in this shell without timeout(1)
    else
        timeout --kill-after=30 "$limit" "$@" || rc=$?
    fi
    if [ "$rc" -eq 0 ]; then
        status=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT after ${limit}s"
    else
        status="FAILED (exit ${rc})"
    fi
    STEPS+=("${name}"$'\t'"${status}"$'\t'"$(elapsed "$t0")")
    log "=== ${name}: ${status} ($(elapsed "$t0") s)"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name")
        if [ "${TWINSAN_FAIL_FAST:-0}" = 1 ]; then finish; fi
    fi
    return "$rc"
}

finish() {
    local line name rest status secs
    printf '\n%-44s %-22s %8s\n' "step" "status" "seconds"
    for line in "${STEPS[@]}"; do
        name="${line%%$'\t'*}"; rest="${line#*$'\t'}"
        status="${rest%%$'\t'*}"; secs="${rest##*$'\t'}"
        printf '%-44s %-22s %8s\n' "$name" "$status" "$secs"
    done
    printf '%-44s %-22s %8s\n' "total" "" "$(elapsed "$T_ALL")"
    if [ "${#FAILED[@]}" -gt 0 ]; then
        printf '\ntest.sh: FAILED: %s\n' "$(IFS=,; echo "${FAILED[*]}")"
        exit 1
    fi
    printf '\ntest.sh: all steps passed\n'
    exit 0
}

# 1. dependencies
if [ "${TWINSAN_SKIP_DEPS:-0}" != 1 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        step "install-deps" 2400 bash scripts/install-deps.sh || finish
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        step "install-deps (sudo)" 2400 sudo -n env TWINSAN_TOOLS="$TWINSAN_TOOLS" bash scripts/install-deps.sh || finish
    else
        die "install-deps.sh needs root: run as root, or set TWINSAN_SKIP_DEPS=1 if the dependencies are installed"
    fi
fi

# 2. the tooling's own lint (cheap; shellcheck only when installed)
# shellcheck disable=SC2317  # invoked indirectly through step()
lint_tooling() {
    local rc=0
    if command -v shellcheck >/dev/null; then
        shellcheck -x -S warning scripts/*.sh scripts/lib/*.sh scripts/guest/*.sh scripts/guest/init \
            benches/*.sh .ci/run \
            packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm \
            packaging/rpm/*.sh || rc=1
    else
        log "shellcheck not installed; skipping shell lint"
    fi
    python3 - scripts/parse-cu.py scripts/check-cycles.py benches/fio_report.py \
        benches/replication_report.py benches/delay_proxy.py <<'PY' || rc=1
import ast, sys
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        ast.parse(f.read(), path)
PY
    return "$rc"
}
step "lint scripts" 300 lint_tooling || true
step "no import cycle between modules" 120 python3 scripts/check-cycles.py || true

# The test XAPI (twinsan-ha feature test-xapi) is for tests only: the release binary's
# dependency graph (normal and build edges) must not enable it.
# shellcheck disable=SC2317  # invoked indirectly through step()
no_test_xapi_in_release() {
    local tree
    tree="$(cargo tree -e features,normal,build -p twinsan)" || return 1
    if grep -q 'test-xapi' <<<"$tree"; then
        log "the release binary enables twinsan-ha's test-xapi feature:"
        grep 'test-xapi' <<<"$tree" >&2
        return 1
    fi
}
step "no test XAPI in the release binary" 300 no_test_xapi_in_release || true

# 3-4. formatting and lints
step "cargo fmt --check" 600 cargo fmt --all -- --check || true
step "cargo clippy -D warnings" 1800 cargo clippy --workspace --all-targets -- -D warnings || true

# 5. the server binary the integration tests drive
step "cargo build --release --bin twinsan" 1800 cargo build --release --bin twinsan || finish
export TWINSAN_BIN="$REPO/target/release/twinsan"
FIO="$(fio_bin)"
if [ -x "$FIO" ]; then
    export TWINSAN_FIO="$FIO"
else
    log "warning: ${FIO} not found; tests that need fio over iSCSI should skip or fail"
fi
log "TWINSAN_BIN=${TWINSAN_BIN} TWINSAN_FIO=${TWINSAN_FIO:-<unset>}"

# 6. tests
# shellcheck disable=SC2206  # user-supplied filter is word-split on purpose
FILTER=(${TWINSAN_TEST_FILTER:-})
if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --release" 3000 \
        cargo nextest run --workspace --release --no-fail-fast \
        --tool-config-file "twinsan-ci:$REPO/.ci/nextest.toml" --profile ci \
        --no-tests=warn "${FILTER[@]}" || true
else
    log "cargo-nextest not found; falling back to cargo test"
    step "cargo test --release" 3000 cargo test --workspace --release --no-fail-fast "${FILTER[@]}" || true
fi

# 7. the dom0 binary and the packages (a second release build, by zig: a few minutes)
if [ "${TWINSAN_SKIP_PACKAGING:-0}" != 1 ]; then
    step "test-packaging.sh (dom0 binary, rpm, deb)" 2400 bash scripts/test-packaging.sh || true
else
    log "TWINSAN_SKIP_PACKAGING=1: not building or checking the portable binary and packages"
fi

finish
