#!/usr/bin/env bash
# Install everything twinsan's tests and benchmarks need on a Debian bookworm machine,
# then build fio with the libiscsi engine (scripts/build-fio.sh) and install the tools of
# the portable build and the packages (scripts/build-portable.sh): cargo-zigbuild, cargo-deb,
# cargo-generate-rpm (cargo install --locked --root $TWINSAN_TOOLS) and zig (PyPI ziglang,
# pip install --target $TWINSAN_TOOLS/ziglang-VERSION), pinned versions.
#
# Idempotent and non-interactive; run as root. When everything is already present it
# does no network access at all and returns in well under a second.
#
# Environment:
#   TWINSAN_TOOLS        cache dir for built tools (default /var/cache/twinsan-tools)
#   TWINSAN_DEPS_EXTRA   extra Debian packages to install too (e.g. "tshark")
#   TWINSAN_SKIP_FIO=1   do not build fio
#   TWINSAN_SKIP_PACKAGING_TOOLS=1   do not install cargo-zigbuild, zig, cargo-deb, cargo-generate-rpm
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

export DEBIAN_FRONTEND=noninteractive
T_ALL="$(now_s)"

[ "$(id -u)" -eq 0 ] || die "install-deps.sh must run as root"
command -v apt-get >/dev/null || die "apt-get not found: only Debian (bookworm) is supported"

# Packages the tests and benchmarks use (see /work/shared/reference/real-clients.md):
#   libiscsi-bin      iscsi-test-cu (conformance), iscsi-ls/-inq/-readcapacity16/-perf probes
#   libiscsi-dev      fio's libiscsi engine (build), pkg-config file
#   tgt               the incumbent target: benchmark and conformance baseline, and the reference
#                     for the tgt-compatible disk identity (tests/migration_import.rs, tgt-admin)
#   qemu-utils, qemu-block-extra   qemu-img/qemu-io with iscsi:// URLs (the iscsi block module)
#   drbd-utils        drbdmeta, the DRBD metadata oracle
#   iproute2          ip netns / veth for the two-node tests
#   iputils-ping, iputils-arping   reachability and the client's ARP view in the HA namespace tests
#   dpkg-dev, build-essential, pkg-config, zlib1g-dev, libaio-dev, xz-utils   apt-get source + fio build
#   rpm               rpm -qlp / -qcp / rpm2archive for the package test (scripts/test-packaging.sh)
#   qemu-system-x86, seabios, kmod, cpio   the Linux initiator guest (scripts/guest/build-image.sh:
#                     depmod/modprobe on the unpacked kernel, cpio for the initramfs, qemu to boot it)
#   man-db            `man -l` renders the generated man page (tests/cli_docs.rs, test-packaging)
#   python3-prometheus-client   parses the /metrics exposition (tests/metrics.rs)
PKGS=(libiscsi-bin libiscsi-dev tgt qemu-utils qemu-block-extra drbd-utils iproute2
      dpkg-dev build-essential pkg-config zlib1g-dev libaio-dev xz-utils python3 procps
      iputils-ping iputils-arping rpm qemu-system-x86 seabios kmod cpio man-db
      python3-prometheus-client)
# shellcheck disable=SC2206  # word splitting of the extra list is intended
PKGS+=(${TWINSAN_DEPS_EXTRA:-})

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

fio_ok() {
    local bin="${TWINSAN_TOOLS}/bin/fio-libiscsi"
    [ -x "$bin" ] && "$bin" --enghelp 2>/dev/null | grep -qw libiscsi
}

# Bounded wait for any other apt/dpkg run (e.g. a background install) to finish.
wait_for_apt() {
    local i
    for ((i = 0; i < 180; i++)); do  # at most 15 minutes
        if ! pgrep -x apt-get >/dev/null && ! pgrep -x apt >/dev/null \
            && ! pgrep -x dpkg >/dev/null && ! pgrep -f unattended-upgr >/dev/null; then
            return 0
        fi
        [ "$i" -eq 0 ] && log "another apt-get/dpkg is running; waiting for it (max 15 min)"
        sleep 5
    done
    die "apt/dpkg still busy after 15 minutes"
}

