#!/usr/bin/env bash
# Test of the dom0 binary and the packages (scripts/test.sh runs it as a step):
#
#   1. scripts/build-portable.sh --packages (zig, glibc 2.17), unless --no-build;
#   2. the binary: newest GLIBC_ symbol version <= 2.17 (objdump -T), NEEDED only glibc's
#      libraries and libgcc_s (readelf -d);
#   3. `twinsan check-config` accepts packaging/twinsan.toml and it says data_dir = "/var/lib/twinsan";
#   4. `twinsan serve` with no config serves the embedded default: run in a new network
#      namespace (its own 127.0.0.1:3260, nothing else there), data dir in a temp dir;
#      iscsi-ls -s must list iqn.2026-11.org.twinsan:default with LUN 0, iscsi-readcapacity16
#      a size of exactly 1 GiB, and the LUN file must be sparse. Without namespaces (not root,
#      or TWINSAN_PKGTEST_NO_NETNS=1) it serves on a free loopback port instead, from a config
#      equal to the embedded default but for the port;
#   5. rpm: rpm -qlp lists exactly the expected files, rpm -qcp the config, which is
#      %config(noreplace); Requires no GLIBC_ version > 2.17; scriptlets present; the unit,
#      config and binary inside are byte-identical to packaging/ and the built binary;
#      installed into a scratch root (rpm --root, --noscripts) an upgrade keeps an edited
#      config;
#   6. deb: dpkg -c lists exactly the expected files, conffiles = /etc/twinsan/twinsan.toml,
#      maintainer scripts present, the same byte-identical checks.
#
# Every wait is bounded; the only process started is the twinsan under test, stopped by PID.
# Environment: CARGO_TARGET_DIR, TWINSAN_TOOLS as for build-portable.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

BUILD=1
for arg in "$@"; do
    case "$arg" in
        --no-build) BUILD=0 ;;
        *) die "unknown argument '${arg}' (only --no-build)" ;;
    esac
done

TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
BIN="$TARGET_DIR/x86_64-unknown-linux-gnu/release/twinsan"
RPM="$TARGET_DIR/packages/twinsan-${VERSION}-1.x86_64.rpm"
DEB="$TARGET_DIR/packages/twinsan_${VERSION}-1_amd64.deb"

PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); log "ok: $*"; }
bad() { FAIL=$((FAIL + 1)); log "FAIL: $*"; }
# check DESCRIPTION CMD...: one test case.
check() {
    local what="$1"; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}

SCRATCH="$(mktemp -d /tmp/twinsan-pkgtest.XXXXXX)"
SERVER_PID=""
cleanup() {
    stop_pid "$SERVER_PID" 10
    rm -rf "$SCRATCH"
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # so that cleanup runs when test.sh's timeout fires

if [ "$BUILD" = 1 ]; then
    timed "build-portable.sh --packages" bash scripts/build-portable.sh --packages >/dev/null
fi
for f in "$BIN" "$RPM" "$DEB"; do [ -f "$f" ] || die "${f} missing (run scripts/build-portable.sh --packages)"; done

# ------------------------------------------------------------------ 2. the binary
glibc_max() { objdump -T "$1" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1; }
version_le() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -n1)" = "$2" ]; }
MAX="$(glibc_max "$BIN")"
log "newest glibc symbol version: ${MAX}"
check "binary needs at most GLIBC_2.17 (has ${MAX})" version_le "$MAX" GLIBC_2.17

needed_ok() {
    local lib rc=0
    while read -r lib; do
        case "$lib" in
            libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|libgcc_s.so.1|ld-linux-x86-64.so.2) ;;
            *) log "unexpected NEEDED ${lib}"; rc=1 ;;
        esac
    done < <(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    return "$rc"
}
log "NEEDED: $(readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
check "binary needs only glibc's libraries and libgcc_s" needed_ok "$BIN"
check "binary is x86-64 ELF for GNU/Linux" bash -c "file -b '$BIN' 2>/dev/null | grep -q 'x86-64' || readelf -h '$BIN' | grep -q 'X86-64'"

