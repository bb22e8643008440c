#!/usr/bin/env bash
# Build the twinsan binary that runs on XenServer / XCP-ng dom0 (CentOS 7 userland, glibc
# 2.17) and on any newer x86_64 glibc Linux, and, with --packages, the .rpm and .deb holding it.
#
#   bash scripts/build-portable.sh             # binary only
#   bash scripts/build-portable.sh --packages  # binary + rpm + deb
#
# The binary is linked by zig (cargo-zigbuild) against glibc 2.17's symbol versions:
#   cargo zigbuild --release --target x86_64-unknown-linux-gnu.2.17 --bin twinsan
# with debug info stripped (symbols kept for backtraces). It then must pass check_binary:
# no symbol version newer than GLIBC_2.17, no shared library beyond glibc's (libc, libm,
# libpthread, libdl, librt, ld-linux) and libgcc_s.
#
# Output (TARGET_DIR = $CARGO_TARGET_DIR, default <repo>/target):
#   TARGET_DIR/x86_64-unknown-linux-gnu/release/twinsan
#   TARGET_DIR/packages/twinsan-VERSION-1.x86_64.rpm      (cargo generate-rpm)
#   TARGET_DIR/packages/twinsan_VERSION-1_amd64.deb       (cargo deb --no-build)
# The last lines printed on stdout are the paths of what was built.
#
# Tools (scripts/install-deps.sh installs them into $TWINSAN_TOOLS, default
# /var/cache/twinsan-tools): cargo-zigbuild, cargo-deb, cargo-generate-rpm (cargo install
# --locked --root $TWINSAN_TOOLS) and zig (PyPI package ziglang, pip install --target
# $TWINSAN_TOOLS/ziglang-VERSION). Found on PATH too; CARGO_ZIGBUILD_ZIG_PATH overrides zig.
#
# Environment:
#   CARGO_TARGET_DIR        cargo's target dir (default <repo>/target)
#   TWINSAN_TOOLS           tool cache (default /var/cache/twinsan-tools)
#   TWINSAN_GLIBC           glibc version to link against (default 2.17; the check uses it too)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

PACKAGES=0
for arg in "$@"; do
    case "$arg" in
        --packages) PACKAGES=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) die "unknown argument '${arg}' (try --help)" ;;
    esac
done

TRIPLE=x86_64-unknown-linux-gnu
GLIBC="${TWINSAN_GLIBC:-2.17}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/$TRIPLE/release/twinsan"
PKG_DIR="$TARGET_DIR/packages"
export PATH="$TWINSAN_TOOLS/bin:$PATH"

[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (the target is the host's)"

find_zig() {
    local z
    if [ -n "${CARGO_ZIGBUILD_ZIG_PATH:-}" ]; then printf '%s\n' "$CARGO_ZIGBUILD_ZIG_PATH"; return; fi
    z="$(compgen -G "$TWINSAN_TOOLS/ziglang-*/ziglang/zig" | sort -V | tail -n1 || true)"
    if [ -n "$z" ]; then printf '%s\n' "$z"; return; fi
    if command -v zig >/dev/null; then command -v zig; return; fi
    return 1
}

# check_binary FILE: the dom0 gate. Prints the newest GLIBC_ version and the NEEDED list.
check_binary() {
    local f="$1" max needed lib line v bad=0
    max="$(objdump -T "$f" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)"
    [ -n "$max" ] || { log "no GLIBC_ symbol versions in ${f}?"; return 1; }
    log "newest glibc symbol version in ${f}: ${max}"
    if [ "$(printf '%s\n%s\n' "$max" "GLIBC_${GLIBC}" | sort -V | tail -n1)" != "GLIBC_${GLIBC}" ]; then
        log "ERROR: ${f} needs ${max} > GLIBC_${GLIBC}; the symbols that need more:"
        objdump -T "$f" | grep 'GLIBC_' | while read -r line; do
            v="$(grep -o 'GLIBC_[0-9.]*' <<<"$line" | head -n1)"
            if [ "$(printf '%s\n%s\n' "$v" "GLIBC_${GLIBC}" | sort -V | tail -n1)" != "GLIBC_${GLIBC}" ]; then
                printf '  %s %s\n' "$v" "${line##* }" >&2
            fi
        done
        bad=1
    fi
    needed="$(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
    log "NEEDED: $(echo "$needed" | tr '\n' ' ')"
    while read -r lib; do
        [ -n "$lib" ] || continue
        case "$lib" in
            libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|libgcc_s.so.1|ld-linux-x86-64.so.2) ;;
            *) log "ERROR: ${f} needs shared library ${lib} (only glibc's and libgcc_s are allowed)"; bad=1 ;;
        esac
    done <<<"$needed"
    return "$bad"
}

