#!/usr/bin/env bash
# Builds what the /dev/nbdX VM test boots: Debian's kernel (downloaded once
# with apt-get download and cached), its modules for ext4, loop and nbd, and
# an initramfs holding busybox, a static nbdclone, mkfs.ext4/e2fsck with their
# libraries and the guest script (guest.sh).
#
#   scripts/vm/build.sh OUTDIR      -> OUTDIR/vmlinuz, OUTDIR/initrd.gz
#
# Cache: $VM_CACHE (default .cache/vm in the repository): the kernel package
# and its extracted tree. Exit status 3: the kernel package or a tool is
# unavailable (the Go test fails on it under CI=true, skips elsewhere).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:?usage: build.sh OUTDIR}
CACHE=${VM_CACHE:-$ROOT/.cache/vm}
KVER=${VM_KERNEL:-6.1.0-56-amd64}
GO=${GO:-go}
mkdir -p "$CACHE" "$OUT"

unavailable() { echo "vm build: unavailable: $*" >&2; exit 3; }
for t in cpio gzip busybox mkfs.ext4 e2fsck ldd; do
  command -v "$t" >/dev/null || unavailable "$t not found (run scripts/install-deps.sh)"
done
BUSYBOX=$(command -v busybox)
if command -v file >/dev/null && file -L "$BUSYBOX" | grep -q "dynamically linked"; then unavailable "busybox is not static (install busybox-static)"; fi

# The kernel package, once.
KDIR=$CACHE/linux-image-$KVER
if [ ! -f "$KDIR/.extracted" ]; then
  deb=$(ls "$CACHE"/linux-image-"$KVER"_*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    echo "vm build: downloading linux-image-$KVER (once; cached in $CACHE)" >&2
    (cd "$CACHE" && apt-get download -q "linux-image-$KVER" >&2) || unavailable "apt-get download linux-image-$KVER failed"
    deb=$(ls "$CACHE"/linux-image-"$KVER"_*.deb | head -n1)
  fi
  rm -rf "$KDIR" && mkdir -p "$KDIR"
  dpkg-deb -x "$deb" "$KDIR"
  touch "$KDIR/.extracted"
fi
cp "$KDIR/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
MODDIR=$KDIR/lib/modules/$KVER

# Modules in load order: each after the modules it depends on (read from
# its .modinfo, since the package has no modules.dep).
declare -A seen=()
order=()
modpath() { find "$MODDIR/kernel" -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" | head -n1; }
add_module() {
  local m=$1 p deps d
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  p=$(modpath "$m")
  [ -n "$p" ] || { echo "vm build: module $m not in the kernel package" >&2; exit 1; }
  deps=$(tr '\0' '\n' <"$p" | sed -n 's/^depends=//p' | tr ',' ' ')
  for d in $deps; do add_module "$d"; done
  order+=("$p")
}
for m in crc32c_generic ext4 loop nbd; do add_module "$m"; done

# The static nbdclone.
(cd "$ROOT" && CGO_ENABLED=0 "$GO" build -o "$OUT/nbdclone" ./cmd/nbdclone)

# The initramfs tree.
IR=$OUT/initramfs
rm -rf "$IR"
mkdir -p "$IR"/{bin,sbin,dev,proc,sys,run,tmp,mnt,work,modules,etc}
cp "$BUSYBOX" "$IR/bin/busybox"
cp "$OUT/nbdclone" "$IR/bin/nbdclone"
cp "$ROOT/scripts/vm/guest.sh" "$IR/init"
chmod 755 "$IR/init"
: >"$IR/modules/order"
for p in "${order[@]}"; do
  cp "$p" "$IR/modules/"
  echo "$(basename "$p")" >>"$IR/modules/order"
done
# Dynamic tools with the libraries ldd lists, at the same paths.
copy_bin() {
  local b lib
  b=$(command -v "$1")
  mkdir -p "$IR/$(dirname "$b")"
  cp -L "$b" "$IR/$b"
  for lib in $(ldd "$b" | grep -o '/[^ ]*'); do
    mkdir -p "$IR/$(dirname "$lib")"
    cp -Ln "$lib" "$IR/$lib"
  done
}
for t in mkfs.ext4 mke2fs e2fsck; do copy_bin "$t"; done
cp /etc/mke2fs.conf "$IR/etc/" 2>/dev/null || true
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 >"$OUT/initrd.gz")
echo "vm build: $(du -h "$OUT/initrd.gz" | cut -f1) initramfs, modules: $(tr '\n' ' ' <"$IR/modules/order")" >&2