# ------------------------------------------------------------------ 3. example config
check "twinsan check-config accepts packaging/twinsan.toml" \
    timeout 30 "$BIN" check-config --config packaging/twinsan.toml
check "example config has data_dir = \"/var/lib/twinsan\"" \
    grep -qx 'data_dir = "/var/lib/twinsan"' packaging/twinsan.toml

# ------------------------------------------------------------------ 4. serving
IQN=iqn.2026-11.org.twinsan:default
# serve_and_probe BIN DATA_DIR PORT IQN [--config FILE]: start twinsan, wait for the port,
# run iscsi-ls and iscsi-readcapacity16 (LUN 0), stop it. Their output goes to
# DATA_DIR/iscsi-ls.out. Runs in the caller's network namespace.
serve_and_probe() {
    local bin="$1" dir="$2" port="$3" iqn="$4" rc=0 pid
    shift 4
    mkdir -p "$dir"
    "$bin" serve --data-dir "$dir" "$@" >"$dir/serve.log" 2>&1 &
    pid=$!
    if ! wait_port 127.0.0.1 "$port" 30 "$pid"; then
        log "twinsan did not listen on 127.0.0.1:${port}"; tail -n 20 "$dir/serve.log" >&2; rc=1
    elif ! timeout 30 iscsi-ls -s "iscsi://127.0.0.1:${port}" >"$dir/iscsi-ls.out" 2>&1 \
        || ! timeout 30 iscsi-readcapacity16 "iscsi://127.0.0.1:${port}/${iqn}/0" >>"$dir/iscsi-ls.out" 2>&1; then
        log "iscsi-ls / iscsi-readcapacity16 failed"; cat "$dir/iscsi-ls.out" >&2; rc=1
    fi
    stop_pid "$pid" 10
    return "$rc"
}

probe_embedded() {
    local dir="$SCRATCH/serve" port=3260 out
    if [ "${TWINSAN_PKGTEST_NO_NETNS:-0}" != 1 ] && [ "$(id -u)" -eq 0 ] \
        && timeout 10 unshare --net true 2>/dev/null; then
        log "serving the embedded default in a new network namespace (127.0.0.1:3260)"
        # The child bash is in the namespace; it starts and stops the server by PID itself.
        # shellcheck disable=SC2016  # expanded by the inner bash
        timeout 120 unshare --net bash -c '
            set -euo pipefail
            . scripts/lib/common.sh
            ip link set lo up
            '"$(declare -f serve_and_probe)"'
            serve_and_probe "$1" "$2" 3260 "$3"' _ "$BIN" "$dir" "$IQN" || return 1
    else
        # No namespaces: the embedded default's portal is fixed to 3260, so serve the same
        # configuration on a free port from a file.
        port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
        log "no network namespace; serving the embedded default's configuration on 127.0.0.1:${port}"
        mkdir -p "$dir"
        cat >"$dir/default.toml" <<EOF
[server]
data_dir = "$dir"
[[target]]
iqn = "$IQN"
alias = "twinsan default"
portals = ["127.0.0.1:${port}"]
[[target.lun]]
number = 0
path = "$dir/lun0.img"
size = "1GiB"
EOF
        serve_and_probe "$BIN" "$dir" "$port" "$IQN" --config "$dir/default.toml" || return 1
    fi
    out="$(cat "$dir/iscsi-ls.out")"
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    grep -q "Target:${IQN} Portal:127.0.0.1:${port}" <<<"$out" || { log "target/portal missing"; return 1; }
    grep -q "^Lun:0 .*DIRECT_ACCESS" <<<"$out" || { log "LUN 0 missing"; return 1; }
    grep -qx "Total size:$((1 << 30))" <<<"$out" || { log "LUN 0 is not 1 GiB"; return 1; }
    [ "$(stat -c %s "$dir/lun0.img")" -eq $((1 << 30)) ] || { log "lun0.img is not 1 GiB"; return 1; }
    [ "$(stat -c %b "$dir/lun0.img")" -lt 2048 ] || { log "lun0.img is not sparse"; return 1; }
}
check "portable twinsan serves the embedded default (iscsi-ls: ${IQN}, LUN 0, 1 GiB sparse)" probe_embedded

