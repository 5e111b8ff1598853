#!/bin/bash
# Build the tiny test guest of qemu-vpnnet: Debian's kernel plus a busybox
# initramfs, into vm-images/build/ (git-ignored).
#
#   vm-images/build.sh            build what is missing or out of date
#   vm-images/build.sh --force    rebuild everything (fetches the kernel again)
#   vm-images/build.sh --clean    remove vm-images/build/
#
# Outputs:
#   build/vmlinuz     the kernel (from the package linux-image-amd64 depends on)
#   build/vmlinux     the same kernel uncompressed (ELF): QEMU boots it directly
#                     through its PVH entry point, without firmware real mode and
#                     decompression, which halves a TCG boot (about 3 s vs 6 s).
#                     Absent when the kernel has no PVH entry (CONFIG_PVH).
#   build/initrd.gz   busybox + virtio-net modules + /init (vm-images/init)
#                     + /bin/connloop (vm-images/connloop.c, when gcc is there)
#                     + /udhcpc.script (vm-images/udhcpc.script) + /www
#
# Nothing is installed on the host for the kernel: its package is fetched with
# `apt-get download` and unpacked with `dpkg -x`. Only busybox-static and cpio
# (and xz-utils/zstd when the kernel's modules are compressed) are installed
# with apt-get when they are missing, which needs root.
#
# Environment:
#   VPNNET_VM_BUILD_DIR       output folder (default: vm-images/build)
#   VPNNET_KERNEL_PACKAGE     kernel package (default: what linux-image-amd64
#                             depends on, per `apt-cache depends`)
#
# A second run with everything up to date does nothing. Concurrent runs are
# serialised with flock(1).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${VPNNET_VM_BUILD_DIR:-$HERE/build}
# Load order matters: each module needs the ones before it.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net)

log() { echo "vm-images/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "${1:-}" in
    --clean) rm -rf "$OUT"; exit 0 ;;
    --force) FORCE=1 ;;
    "") FORCE=0 ;;
    *) die "usage: $0 [--force|--clean]" ;;
esac

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

# --- host tools ------------------------------------------------------------

apt_install() {
    [ "$(id -u)" -eq 0 ] || die "need root to apt-get install $*"
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2
}

# The dynamically linked busybox (package "busybox") would not run in the
# initramfs; busybox-static provides a static /bin/busybox.
BUSYBOX=/bin/busybox
if ! dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
    apt_install busybox-static
fi
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi
command -v cpio >/dev/null || apt_install cpio

# --- kernel ----------------------------------------------------------------

kernel_ok() {
    [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/kernel/version" ] && [ -s "$OUT/kernel/modules.list" ]
}

decompress_module() {  # $1 = source (maybe compressed), $2 = destination .ko
    case "$1" in
        *.ko) cp "$1" "$2" ;;
        *.ko.xz)
            command -v xz >/dev/null || apt_install xz-utils
            xz -dc "$1" >"$2" ;;
        *.ko.zst)
            command -v zstd >/dev/null || apt_install zstd
            zstd -qdc "$1" >"$2" ;;
        *.ko.gz) gzip -dc "$1" >"$2" ;;
        *) die "unknown module format: $1" ;;
    esac
}

