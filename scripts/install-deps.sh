#!/usr/bin/env bash
# Installs the Debian packages nbdclone's tests, demo and benchmarks need.
# Idempotent: packages already present are not fetched again; apt-get update runs once,
# and only when something is missing.
set -euo pipefail

packages=(
  nbdkit            # real NBD servers as sources and peers (file, delay, error, stats, cow filters)
  libnbd-bin        # nbdinfo, nbdcopy, nbdfuse, nbdsh
  python3-libnbd    # nbdsh scripting
  qemu-utils        # qemu-io, qemu-img, qemu-nbd
  fio               # ioengine=nbd load and verify
  e2fsprogs         # mkfs.ext4, e2fsck
  fuse3             # nbdfuse mounts
  util-linux        # losetup, fstrim, blkdiscard
  cpio              # VM initramfs
  busybox-static    # VM initramfs userland
  qemu-system-x86   # the /dev/nbdX VM test
  nbd-client        # attaches /dev/nbdX inside the VM
  tmux              # terminal capture of the progress bar
  time              # /usr/bin/time -v peak memory in benchmarks
  hyperfine
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${missing[*]}; run as root (apt-get) to install them" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
