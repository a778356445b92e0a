#!/bin/busybox sh
# /init of the VM test's guest: the whole user flow on a real /dev/nbd0.
# Prints one line per step, "VMTEST <step> ok [detail]" or
# "VMTEST <step> FAIL <why>", then "VMTEST end", and powers off. The host
# (scripts/vm/run.sh, test/vm_test.go) checks every expected step passed.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1200m tmp /work
mount -t tmpfs run /run
exec >/dev/console 2>&1

T0=$(cut -d. -f1 /proc/uptime)
ok() { echo "VMTEST $1 ok $(( $(cut -d. -f1 /proc/uptime) - T0 ))s ${2:-}"; }
fail() { echo "VMTEST $1 FAIL $2"; }
# step NAME CMD...: runs CMD (a shell function), prints the result line.
# Not in $(...): a step may leave a process running (serve), whose output
# would keep a command substitution waiting.
step() {
  name=$1; shift
  if "$@" >$W/step.out 2>&1; then
    ok "$name" "$(tail -n1 $W/step.out)"
  else
    fail "$name" "$(tail -n5 $W/step.out | tr '\n' '|')"
    FAILED=1
  fi
}
finish() {
  echo "VMTEST end"
  sync
  poweroff -f
}
FAILED=0
export NBDCLONE_CONTROL=/run/nbdclone/control.sock
W=/work
SECTORS=131072 # 64 MiB

modules() {
  for m in $(cat /modules/order); do
    insmod /modules/"$m" || return 1
  done
  [ -b /dev/nbd0 ] || { echo "no /dev/nbd0"; return 1; }
  echo "$(wc -l </modules/order) modules"
}

serve() {
  nbdclone serve --state $W/state --log-level info --on-event 'echo "$NBDCLONE_EVENT $NBDCLONE_DEVICE $NBDCLONE_NBD" >>/work/events' 2>>$W/serve.log &
  SERVE_PID=$!
  for i in $(seq 100); do
    nbdclone ls >/dev/null 2>&1 && { echo "pid $SERVE_PID"; return 0; }
    sleep 0.1
  done
  cat $W/serve.log; return 1
}

source_image() {
  mkdir -p $W/files/dir
  dd if=/dev/urandom of=$W/files/random.bin bs=1M count=8 2>/dev/null
  dd if=/dev/urandom of=$W/files/dir/small.bin bs=3000 count=1 2>/dev/null
  seq 1 200000 >$W/files/dir/numbers.txt
  echo hello >$W/files/hello.txt
  (cd $W/files && find . -type f | sort | xargs sha256sum) >$W/sums
  mkfs.ext4 -q -F -b 4096 -E nodiscard -d $W/files $W/src.img 64M || return 1
  truncate -s 64M $W/dest.img
  echo "$(wc -l <$W/sums) files"
}

create() {
  nbdclone create clone --table "0 $SECTORS clone $W/md $W/dest.img $W/src.img 8 2 no_hydration auto_linear" || return 1
  nbdclone status clone
}

attach() {
  dev=$(nbdclone attach clone /dev/nbd0) || return 1
  [ "$dev" = /dev/nbd0 ] || { echo "attach printed $dev"; return 1; }
  nbdclone ls | grep -q "/dev/nbd0" || { nbdclone ls; return 1; }
  [ "$(cat /sys/block/nbd0/size)" = $SECTORS ] || { echo "size $(cat /sys/block/nbd0/size)"; return 1; }
  echo "bs $(cat /sys/block/nbd0/queue/logical_block_size) discard_max $(cat /sys/block/nbd0/queue/discard_max_bytes)"
}

attach_busy() {
  # A second attach of the same device, and another device on /dev/nbd0.
  if out=$(nbdclone attach clone /dev/nbd1 2>&1); then echo "second attach worked"; return 1; fi
  echo "$out" | grep -q "already attached to /dev/nbd0" || { echo "$out"; return 1; }
  echo "$out"
}

mount_check() {
  mkdir -p /mnt/c
  mount -t ext4 /dev/nbd0 /mnt/c || return 1
  (cd /mnt/c && sha256sum -c -s $W/sums) || return 1
  echo "files check"
}

write_file() {
  dd if=/dev/urandom of=/mnt/c/new.bin bs=64k count=16 2>/dev/null || return 1
  sync
  (cd /mnt/c && sha256sum ./new.bin) >>$W/sums
  echo ok
}

hydrated() { nbdclone status clone | awk '{print $7}' | cut -d/ -f1; }

trim() {
  before=$(hydrated)
  fstrim -v /mnt/c || return 1
  after=$(hydrated)
  [ "$after" -gt "$before" ] || { echo "hydrated $before -> $after"; return 1; }
  echo "hydrated regions $before -> $after: $(nbdclone status clone)"
}

kill_restart() {
  # Crash the daemon under a direct-I/O writer on the mounted filesystem:
  # the kernel holds /dev/nbd0's I/O until the restarted daemon reconnects
  # it, and the writer's data (fsynced) is all there.
  cat $W/files/random.bin $W/files/random.bin $W/files/random.bin >$W/big.bin
  dd if=$W/big.bin of=/mnt/c/copy.bin bs=4k oflag=direct conv=fsync 2>$W/dd-kill.err &
  DPID=$!
  sleep 0.3
  kill -0 $DPID 2>/dev/null || { echo "the writer finished before the kill"; return 1; }
  kill -9 $SERVE_PID; wait $SERVE_PID 2>/dev/null
  written=$(du -k /mnt/c/copy.bin | cut -f1)
  serve >/dev/null || return 1
  wait $DPID || { cat $W/dd-kill.err; return 1; }
  nbdclone ls | grep -q "/dev/nbd0" || { nbdclone ls; return 1; }
  st=$(nbdclone status clone)
  echo "$st" | grep -q " 2 no_hydration auto_linear " || { echo "after restart: $st"; return 1; }
  echo 3 >/proc/sys/vm/drop_caches
  cmp /mnt/c/copy.bin $W/big.bin || return 1
  (cd /mnt/c && sha256sum -c -s $W/sums) || return 1
  echo "writer at ${written} KiB of 24576 at the kill; after restart: $st"
}