APT_OPTS=(-y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done

need_fio=0
if [ "${TWINSAN_SKIP_FIO:-0}" != 1 ] && ! fio_ok; then need_fio=1; fi

# Tools of scripts/build-portable.sh, pinned (a version change here reinstalls).
CARGO_TOOLS=(cargo-zigbuild@0.24.1 cargo-deb@3.8.0 cargo-generate-rpm@0.21.1)
ZIGLANG_VERSION=0.15.2
cargo_tool_ok() {  # cargo_tool_ok NAME@VERSION
    local name="${1%@*}" version="${1#*@}"
    [ -x "${TWINSAN_TOOLS}/bin/${name}" ] \
        && "${TWINSAN_TOOLS}/bin/${name}" --version 2>/dev/null | grep -qF "$version"
}
zig_ok() {
    local zig="${TWINSAN_TOOLS}/ziglang-${ZIGLANG_VERSION}/ziglang/zig"
    [ -x "$zig" ] && [ "$("$zig" version 2>/dev/null)" = "$ZIGLANG_VERSION" ]
}
missing_tools=()
if [ "${TWINSAN_SKIP_PACKAGING_TOOLS:-0}" != 1 ]; then
    for t in "${CARGO_TOOLS[@]}"; do cargo_tool_ok "$t" || missing_tools+=("$t"); done
    zig_ok || missing_tools+=("ziglang==${ZIGLANG_VERSION}")
fi

if [ "${#missing[@]}" -eq 0 ] && [ "$need_fio" -eq 0 ] && [ "${#missing_tools[@]}" -eq 0 ]; then
    log "all dependencies present, ${TWINSAN_TOOLS}/bin/fio-libiscsi works, packaging tools cached ($(elapsed "$T_ALL") s)"
    exit 0
fi
log "missing packages: ${missing[*]:-none}; fio-libiscsi needs building: $([ "$need_fio" = 1 ] && echo yes || echo no); packaging tools: ${missing_tools[*]:-cached}"

# deb-src is needed for `apt-get source fio`; enable it before the one apt-get update.
enable_deb_src() {
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -f "$f" ]; then
        if grep -qE '^Types:.*deb-src' "$f"; then return 0; fi
        log "enabling deb-src in ${f}"
        cp -n "$f" "${f}.twinsan-orig" || true
        sed -i -E 's/^Types:[[:space:]]*deb[[:space:]]*$/Types: deb deb-src/' "$f"
    elif [ -f /etc/apt/sources.list ] && ! grep -qE '^deb-src ' /etc/apt/sources.list; then
        log "adding deb-src lines to /etc/apt/sources.list.d/twinsan-deb-src.list"
        grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
            >/etc/apt/sources.list.d/twinsan-deb-src.list
    fi
}

have_src_lists() { compgen -G '/var/lib/apt/lists/*_Sources*' >/dev/null; }

wait_for_apt
update_needed=0
[ "${#missing[@]}" -gt 0 ] && update_needed=1
if [ "$need_fio" -eq 1 ] && [ ! -d "${TWINSAN_TOOLS}/fio-src" ]; then
    enable_deb_src
    have_src_lists || update_needed=1
fi
if [ "$update_needed" -eq 1 ]; then
    timed "apt-get update" apt-get "${APT_OPTS[@]}" update
fi

# Never let package installation start services (tgtd would grab 0.0.0.0:3260).
POLICY=/usr/sbin/policy-rc.d
policy_added=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"; chmod 755 "$POLICY"; policy_added=1
fi
cleanup_policy() { if [ "$policy_added" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup_policy EXIT

if [ "${#missing[@]}" -gt 0 ]; then
    extra_args=()
    # Machines of this kind ship qemu-utils from bookworm-backports (10.x) while
    # qemu-block-extra (the iscsi:// block module) only exists in bookworm (7.2) and
    # depends on qemu-utils of exactly its own version: pin both to that version.
    if printf '%s\n' "${missing[@]}" | grep -qx qemu-block-extra; then
        qbe_ver="$(apt-cache policy qemu-block-extra | awk '/Candidate:/ {print $2}')"
        qu_ver="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
        if [ -n "$qbe_ver" ] && [ "$qbe_ver" != "(none)" ] && [ "$qu_ver" != "$qbe_ver" ]; then
            log "pinning qemu-utils ${qu_ver:-<none>} -> ${qbe_ver} to match qemu-block-extra"
            mapfile -t missing < <(printf '%s\n' "${missing[@]}" | grep -vxE 'qemu-utils|qemu-block-extra')
            missing+=("qemu-utils=${qbe_ver}" "qemu-block-extra=${qbe_ver}")
            extra_args+=(--allow-downgrades)
        fi
    fi
    timed "apt-get install (${#missing[@]} pkgs)" \
        apt-get "${APT_OPTS[@]}" install --no-install-recommends "${extra_args[@]}" "${missing[@]}"
fi

# Package installs never start tgtd (policy-rc.d), but say so loudly if one is running on 3260.
if port_open 127.0.0.1 3260; then
    log "warning: something listens on 127.0.0.1:3260 (a system tgtd?); tests should use other ports"
fi

if [ "${TWINSAN_SKIP_FIO:-0}" != 1 ]; then
    timed "build fio with libiscsi" bash scripts/build-fio.sh
fi

# Packaging tools into the tool cache: cargo builds them from crates.io (a few minutes on
# 2 cores, once), pip unpacks zig from PyPI's ziglang wheel. Each lands under its final name
# only when complete.
install_cargo_tool() {  # NAME@VERSION
    cargo_tool_ok "$1" && return 0
    cargo install --locked --root "$TWINSAN_TOOLS" "$1"
}
install_zig() {
    local dir="${TWINSAN_TOOLS}/ziglang-${ZIGLANG_VERSION}"
    zig_ok && return 0
    rm -rf "${dir}.tmp" "$dir"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "${dir}.tmp" \
        "ziglang==${ZIGLANG_VERSION}"
    mv "${dir}.tmp" "$dir"
    zig_ok
}
if [ "${#missing_tools[@]}" -gt 0 ]; then
    command -v cargo >/dev/null || die "cargo not found: needed to install ${missing_tools[*]}"
    for t in "${CARGO_TOOLS[@]}"; do
        timed "cargo install ${t}" install_cargo_tool "$t"
    done
    timed "pip install ziglang==${ZIGLANG_VERSION}" install_zig
fi

TIMINGS+=("install-deps total"$'\t'"$(elapsed "$T_ALL")")
print_timings
