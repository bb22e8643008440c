#!/usr/bin/env bash
# Build the Linux guest used by the tests to run the kernel iSCSI initiator against twinsan:
# Debian bookworm's own kernel plus a XenServer-dom0-like initiator stack (open-iscsi,
# multipath-tools, lvm2, udev, sg3-utils, e2fsprogs, util-linux, busybox, fio) in one
# initramfs. Guest packages are fetched with `apt-get download` and unpacked with dpkg-deb;
# nothing is installed on the host.
#
# Usage: scripts/guest/build-image.sh
#   stdout (exactly two lines):  kernel=/abs/path/vmlinuz
#                                initrd=/abs/path/initrd.gz
#   everything else goes to stderr; exit status non-zero on failure.
#
# Cache: ${TWINSAN_TOOLS}/guest/debs/ (downloaded .debs) and images/<hash>/ where <hash>
# covers the package names+versions, the files of scripts/guest/ and the fio binary.
# When the image exists the script does no network access and returns at once.
# The guest's contract (kernel parameters, /test/run.sh, /lib/twinsan-guest.sh, console
# markers) is described in scripts/guest/init.
#
# Environment:
#   TWINSAN_TOOLS   tool cache (default /var/cache/twinsan-tools)
#   TWINSAN_FIO     fio binary to put in the guest as /usr/bin/fio
#                   (default $TWINSAN_TOOLS/bin/fio-libiscsi)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/lib/common.sh
. "${HERE}/../lib/common.sh"

GUEST_CACHE="${TWINSAN_TOOLS}/guest"
DEBS="${GUEST_CACHE}/debs"
IMAGES="${GUEST_CACHE}/images"
FIO="$(fio_bin)"

# Userspace packages of the guest (the kernel package is resolved from linux-image-amd64).
PKGS=(open-iscsi libopeniscsiusr libisns0
      multipath-tools liburcu8 kpartx libaio1 libjson-c5 libedit2
      lvm2 dmsetup libdevmapper1.02.1 libdevmapper-event1.02.1
      udev sg3-utils sg3-utils-udev libsgutils2-1.46-2 e2fsprogs util-linux busybox-static)

# Kernel modules to load at boot, in this order (their dependencies are added before them).
# Missing or built-in ones are skipped.
MODULES=(virtio_pci virtio_net virtio_blk af_packet crc32c_intel crc32c_generic crct10dif_pclmul
         scsi_mod sd_mod sg scsi_transport_iscsi libiscsi libiscsi_tcp iscsi_tcp
         scsi_dh_alua scsi_dh_emc scsi_dh_rdac
         dm_mod dm_multipath dm_round_robin dm_service_time dm_queue_length dm_snapshot
         crc16 mbcache jbd2 ext4 loop)

# udev rules kept in the guest (LVM's and systemd-run based rules are left out). sg3-utils-udev's
# 55-scsi-sg3_id.rules sets the SCSI_IDENT_* properties multipath's default blacklist exception
# needs for a LUN whose only designator is T10 vendor (the IET identity).
UDEV_RULES=(50-udev-default.rules 55-dm.rules 55-scsi-sg3_id.rules 56-dm-mpath.rules
            56-dm-parts.rules 58-scsi-sg3_symlink.rules 60-block.rules
            60-persistent-storage.rules 60-persistent-storage-dm.rules 60-multipath.rules
            60-kpartx.rules 68-del-part-nodes.rules 95-dm-notify.rules)

APT_DL_OPTS=(-q -o APT::Sandbox::User=root)

[ -x "$FIO" ] || die "fio binary ${FIO} not found (run scripts/install-deps.sh)"
for t in apt-cache apt-get dpkg-deb depmod modprobe ldd cpio gzip ldconfig sha256sum; do
    command -v "$t" >/dev/null || die "${t} not found on the host (run scripts/install-deps.sh)"
done