# ------------------------------------------------------------------ 5. rpm
# One man page per subcommand besides twinsan.1, as `twinsan man --dir` writes them.
MAN_PAGES="$(mkdir -p "$SCRATCH/man" && "$BIN" man --dir "$SCRATCH/man" && find "$SCRATCH/man" -name "*.1" -printf "%f\n" | sort)"
EXPECTED_RPM="/etc/twinsan/twinsan.toml
/usr/bin/twinsan
/usr/lib/systemd/system/twinsan.service
/usr/share/bash-completion/completions/twinsan
/usr/share/doc/twinsan/README.md
/usr/share/doc/twinsan/migration.md
$(sed 's|^|/usr/share/man/man1/|' <<<"$MAN_PAGES")
/usr/share/twinsan/grafana-dashboard.json
/usr/share/zsh/site-functions/_twinsan"
same_list() {  # same_list NAME EXPECTED ACTUAL
    if [ "$2" = "$3" ]; then return 0; fi
    log "$1 differs (expected / actual):"; diff <(printf '%s\n' "$2") <(printf '%s\n' "$3") >&2 || true
    return 1
}
if command -v rpm >/dev/null; then
    log "rpm -qip:"; rpm -qip "$RPM" 2>/dev/null | sed 's/^/    /' >&2 || true
    check "rpm -qlp lists the expected files" \
        same_list "rpm -qlp" "$EXPECTED_RPM" "$(rpm -qlp "$RPM" | sort)"
    check "rpm -qcp: /etc/twinsan/twinsan.toml is the one config file" \
        same_list "rpm -qcp" "/etc/twinsan/twinsan.toml" "$(rpm -qcp "$RPM")"
    # fflags: c = %config, n = noreplace; d = %doc.
    FFLAGS="$(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$RPM")"
    check "rpm: the config is %config(noreplace)" grep -qx '/etc/twinsan/twinsan.toml cn' <<<"$FFLAGS"
    check "rpm: README is %doc" grep -qxE '/usr/share/doc/twinsan/README.md d' <<<"$FFLAGS"
    MODES="$(rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]' "$RPM")"
    check "rpm: /usr/bin/twinsan is 0755 root:root" \
        grep -qx -- "-rwxr-xr-x root:root /usr/bin/twinsan" <<<"$MODES"
    # dom0's rpm is 4.11 (CentOS 7): no zstd payload, no rpmlib() feature it lacks.
    check "rpm: payload is gzip (rpm 4.11 reads no zstd)" \
        test "$(rpm -qp --qf '%{PAYLOADCOMPRESSOR}' "$RPM")" = gzip
    REQS="$(rpm -qpR "$RPM")"
    log "rpm Requires: $(tr '\n' ' ' <<<"$REQS")"
    rpm_glibc_ok() {
        local v
        for v in $(grep -o 'GLIBC_[0-9.]*' <<<"$REQS" | sort -uV); do
            version_le "$v" GLIBC_2.17 || { log "rpm requires ${v}"; return 1; }
        done
        grep -q 'libc.so.6' <<<"$REQS"
    }
    check "rpm: Requires no glibc newer than 2.17" rpm_glibc_ok
    rpmlib_ok() {
        local f rc=0
        for f in $(sed -n 's/^rpmlib(\([A-Za-z]*\)).*/\1/p' <<<"$REQS"); do
            case "$f" in
                CompressedFileNames|PayloadFilesHavePrefix|FileDigests|PayloadIsXz|PayloadIsLzma|PayloadIsBzip2|VersionedDependencies|ScriptletInterpreterArgs|PartialHardlinkSets|HeaderLoadSortsTags|ExplicitPackageProvide|FileCaps|BuiltinLuaScripts|ScriptletExpansion|LargeFiles|TildeInVersions) ;;
                *) log "rpmlib(${f}) is not in rpm 4.11"; rc=1 ;;
            esac
        done
        return "$rc"
    }
    check "rpm: needs no rpmlib() feature newer than rpm 4.11" rpmlib_ok
    SCRIPTS="$(rpm -qp --scripts "$RPM")"
    check "rpm: %post creates /var/lib/twinsan + daemon-reload, %preun disable+stop on removal, nothing starts it" bash -c '
        grep -q "postinstall scriptlet" <<<"$1" && grep -q "preuninstall scriptlet" <<<"$1" &&
        grep -q "install -d -m 0700 /var/lib/twinsan" <<<"$1" &&
        grep -q "daemon-reload" <<<"$1" &&
        ! grep -v "^[[:space:]]*#" <<<"$1" | grep -qE "systemctl (--[a-z-]+ )*(start|restart|enable)"' _ "$SCRIPTS"
    RPMX="$SCRATCH/rpm-x"
    mkdir -p "$RPMX"
    if (cd "$RPMX" && rpm2archive - <"$RPM" | tar -xzf -); then
        check "rpm: unit is byte-identical to packaging/twinsan.service" \
            cmp "$RPMX/usr/lib/systemd/system/twinsan.service" packaging/twinsan.service
        check "rpm: config is byte-identical to packaging/twinsan.toml" \
            cmp "$RPMX/etc/twinsan/twinsan.toml" packaging/twinsan.toml
        check "rpm: /usr/bin/twinsan is the portable binary" cmp "$RPMX/usr/bin/twinsan" "$BIN"
        check "rpm: unit runs /usr/bin/twinsan" \
            grep -qx 'ExecStart=/usr/bin/twinsan serve --config /etc/twinsan/twinsan.toml' \
            "$RPMX/usr/lib/systemd/system/twinsan.service"
    else
        bad "rpm: cannot unpack ${RPM} with rpm2archive"
    fi
    # Install into a scratch root (no scriptlets: they would act on this host's systemd),
    # edit the config, upgrade: the edit must survive.
    rpm_upgrade_keeps_config() {
        local root="$SCRATCH/rpmroot" conf
        conf="$root/etc/twinsan/twinsan.toml"
        mkdir -p "$root"
        rpm --root "$root" --initdb || return 1
        timeout 60 rpm --root "$root" -i --nodeps --noscripts "$RPM" || return 1
        [ -x "$root/usr/bin/twinsan" ] || return 1
        printf '# edited by the admin\n' >>"$conf"
        timeout 60 rpm --root "$root" -U --replacepkgs --nodeps --noscripts "$RPM" || return 1
        grep -q '^# edited by the admin$' "$conf" || { log "upgrade replaced the edited config"; return 1; }
        timeout 60 rpm --root "$root" -e --nodeps --noscripts twinsan || return 1
        [ ! -e "$root/usr/bin/twinsan" ] || { log "erase left /usr/bin/twinsan"; return 1; }
        # rpm keeps an edited %config on erase as .rpmsave.
        [ -e "$conf.rpmsave" ] || { log "erase did not keep the edited config as .rpmsave"; return 1; }
    }
    check "rpm: install, upgrade keeps an edited config, erase keeps it as .rpmsave (scratch root)" \
        rpm_upgrade_keeps_config
