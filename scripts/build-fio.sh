#!/usr/bin/env bash
# Build fio with the libiscsi ioengine (Debian's fio package has none) and install it as
# ${TWINSAN_TOOLS}/bin/fio-libiscsi. Skips everything if that binary already works.
#
# Needs: deb-src enabled + apt lists updated, dpkg-dev, build-essential, pkg-config,
# libiscsi-dev (scripts/install-deps.sh takes care of all of it). Run as root for apt-get source.
#
# Environment: TWINSAN_TOOLS (default /var/cache/twinsan-tools), MAKE_JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

BIN="${TWINSAN_TOOLS}/bin/fio-libiscsi"
SRC="${TWINSAN_TOOLS}/fio-src"
JOBS="${MAKE_JOBS:-$(nproc)}"

works() { [ -x "$BIN" ] && "$BIN" --enghelp 2>/dev/null | grep -qw libiscsi; }
if works; then
    log "fio-libiscsi already built: ${BIN} ($("$BIN" --version))"
    exit 0
fi

pkg-config --exists libiscsi || die "libiscsi-dev is not installed (run scripts/install-deps.sh)"
mkdir -p "$SRC" "${TWINSAN_TOOLS}/bin"

srcdir="$(find "$SRC" -mindepth 1 -maxdepth 1 -type d -name 'fio-*' | sort | tail -n1)"
if [ -z "$srcdir" ] || [ ! -x "$srcdir/configure" ]; then
    log "downloading fio source with apt-get source into ${SRC}"
    # APT::Sandbox::User=root: as root, _apt cannot write into the cache dir.
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    timed "apt-get source fio" \
        bash -c 'cd "$1" && apt-get -q -o APT::Sandbox::User=root source fio' _ "$SRC" \
        || die "apt-get source fio failed (is deb-src enabled and apt-get update run?)"
    srcdir="$(find "$SRC" -mindepth 1 -maxdepth 1 -type d -name 'fio-*' | sort | tail -n1)"
    [ -n "$srcdir" ] || die "apt-get source fio produced no fio-* directory in ${SRC}"
fi

log "building fio in ${srcdir} with -j${JOBS}"
cd "$srcdir"
make_quiet() { make -s -j"$JOBS" "$@" >"${SRC}/make.log" 2>&1 || { tail -n 40 "${SRC}/make.log" >&2; return 1; }; }
if [ -f config-host.mak ]; then make -s clean >/dev/null 2>&1 || true; fi
# --disable-native: the cached binary must not depend on this exact CPU model.
timed "fio configure" ./configure --enable-libiscsi --disable-native >"${SRC}/configure.log" 2>&1 \
    || { tail -n 40 "${SRC}/configure.log" >&2; die "fio configure failed"; }
grep -qE '^iscsi engine[[:space:]]+yes' "${SRC}/configure.log" \
    || { grep -iE 'iscsi' "${SRC}/configure.log" >&2 || true; die "fio configure did not enable libiscsi"; }
timed "fio make -j${JOBS}" make_quiet || die "fio build failed (see ${SRC}/make.log)"
install -m 0755 fio "$BIN"

works || die "built ${BIN} but it has no libiscsi engine"
log "installed ${BIN} ($("$BIN" --version))"
print_timings