# ---------------------------------------------------------------- fast path
# The quick key maps (apt lists state, scripts, fio) to the image hash without running
# apt-cache (which takes ~2 s); it is only a lookup shortcut, the image hash is the truth.
quick_key() {
    {
        # shellcheck disable=SC2012  # names, sizes and mtimes only
        ls -l --time-style=+%s /var/lib/apt/lists/ /etc/apt/preferences.d/ 2>/dev/null || true
        cat /etc/apt/preferences 2>/dev/null || true
        sha256sum "$HERE"/* "$HERE/../lib/common.sh"
        stat -c '%s %Y %i' "$(readlink -f "$FIO")"
    } | sha256sum | cut -c1-16
}
QKEY="$(quick_key)"
emit() {  # emit IMAGE_DIR
    printf 'kernel=%s\ninitrd=%s\n' "$1/vmlinuz" "$1/initrd.gz"
}
if [ -f "${IMAGES}/by-key/${QKEY}" ]; then
    hash="$(cat "${IMAGES}/by-key/${QKEY}")"
    if [ -n "$hash" ] && [ -f "${IMAGES}/${hash}/initrd.gz" ] && [ -f "${IMAGES}/${hash}/vmlinuz" ]; then
        emit "${IMAGES}/${hash}"
        exit 0
    fi
fi

# ---------------------------------------------------------------- resolve versions
T_ALL="$(now_s)"
KPKG="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[ -n "$KPKG" ] || die "cannot resolve the kernel package from linux-image-amd64 (apt-get update needed?)"
KVER="${KPKG#linux-image-}"
ALL_PKGS=("$KPKG" "${PKGS[@]}")

# resolve_versions: print "name=version" for every package (candidate versions).
resolve_versions() {
    apt-cache policy "${ALL_PKGS[@]}" 2>/dev/null \
        | awk '/^[^ ]/ {p=$1; sub(/:$/, "", p)} /^  Candidate:/ {print p "=" $2}'
}
mapfile -t PKG_VERSIONS < <(resolve_versions)
if [ "${#PKG_VERSIONS[@]}" -ne "${#ALL_PKGS[@]}" ] || printf '%s\n' "${PKG_VERSIONS[@]}" | grep -q '=(none)$'; then
    log "some guest packages have no candidate version; running apt-get update once"
    timeout 300 apt-get -q update >&2 || die "apt-get update failed"
    mapfile -t PKG_VERSIONS < <(resolve_versions)
fi
[ "${#PKG_VERSIONS[@]}" -eq "${#ALL_PKGS[@]}" ] || die "could not resolve versions of: ${ALL_PKGS[*]}"
if printf '%s\n' "${PKG_VERSIONS[@]}" | grep -q '=(none)$'; then
    die "no candidate version for: $(printf '%s\n' "${PKG_VERSIONS[@]}" | grep '=(none)$' | tr '\n' ' ')"
fi

HASH="$({
    printf '%s\n' "${PKG_VERSIONS[@]}"
    (cd "$HERE" && sha256sum ./*)
    sha256sum <"$FIO"
} | sha256sum | cut -c1-16)"
IMG="${IMAGES}/${HASH}"
mkdir -p "${IMAGES}/by-key"
record_key() {
    printf '%s\n' "$HASH" >"${IMAGES}/by-key/${QKEY}.tmp.$$"
    mv -f "${IMAGES}/by-key/${QKEY}.tmp.$$" "${IMAGES}/by-key/${QKEY}"
}
if [ -f "${IMG}/initrd.gz" ] && [ -f "${IMG}/vmlinuz" ]; then
    record_key
    emit "$IMG"
    exit 0
fi
log "building guest image ${HASH} (kernel ${KVER}) in ${IMAGES}"

WORK="$(mktemp -d "${IMAGES}/.build-${HASH}.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# ---------------------------------------------------------------- download
deb_file() {  # deb_file NAME VERSION: path of the cached .deb, if any
    local f
    for f in "${DEBS}/${1}_${2//:/%3a}_"*.deb; do
        [ -f "$f" ] && { printf '%s\n' "$f"; return 0; }
    done
    return 1
}
mkdir -p "$DEBS" "${WORK}/dl"
want=()
for pv in "${PKG_VERSIONS[@]}"; do
    deb_file "${pv%%=*}" "${pv#*=}" >/dev/null || want+=("$pv")
done
if [ "${#want[@]}" -gt 0 ]; then
    log "downloading ${#want[@]} packages: ${want[*]}"
    if ! (cd "${WORK}/dl" && timeout 600 apt-get "${APT_DL_OPTS[@]}" download "${want[@]}" >&2); then
        log "apt-get download failed; running apt-get update once and retrying"
        timeout 300 apt-get -q update >&2 || die "apt-get update failed"
        (cd "${WORK}/dl" && timeout 600 apt-get "${APT_DL_OPTS[@]}" download "${want[@]}" >&2) \
            || die "apt-get download ${want[*]} failed"
    fi
    for f in "${WORK}/dl/"*.deb; do mv -f "$f" "${DEBS}/"; done
fi
DEB_FILES=()
for pv in "${PKG_VERSIONS[@]}"; do
    f="$(deb_file "${pv%%=*}" "${pv#*=}")" || die "package ${pv} was not downloaded"
    DEB_FILES+=("$f")
done

# ---------------------------------------------------------------- unpack
X="${WORK}/x"          # all packages unpacked
R="${WORK}/root"       # the initramfs tree
OUT="${WORK}/out"
mkdir -p "$X" "$R" "$OUT"
unpack() {
    local f
    for f in "${DEB_FILES[@]}"; do dpkg-deb -x "$f" "$X"; done
}
timed "unpack ${#DEB_FILES[@]} packages" unpack
[ -f "${X}/boot/vmlinuz-${KVER}" ] || die "kernel image boot/vmlinuz-${KVER} missing in ${KPKG}"
cp "${X}/boot/vmlinuz-${KVER}" "${OUT}/vmlinuz"

# ---------------------------------------------------------------- modules
MODDIR="lib/modules/${KVER}"
depmod -b "$X" "$KVER" || die "depmod on the unpacked kernel failed"
mkdir -p "${R}/${MODDIR}"
cp "${X}/${MODDIR}/modules.order" "${X}/${MODDIR}/modules.builtin" "${X}/${MODDIR}/modules.builtin.modinfo" "${R}/${MODDIR}/"
: >"${WORK}/modlist"
for m in "${MODULES[@]}"; do
    if ! deps="$(modprobe -d "$X" -S "$KVER" --show-depends "$m" 2>/dev/null)"; then
        log "module ${m}: not available in ${KVER}, skipped"
        continue
    fi
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        rel="${path#"${X}/"}"
        grep -qxF "$rel" "${WORK}/modlist" || printf '%s\n' "$rel" >>"${WORK}/modlist"
    done <<<"$deps"
    grep -q '^builtin ' <<<"$deps" && log "module ${m}: built in"
done
NMOD=0
while read -r rel; do
    mkdir -p "${R}/$(dirname "$rel")"
    case "$rel" in
        *.ko) cp "${X}/${rel}" "${R}/${rel}" ;;
        *.ko.xz) xz -dc "${X}/${rel}" >"${R}/${rel%.xz}" ;;
        *.ko.zst) zstd -qdc "${X}/${rel}" >"${R}/${rel%.zst}" ;;
        *.ko.gz) gzip -dc "${X}/${rel}" >"${R}/${rel%.gz}" ;;
        *) die "unexpected module file ${rel}" ;;
    esac
    printf '/%s\n' "$(sed -E 's/\.(xz|zst|gz)$//' <<<"$rel")" >>"${R}/lib/modules/twinsan-modules.list"
    NMOD=$((NMOD + 1))
done <"${WORK}/modlist"
depmod -b "$R" "$KVER" || die "depmod on the guest modules failed"
log "${NMOD} kernel modules"

# ---------------------------------------------------------------- userspace
mkdir -p "${R}"/{bin,sbin,usr/bin,usr/sbin,lib64,etc,proc,sys,dev,run,tmp,root,mnt,var/lib,var/log,test}
ln -s /run/lock "${R}/var/lock" 2>/dev/null || true
ln -s /run "${R}/var/run" 2>/dev/null || true
# Everything the packages ship except documentation, kernel, systemd units and locales.
( cd "$X" && tar -c --exclude=./boot --exclude=./lib/modules --exclude=./usr/share/doc \
      --exclude=./usr/share/man --exclude=./usr/share/locale --exclude=./usr/share/lintian \
      --exclude=./usr/share/bash-completion --exclude=./usr/share/zsh --exclude=./usr/share/info \
      --exclude=./usr/share/initramfs-tools --exclude=./lib/systemd/system --exclude=./lib/systemd/network \
      --exclude=./etc/init.d --exclude=./etc/cron.d --exclude=./etc/cron.daily --exclude=./lib/udev/rules.d \
      --exclude=./lib/udev/hwdb.d --exclude=./usr/lib/udev/rules.d --exclude=./usr/share/doc-base \
      --exclude='./usr/lib/x86_64-linux-gnu/*.a' --exclude=./usr/include --exclude=./usr/share/pkgconfig \
      --exclude=./usr/lib/x86_64-linux-gnu/pkgconfig --exclude=./lib/pkgconfig \
      . ) | tar -x -C "$R"
mkdir -p "${R}/lib/udev/rules.d"
for r in "${UDEV_RULES[@]}"; do
    [ -f "${X}/lib/udev/rules.d/${r}" ] || die "udev rule ${r} missing from the packages"
    cp "${X}/lib/udev/rules.d/${r}" "${R}/lib/udev/rules.d/"
done
install -m 755 "$FIO" "${R}/usr/bin/fio"

# Shared libraries of every ELF file: guest packages' libraries first, then the host's.
GUEST_LIBPATH="${X}/lib:${X}/lib/x86_64-linux-gnu:${X}/usr/lib/x86_64-linux-gnu:${X}/usr/lib:${X}/lib/multipath"
is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }
: >"${WORK}/libs"
while IFS= read -r -d '' f; do
    is_elf "$f" || continue
    out="$(LD_LIBRARY_PATH="$GUEST_LIBPATH" ldd "$f" 2>&1)" || {
        grep -q 'not a dynamic executable\|statically linked' <<<"$out" && continue
        die "ldd ${f#"$R"} failed: ${out}"
    }
    if grep -q 'not found' <<<"$out"; then
        die "missing shared libraries for ${f#"$R"}: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"
    fi
    awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out" >>"${WORK}/libs"
done < <(find "$R" -type f -print0)
# The loader, and libgcc_s that glibc dlopens for pthread_cancel (multipathd aborts without it).
for lib in /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/libgcc_s.so.1; do
    [ -e "$lib" ] || die "${lib} missing on the host"
    printf '%s\n' "$lib" >>"${WORK}/libs"
done
NLIB=0
while read -r lib; do
    case "$lib" in
        "${X}"/*) dest="${lib#"${X}"}" ;;
        *) dest="$lib" ;;
    esac
    [ -e "${R}${dest}" ] && continue
    mkdir -p "${R}$(dirname "$dest")"
    cp -L "$lib" "${R}${dest}"
    NLIB=$((NLIB + 1))
done < <(sort -u "${WORK}/libs")
log "${NLIB} shared libraries from the host"
printf '%s\n' /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib /usr/lib /lib/multipath >"${R}/etc/ld.so.conf"
ldconfig -r "$R" || die "ldconfig -r failed"

# busybox for everything the packages do not provide (sh, mount, ip, stty, timeout, ...).
BB="${R}/bin/busybox"
[ -x "$BB" ] || die "busybox missing from busybox-static"
while read -r applet; do
    name="${applet##*/}"
    [ "$name" = busybox ] && continue
    if [ -e "${R}/bin/${name}" ] || [ -e "${R}/sbin/${name}" ] || [ -L "${R}/bin/${name}" ] \
        || [ -e "${R}/usr/bin/${name}" ] || [ -e "${R}/usr/sbin/${name}" ] || [ -L "${R}/sbin/${name}" ]; then
        continue
    fi
    mkdir -p "${R}/$(dirname "$applet")"
    ln -s /bin/busybox "${R}/${applet}"
done < <("$BB" --list-full)
[ -L "${R}/bin/sh" ] || [ -e "${R}/bin/sh" ] || ln -s busybox "${R}/bin/sh"

# /etc basics (udev rules name these groups).
cat >"${R}/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
groups=(root:0 tty:5 disk:6 lp:7 kmem:15 dialout:20 cdrom:24 floppy:25 tape:26 audio:29 video:44
        input:105 kvm:106 render:107 sgx:108 nogroup:65534)
: >"${R}/etc/group"
for g in "${groups[@]}"; do printf '%s:x:%s:\n' "${g%%:*}" "${g#*:}" >>"${R}/etc/group"; done
printf 'twinsan-guest\n' >"${R}/etc/hostname"
: >"${R}/etc/fstab"
ln -sf /proc/self/mounts "${R}/etc/mtab"

install -m 755 "${HERE}/init" "${R}/init"
install -m 644 "${HERE}/twinsan-guest.sh" "${R}/lib/twinsan-guest.sh"
printf '%s\n' "$HASH" >"${R}/etc/twinsan-guest-image"

# ---------------------------------------------------------------- pack
pack() {
    (cd "$R" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 >"${OUT}/initrd.gz"
}
timed "cpio+gzip" pack
log "initrd: $(du -sm "$R" | cut -f1) MiB uncompressed, $(du -m "${OUT}/initrd.gz" | cut -f1) MiB gzip'd"

# Publish atomically; a concurrent build of the same hash may have won the race.
if ! mv -T "$OUT" "$IMG" 2>/dev/null; then
    [ -f "${IMG}/initrd.gz" ] || die "could not move the image into ${IMG}"
    log "image ${HASH} was built concurrently; using that one"
fi
record_key
# Keep the 4 newest images; drop build dirs left by killed runs.
prune() {
    local d n=0
    # shellcheck disable=SC2010  # image dirs are 16 hex digits; ls -t gives newest first
    while read -r d; do
        n=$((n + 1))
        if [ "$n" -gt 4 ] && [ "$d" != "$HASH" ]; then rm -rf "${IMAGES:?}/${d}"; fi
    done < <(cd "$IMAGES" && ls -1t -- | grep -E '^[0-9a-f]{16}$' || true)
    find "$IMAGES" -maxdepth 1 -name '.build-*' -mmin +120 -exec rm -rf {} + 2>/dev/null || true
}
prune
log "guest image ${HASH} ready ($(elapsed "$T_ALL") s)"
emit "$IMG"