fetch_kernel() {
    local pkg tmp deb root ver src m n
    pkg=${VPNNET_KERNEL_PACKAGE:-}
    if [ -z "$pkg" ]; then
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
              | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
        [ -n "$pkg" ] || die "apt-cache does not know linux-image-amd64 (run apt-get update?)"
    fi
    tmp="$OUT/tmp.kernel"
    rm -rf "$tmp" "$OUT/kernel"
    mkdir -p "$tmp/deb" "$OUT/kernel/modules"
    # apt drops privileges to _apt for downloads: let it write there.
    if id _apt >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then chown _apt "$tmp/deb"; fi
    log "downloading $pkg"
    (cd "$tmp/deb" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
    deb=$(find "$tmp/deb" -name '*.deb' | head -n1)
    log "unpacking $(basename "$deb")"
    dpkg -x "$deb" "$tmp/root"
    root="$tmp/root"
    src=$(find "$root/boot" -name 'vmlinuz-*' | head -n1)
    [ -f "$src" ] || die "no boot/vmlinuz-* in $deb"
    ver=${src##*/vmlinuz-}
    [ -d "$root/lib/modules/$ver" ] || die "no lib/modules/$ver in $deb"
    : >"$OUT/kernel/modules.list"
    n=0
    for m in "${MODULES[@]}"; do
        src=$(find "$root/lib/modules/$ver/kernel" -name "$m.ko" -o -name "$m.ko.xz" \
                   -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
        if [ -z "$src" ]; then
            if grep -q "/$m\.ko\$" "$root/lib/modules/$ver/modules.builtin" 2>/dev/null; then
                log "$m is built into the kernel"
                continue
            fi
            die "module $m not found in $deb"
        fi
        n=$((n + 1))
        decompress_module "$src" "$OUT/kernel/modules/$(printf '%02d' $n)-$m.ko"
        echo "$(printf '%02d' $n)-$m.ko" >>"$OUT/kernel/modules.list"
    done
    cp "$root/boot/vmlinuz-$ver" "$OUT/vmlinuz.tmp"
    mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    echo "$ver" >"$OUT/kernel/version"
    echo "$pkg" >"$OUT/kernel/package"
    if grep -q '^CONFIG_PVH=y' "$root/boot/config-$ver" 2>/dev/null; then
        echo y >"$OUT/kernel/pvh"
    else
        echo n >"$OUT/kernel/pvh"
    fi
    rm -f "$OUT/vmlinux"
    rm -rf "$tmp"
    log "kernel $ver ready"
}

# Uncompress the kernel the way the kernel's scripts/extract-vmlinux does: try
# each compression's magic number until the result is an ELF file. (The magic
# numbers are cut before any NUL byte, which bash strings cannot hold.)
extract_vmlinux() {  # $1 = bzImage, $2 = output ELF
    local i magic pos
    local magics=($'\xfd7zXZ' $'\x1f\x8b\x08' $'\x28\xb5\x2f\xfd' $'\x02\x21\x4c\x18' 'BZh')
    local cmds=("xz -dc --single-stream" "gzip -dc" "zstd -dcq" "lz4 -dc" "bzip2 -dc")
    for i in "${!magics[@]}"; do
        magic=${magics[$i]}
        command -v "${cmds[$i]%% *}" >/dev/null || continue
        for pos in $(LC_ALL=C grep -abo -- "$magic" "$1" | cut -d: -f1 | head -n 5); do
            tail -c +$((pos + 1)) "$1" | ${cmds[$i]} >"$2.tmp" 2>/dev/null || true
            if [ "$(head -c 4 "$2.tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                mv "$2.tmp" "$2"
                return 0
            fi
        done
    done
    rm -f "$2.tmp"
    return 1
}

if [ "$FORCE" = 1 ] || ! kernel_ok; then
    fetch_kernel
fi
if [ "$(cat "$OUT/kernel/pvh" 2>/dev/null)" = y ] && { [ ! -s "$OUT/vmlinux" ] || [ "$OUT/vmlinux" -ot "$OUT/vmlinuz" ]; }; then
    if extract_vmlinux "$OUT/vmlinuz" "$OUT/vmlinux"; then
        log "uncompressed kernel ready: $OUT/vmlinux"
    else
        log "warning: could not uncompress $OUT/vmlinuz; guests boot the compressed kernel"
    fi
fi

# --- initramfs -------------------------------------------------------------

# Everything the initramfs is made of; when its hash changes, rebuild.
inputs_hash() {
    {
        sha256sum "$HERE/init" "$HERE/udhcpc.script" "$HERE/connloop.c" "$HERE/build.sh" "$BUSYBOX"
        cat "$OUT/kernel/version" "$OUT/kernel/modules.list"
        sha256sum "$OUT"/kernel/modules/*.ko
    } | sha256sum | cut -d' ' -f1
}

build_initrd() {
    local stage applet
    stage="$OUT/tmp.initrd"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,www,var/run}
    mkdir -p "$stage/lib/modules/vpnnet"
    cp "$BUSYBOX" "$stage/bin/busybox"
    for applet in $("$BUSYBOX" --list-full); do
        [ "$applet" = bin/busybox ] && continue
        [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
    done
    # the connection-rate client of scripts/bench's real-VM rows (static: the guest has no libc)
    if command -v gcc >/dev/null; then
        gcc -static -O2 -Wall -o "$stage/bin/connloop" "$HERE/connloop.c" \
            || die "gcc could not build connloop.c"
    else
        log "no gcc: the guest gets no connloop (scripts/bench's VM connections/s row is left out)"
    fi
    install -m 0755 "$HERE/init" "$stage/init"
    install -m 0755 "$HERE/udhcpc.script" "$stage/udhcpc.script"
    cp "$OUT"/kernel/modules/*.ko "$stage/lib/modules/vpnnet/"
    cp "$OUT/kernel/modules.list" "$stage/lib/modules/vpnnet/order"
    cat >"$stage/www/index.html" <<'EOF'
<!DOCTYPE html>
<html><head><title>qemu-vpnnet guest</title></head>
<body><p>hello from qemu-vpnnet guest</p></body></html>
EOF
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
    printf 'root:x:0:\n' >"$stage/etc/group"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$stage/etc/hosts"
    : >"$stage/etc/resolv.conf"
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 | gzip -9n) >"$OUT/initrd.gz.tmp"
    mv "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
    rm -rf "$stage"
}

hash=$(inputs_hash)
if [ "$FORCE" = 1 ] || [ ! -s "$OUT/initrd.gz" ] \
        || [ "$(cat "$OUT/initrd.stamp" 2>/dev/null)" != "$hash" ]; then
    build_initrd
    echo "$hash" >"$OUT/initrd.stamp"
    log "initramfs ready: $OUT/initrd.gz ($(du -k "$OUT/initrd.gz" | cut -f1) KiB)"
fi