else
    bad "rpm not installed (scripts/install-deps.sh installs Debian's rpm)"
fi

# ------------------------------------------------------------------ 6. deb
EXPECTED_DEB="./etc/twinsan/twinsan.toml
./lib/systemd/system/twinsan.service
./usr/bin/twinsan
./usr/share/bash-completion/completions/twinsan
./usr/share/doc/twinsan/README.md
./usr/share/doc/twinsan/copyright
./usr/share/doc/twinsan/migration.md
$(sed 's|^\(.*\)$|./usr/share/man/man1/\1.gz|' <<<"$MAN_PAGES")
./usr/share/twinsan/grafana-dashboard.json
./usr/share/zsh/vendor-completions/_twinsan"
log "dpkg-deb -I:"; dpkg-deb -I "$DEB" | sed 's/^/    /' >&2 || true
check "dpkg -c lists the expected files" \
    same_list "dpkg -c" "$EXPECTED_DEB" "$(dpkg -c "$DEB" | awk '$1 !~ /^d/ {print $NF}' | sort)"
DEBC="$SCRATCH/deb-control"
DEBX="$SCRATCH/deb-x"
dpkg-deb -e "$DEB" "$DEBC"
dpkg-deb -x "$DEB" "$DEBX"
check "deb conffiles: /etc/twinsan/twinsan.toml" \
    same_list "conffiles" "/etc/twinsan/twinsan.toml" "$(sed '/^$/d' "$DEBC/conffiles" 2>/dev/null)"