hydrate() {
  nbdclone message clone 0 hydration_threshold 64 || return 1
  nbdclone message clone 0 hydration_batch_size 64 || return 1
  nbdclone message clone 0 enable_hydration || return 1
  timeout 300 nbdclone wait clone || return 1
  # auto_linear: wait returns once the daemon swapped it to linear.
  st=$(nbdclone status clone)
  [ "$st" = "0 $SECTORS linear" ] || { echo "after wait: $st"; return 1; }
  for i in $(seq 100); do grep -q "^linear clone /dev/nbd0" $W/events && break; sleep 0.1; done
  grep -q "^linear clone /dev/nbd0" $W/events || { cat $W/events; return 1; }
  echo "$st; events: $(tr '\n' ',' <$W/events)"
}

reader_loop() {
  while [ ! -e $W/stop ]; do
    if dd if=/dev/nbd0 of=/dev/null bs=1M iflag=direct 2>$W/dd.err; then
      echo x >>$W/reads
    else
      cat $W/dd.err >>$W/read-errors; echo fail >>$W/read-errors
    fi
  done
}

swap_under_reader() {
  # A reader on the raw device and on the filesystem, while the device is
  # swapped clone -> linear -> clone -> linear by hand.
  rm -f $W/reads $W/read-errors $W/stop
  reader_loop &
  RPID=$!
  while [ ! -s $W/reads ]; do sleep 0.2; done
  for table in "clone $W/md $W/dest.img $W/src.img 8 1 no_hydration" "linear $W/dest.img 0"; do
    nbdclone suspend clone || return 1
    nbdclone load clone --table "0 $SECTORS $table" || return 1
    sleep 1 # the reader waits at the suspended device
    nbdclone resume clone || return 1
    n=$(wc -l <$W/reads)
    while [ "$(wc -l <$W/reads)" -le "$n" ] && [ ! -s $W/read-errors ]; do sleep 0.2; done
  done
  touch $W/stop; wait $RPID
  [ ! -s $W/read-errors ] || { cat $W/read-errors; return 1; }
  echo 3 >/proc/sys/vm/drop_caches
  (cd /mnt/c && sha256sum -c -s $W/sums) || return 1
  echo "$(wc -l <$W/reads) full reads, no error; $(nbdclone status clone)"
}

refuse_linear() {
  # A linear table over a clone that is not hydrated is refused.
  truncate -s 1M $W/dest2.img
  nbdclone create half --table "0 2048 clone $W/md2 $W/dest2.img $W/src.img 8 1 no_hydration" || return 1
  if out=$(nbdclone load half --table "0 2048 linear $W/dest2.img 0" 2>&1); then echo "load worked"; return 1; fi
  echo "$out" | grep -q "not fully hydrated" || { echo "$out"; return 1; }
  nbdclone remove half || return 1
  echo "$out"
}

detach_busy() {
  if out=$(nbdclone detach /dev/nbd0 2>&1); then echo "detach of a mounted device worked"; return 1; fi
  echo "$out" | grep -q "busy" || { echo "$out"; return 1; }
  if rm_out=$(nbdclone remove clone 2>&1); then echo "remove of an attached device worked"; return 1; fi
  [ "$rm_out" = "nbdclone: device clone is attached to /dev/nbd0: nbdclone detach /dev/nbd0 first (or remove --force)" ] || { echo "$rm_out"; return 1; }
  echo "$out; $rm_out"
}

umount_fsck() {
  umount /mnt/c || return 1
  cmp /dev/nbd0 $W/dest.img || return 1
  e2fsck -fn $W/dest.img >$W/fsck.out 2>&1 || { cat $W/fsck.out; return 1; }
  tail -n1 $W/fsck.out
}

detach() {
  nbdclone detach /dev/nbd0 || return 1
  if nbdclone ls | grep -q /dev/nbd0; then nbdclone ls; return 1; fi
  [ "$(cat /sys/block/nbd0/size)" = 0 ] || { echo "size $(cat /sys/block/nbd0/size) after detach"; return 1; }
  nbdclone remove clone || return 1
  echo ok
}

no_module() {
  rmmod nbd || return 1
  if out=$(nbdclone create c2 --table "0 $SECTORS linear $W/dest.img 0" && nbdclone attach c2 /dev/nbd0 2>&1); then echo "attach worked"; return 1; fi
  [ "$out" = "nbdclone: the nbd kernel module is not loaded: modprobe nbd" ] || { echo "$out"; return 1; }
  echo "$out"
}

stop() {
  kill $SERVE_PID && wait $SERVE_PID || return 1
  grep -q "auto_linear: swapped to linear" $W/serve.log || return 1
  echo ok
}

step modules modules
step serve serve
step source-image source_image
step create create
step attach attach
step attach-busy attach_busy
step mount mount_check
step write write_file
step fstrim trim
step kill-restart kill_restart
step hydrate-auto-linear hydrate
step swap-under-reader swap_under_reader
step refuse-linear refuse_linear
step detach-busy detach_busy
step umount-fsck umount_fsck
step detach detach
step no-module no_module
step stop stop
if [ "$FAILED" != 0 ]; then echo "--- serve.log"; tail -n 60 $W/serve.log; echo "--- dmesg"; dmesg | tail -n 40; fi
finish