build_binary() {
    local zig t0
    command -v cargo-zigbuild >/dev/null \
        || die "cargo-zigbuild not found (run scripts/install-deps.sh, or: cargo install --locked cargo-zigbuild)"
    zig="$(find_zig)" || die "zig not found (run scripts/install-deps.sh, or: pip install ziglang)"
    export CARGO_ZIGBUILD_ZIG_PATH="$zig"
    log "zig $("$zig" version) at ${zig}; $(cargo-zigbuild --version 2>/dev/null | head -n1)"
    t0="$(now_s)"
    # Profile overrides for this build only (its own target triple dir, so the host build's
    # artifacts are untouched): no debug info to build or ship, symbol names kept.
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo \
        cargo zigbuild --release --target "${TRIPLE}.${GLIBC}" --bin twinsan || return 1
    log "portable build took $(elapsed "$t0") s: ${BIN} ($(stat -c %s "$BIN") bytes)"
}

build_packages() {
    local version rpm deb
    command -v cargo-deb >/dev/null || die "cargo-deb not found (run scripts/install-deps.sh)"
    command -v cargo-generate-rpm >/dev/null || die "cargo-generate-rpm not found (run scripts/install-deps.sh)"
    version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
    mkdir -p "$PKG_DIR" || return 1
    rpm="$PKG_DIR/twinsan-${version}-1.x86_64.rpm"
    deb="$PKG_DIR/twinsan_${version}-1_amd64.deb"
    rm -f "$rpm" "$deb"
    # The man page and completions come from the binary's own clap definitions; the
    # packages' assets name them under target/generated (relative to the repository).
    rm -rf "$REPO/target/generated" && mkdir -p "$REPO/target/generated" || return 1
    "$BIN" man --dir "$REPO/target/generated/man" || return 1
    "$BIN" completions bash >"$REPO/target/generated/twinsan.bash" || return 1
    "$BIN" completions zsh >"$REPO/target/generated/_twinsan" || return 1
    # Both tools map the asset source target/release/twinsan to TARGET_DIR/TRIPLE/release/twinsan.
    # --payload-compress gzip: dom0's rpm 4.11 (CentOS 7) cannot read zstd, the tool's default.
    # --auto-req builtin: the rpm Requires the sonames and GLIBC_ versions the binary links
    # (libc.so.6(GLIBC_2.17)(64bit) ...), which CentOS 7's glibc provides.
    cargo generate-rpm --target "$TRIPLE" --target-dir "$TARGET_DIR" \
        --auto-req builtin --payload-compress gzip --output "$rpm" || return 1
    # --no-strip: the binary is stripped of debug info already and must be the same file in
    # both packages.
    cargo deb --package twinsan --no-build --no-strip --target "$TRIPLE" --output "$deb" || return 1
    log "rpm: ${rpm} ($(stat -c %s "$rpm") bytes)"
    log "deb: ${deb} ($(stat -c %s "$deb") bytes)"
    PKGS_BUILT=("$rpm" "$deb")
}

PKGS_BUILT=()
# (Functions run under `timed`, where set -e does not apply: each checks its commands.)
timed "portable binary (zig, glibc ${GLIBC})" build_binary || die "portable build failed"
timed "check binary" check_binary "$BIN" || die "${BIN} would not run on a glibc ${GLIBC} system"
if [ "$PACKAGES" = 1 ]; then
    timed "rpm + deb" build_packages || die "packaging failed"
fi
print_timings
printf '%s\n' "$BIN" "${PKGS_BUILT[@]}"