check "deb: postinst creates /var/lib/twinsan and runs daemon-reload, nothing starts the service" bash -c '
    grep -q "install -d -m 0700 /var/lib/twinsan" "$1/postinst" && grep -q daemon-reload "$1/postinst" &&
    [ -x "$1/prerm" ] && [ -x "$1/postrm" ] &&
    ! cat "$1/postinst" "$1/prerm" "$1/postrm" | grep -v "^[[:space:]]*#" |
        grep -qE "systemctl (--[a-z-]+ )*(start|restart|enable)"' _ "$DEBC"
check "deb: Depends on libc6 (>= 2.17)" grep -q '^Depends:.*libc6 (>= 2.17)' "$DEBC/control"
check "deb: unit is byte-identical to packaging/twinsan.service" \
    cmp "$DEBX/lib/systemd/system/twinsan.service" packaging/twinsan.service
check "deb: config is byte-identical to packaging/twinsan.toml" \
    cmp "$DEBX/etc/twinsan/twinsan.toml" packaging/twinsan.toml
check "deb: /usr/bin/twinsan is the portable binary" cmp "$DEBX/usr/bin/twinsan" "$BIN"
check "deb: /usr/bin/twinsan is mode 0755" bash -c '[ "$(stat -c %a "$1")" = 755 ]' _ "$DEBX/usr/bin/twinsan"
# cargo-deb gzips man pages, as Debian policy wants.
check "deb: the man page is the binary's (twinsan man)" \
    cmp <(zcat "$DEBX/usr/share/man/man1/twinsan.1.gz") "$SCRATCH/man/twinsan.1"
check "deb: man -l renders the packaged page" bash -c \
    'MANWIDTH=80 MANPAGER=cat man -l "$1" 2>&1 | grep -q "twinsan-status"' _ "$DEBX/usr/share/man/man1/twinsan.1.gz"
check "deb: the bash completion loads and completes subcommands" bash -c \
    'source "$1" && complete -p twinsan >/dev/null && COMP_WORDS=(twinsan sta) COMP_CWORD=1 &&
     _twinsan twinsan sta twinsan && printf "%s\n" "${COMPREPLY[@]}" | grep -qx status' \
    _ "$DEBX/usr/share/bash-completion/completions/twinsan"

# The unit itself: systemd-analyze (when present) must not report errors for keys it knows;
# AmbientCapabilities is known to every systemd this runs on (>= 229) except dom0's 219.
if command -v systemd-analyze >/dev/null; then
    unit_ok() {
        local out
        out="$(timeout 30 systemd-analyze verify "$DEBX/lib/systemd/system/twinsan.service" 2>&1)" || true
        printf '%s\n' "$out" | sed 's/^/    systemd-analyze: /' >&2
        ! grep -qiE 'unknown (lvalue|key|section)|failed to parse|invalid' <<<"$out"
    }
    check "systemd-analyze verify: no unknown or invalid keys in the unit" unit_ok
fi

log "rpm: $(stat -c %s "$RPM") bytes, deb: $(stat -c %s "$DEB") bytes, binary: $(stat -c %s "$BIN") bytes, ${MAX}"
print_timings
printf '%s passed, %s failed\n' "$PASS" "$FAIL"
[ "$FAIL" -eq 0 ]
