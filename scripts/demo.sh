#!/usr/bin/env bash
# The dm-clone flow end to end with nbdclone, on a sample it makes itself:
# an ext4 "archive" image is cloned, mounted at once through NBD (nbdfuse +
# loop), trimmed so free space is never copied, hydrated in the background
# with a progress bar, and swapped live to a linear mapping of the
# destination while a reader keeps reading. Needs root (loop, mount).
#
#   scripts/demo.sh [path/to/nbdclone]     (make demo builds it first)
set -euo pipefail

BIN=$(realpath "${1:-bin/nbdclone}")
SIZE_MB=${DEMO_SIZE_MB:-256}
SECTORS=$((SIZE_MB * 2048))

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (losetup, mount)" >&2
  exit 1
fi
for tool in nbdfuse nbdcopy nbdinfo mkfs.ext4 e2fsck losetup fstrim sha256sum; do
  command -v "$tool" >/dev/null || { echo "demo: $tool missing: run scripts/install-deps.sh" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/nbdclone-demo.XXXXXX)
export NBDCLONE_CONTROL=$WORK/control.sock
SOCK=$WORK/nbd.sock
URI="nbd+unix:///clone?socket=$SOCK"
LOOP=""
SERVE_PID=""
FUSE_PID=""
READER_PID=""

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
status() { printf '    status: %s\n' "$("$BIN" status clone)"; }

cleanup() {
  set +e
  [ -n "$READER_PID" ] && kill "$READER_PID" 2>/dev/null
  mountpoint -q "$WORK/fs" && umount "$WORK/fs"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  mountpoint -q "$WORK/fuse" && umount "$WORK/fuse"
  [ -n "$FUSE_PID" ] && wait "$FUSE_PID" 2>/dev/null
  if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID"; wait "$SERVE_PID"; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

step "Making a sample source: a ${SIZE_MB} MiB ext4 image, about a third full"
mkdir -p "$WORK/content/docs" "$WORK/content/data" "$WORK/fuse" "$WORK/fs"
for i in 1 2 3 4; do head -c $((16 << 20)) /dev/urandom >"$WORK/content/data/blob$i.bin"; done
for i in $(seq 1 50); do seq 1 $((i * 200)) >"$WORK/content/docs/file$i.txt"; done
mkfs.ext4 -q -F -d "$WORK/content" "$WORK/src.img" "${SIZE_MB}M" 2>&1 | grep -v "^Creating regular file" || true
(cd "$WORK/content" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/content.sha256"
truncate -s "${SIZE_MB}M" "$WORK/dest.img"
echo "    source:      $WORK/src.img (read-only from now on)"
echo "    destination: $WORK/dest.img (sparse, empty)"
SRC_SUM=$(sha256sum <"$WORK/src.img")

step "Starting the daemon: nbdclone serve"
"$BIN" serve --listen "unix:$SOCK" --state "$WORK/state" --log-level warn 2>"$WORK/serve.log" &
SERVE_PID=$!
for _ in $(seq 100); do "$BIN" ls >/dev/null 2>&1 && break; sleep 0.1; done

step "Creating the clone with no_hydration: usable at once, nothing copied yet"
TABLE="0 $SECTORS clone $WORK/md $WORK/dest.img $WORK/src.img 8 1 no_hydration"
echo "    table: $TABLE"
"$BIN" create clone --table "$TABLE"
nbdinfo "$URI" | sed -n 's/^/    /p' | grep -E 'export-size|can_(flush|fua|trim|zero|multi_conn)' || true
status

step "Mounting it: nbdfuse + loop + mount (the same as /dev/nbdX on a kernel with NBD)"
nbdfuse "$WORK/fuse/disk" "$URI" &
FUSE_PID=$!
for _ in $(seq 100); do [ -e "$WORK/fuse/disk" ] && break; sleep 0.1; done
LOOP=$(losetup -f --show "$WORK/fuse/disk")
mount -o noatime "$LOOP" "$WORK/fs"
df -h "$WORK/fs" | sed 's/^/    /'
(cd "$WORK/fs" && sha256sum --quiet -c "$WORK/content.sha256") && echo "    every file's checksum matches the source"

step "fstrim: discarded free space is marked hydrated without copying"
status
fstrim -v "$WORK/fs" | sed 's/^/    /'
"$BIN" status clone >/dev/null # commits, as dmsetup status does
status

step "Enabling hydration (threshold 256 regions, batches of 64) and waiting"
"$BIN" message clone 0 hydration_threshold 256
"$BIN" message clone 0 hydration_batch_size 64
"$BIN" message clone 0 enable_hydration
"$BIN" wait clone --progress
status

step "Unmounting and swapping to linear live, while a reader keeps reading"
umount "$WORK/fs"
losetup -d "$LOOP"; LOOP=""
umount "$WORK/fuse"; wait "$FUSE_PID" 2>/dev/null || true; FUSE_PID=""
CLONE_SUM=$(nbdcopy "$URI" - | sha256sum)
(while true; do nbdcopy "$URI" /dev/null || { echo "    READER FAILED" >&2; exit 1; }; done) &
READER_PID=$!
sleep 0.5
"$BIN" suspend clone
"$BIN" load clone --table "0 $SECTORS linear $WORK/dest.img 0"
"$BIN" resume clone
sleep 0.5
kill -0 "$READER_PID" || { echo "demo: the reader failed across the swap" >&2; exit 1; }
kill "$READER_PID"; wait "$READER_PID" 2>/dev/null || true; READER_PID=""
echo "    table now: $("$BIN" table clone)"

step "Verifying"
DEST_SUM=$(sha256sum <"$WORK/dest.img")
AFTER_SUM=$(nbdcopy "$URI" - | sha256sum)
[ "$DEST_SUM" = "$CLONE_SUM" ] || { echo "demo: destination differs from what the clone showed" >&2; exit 1; }
[ "$AFTER_SUM" = "$CLONE_SUM" ] || { echo "demo: the linear device differs from the clone" >&2; exit 1; }
echo "    destination image == what the clone showed == the linear device"
[ "$(sha256sum <"$WORK/src.img")" = "$SRC_SUM" ] && echo "    the source was never written"
e2fsck -fn "$WORK/dest.img" >/dev/null 2>&1 && echo "    e2fsck -fn dest.img: clean"
"$BIN" remove clone
step "Done"
