#!/usr/bin/env bash
# The /dev/nbdX VM test: builds the kernel and initramfs (build.sh), boots
# them with qemu -accel tcg, and checks that the guest (guest.sh) printed
# "VMTEST <step> ok" for every step, within the time limit.
#
#   scripts/vm/run.sh [LOG]     exit 0: every step passed; 1: a step failed
#                               or was missing, or the guest timed out;
#                               3: qemu or the kernel package unavailable.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOG=${1:-$ROOT/.cache/vm/guest.log}
TIMEOUT=${VM_TIMEOUT:-480}
STEPS="modules serve source-image create attach attach-busy mount write fstrim kill-restart
hydrate-auto-linear swap-under-reader refuse-linear detach-busy umount-fsck detach no-module stop"

command -v qemu-system-x86_64 >/dev/null || { echo "vm test: unavailable: qemu-system-x86_64 not found (run scripts/install-deps.sh)" >&2; exit 3; }
OUT=$(mktemp -d "${TMPDIR:-/tmp}/nbdclone-vm.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
"$ROOT/scripts/vm/build.sh" "$OUT"

mkdir -p "$(dirname "$LOG")"
start=$(date +%s)
# KVM is not used: it hangs on these machines; TCG boots in about 12 s.
set +e
timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 2048 -smp 2 \
  -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 rdinit=/init" \
  -nographic -no-reboot -nodefaults -serial stdio </dev/null >"$LOG" 2>&1
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
# Serial output may put terminal escapes before a line's first VMTEST.
results() { tr -d '\r' <"$LOG" | grep -a -o 'VMTEST .*' || true; }
results
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "vm test: FAIL: the guest did not finish within ${TIMEOUT}s (log: $LOG)" >&2
  exit 1
fi
failed=0
for s in $STEPS; do
  if ! results | grep -q "^VMTEST $s ok"; then
    echo "vm test: FAIL: step $s did not pass" >&2
    failed=1
  fi
done
results | grep -q '^VMTEST end' || { echo "vm test: FAIL: the guest did not reach its end" >&2; failed=1; }
if [ $failed -ne 0 ]; then
  echo "vm test: guest log: $LOG" >&2
  tail -n 80 "$LOG" >&2
  exit 1
fi
echo "vm test: every step passed in ${elapsed}s (boot and guest)"
