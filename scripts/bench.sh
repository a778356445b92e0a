#!/usr/bin/env bash
# nbdclone benchmarks: every case runs its competitors in the same run,
# alternating, REPS times, and reports medians and ratios as a markdown
# table (and JSON in $OUT/bench.json). Timings on shared machines are noisy:
# read the ratios, not the absolute numbers.
#
#   scripts/bench.sh [path/to/nbdclone]
#   SIZE_MB=1024 REPS=5 FIO_SECONDS=8 scripts/bench.sh
#   CASES="H2" H2_REPS=10 scripts/bench.sh   # H2 alone, 10 repetitions
#
# Cases:
#   H1  full hydration of a local file (page cache warm), tuned threshold and
#       batch, create → `nbdclone wait` (includes the final commit and fsync),
#       vs dd bs=4M conv=fsync and vs cp + sync of the same file.
#   H2  hydration from a remote source: nbdkit file serving the same file on
#       a unix socket, plain and behind --filter=delay rdelay=2ms; a clone
#       with default knobs (the source's window applies), create → wait
#       (includes the final commit and fsync), vs nbdcopy --flush of the same
#       export to a local file, and vs nbdkit's cow filter (cow-on-read=true)
#       read through by nbdcopy (as it is, and with a sync before it exits,
#       since its overlay is never synced otherwise). Then the time to the
#       first byte of a cold 4 KiB read through a clone vs a read from the
#       source itself (median and p99 of H2_READS reads at distinct offsets,
#       in ms). Last, fio 4 KiB random reads (QD32) of hydrated regions while
#       hydration from a source behind rdelay=5ms runs, vs the same with
#       hydration disabled.
#   S1  serving a hydrated clone: fio ioengine=nbd 4 KiB randread and
#       randwrite at iodepth 32, 1 MiB sequential read and write, and 4 MiB
#       sequential reads (larger than one splice pipe), vs
#       nbdkit file and qemu-nbd -f raw serving the destination file directly;
#       each repetition starts with the next server, each run after a sync.
set -euo pipefail

BIN=$(realpath "${1:-bin/nbdclone}")
SIZE_MB=${SIZE_MB:-1024}
REPS=${REPS:-3}
FIO_SECONDS=${FIO_SECONDS:-5}
SECTORS=$((SIZE_MB * 2048))
TUNING=${TUNING:-"hydration_threshold 4096 hydration_batch_size 1024"}
REGION=${REGION:-8}
# Cases to run; M1 (a 1 TiB device, several minutes) only when asked:
# M1=1 or CASES="... M1".
CASES=${CASES:-"H1 H2 S1 S2 S3 F1"}
[ "${M1:-0}" = 1 ] && CASES="$CASES M1"
want() { [[ " $CASES " == *" $1 "* ]]; }

for tool in nbdkit qemu-nbd fio nbdcopy python3; do
  command -v "$tool" >/dev/null || { echo "bench: $tool missing: run scripts/install-deps.sh" >&2; exit 1; }
done

OUT=$(mktemp -d "${BENCH_DIR:-/tmp}/nbdclone-bench.XXXXXX") # BENCH_DIR: where the images go
export NBDCLONE_CONTROL=$OUT/control.sock
RESULTS=$OUT/results.tsv
: >"$RESULTS"
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  [ -f "$OUT/kit.pid" ] && kill "$(cat "$OUT/kit.pid")" 2>/dev/null
  [ -f "$OUT/qemu.pid" ] && kill "$(cat "$OUT/qemu.pid")" 2>/dev/null
  rm -f "$OUT"/*.img
}
trap cleanup EXIT

now() { date +%s.%N; }
NBDPY=python3
python3 -c 'import nbd' 2>/dev/null || NBDPY=/usr/bin/python3 # pyenv pythons lack libnbd's module
# A daemon of its own for a case, so its peak RSS (VmHWM) is that case's:
# serve_start TAG sets CTL (control socket), NBDS (NBD socket), DPID.
serve_start() {
  CTL=$OUT/$1.ctl NBDS=$OUT/$1.nbd
  env ${DAEMON_ENV:-} "$BIN" serve --listen "unix:$NBDS" --control "$CTL" --state "$OUT/$1.state" \
    --log-level warn 2>"$OUT/$1.log" &
  DPID=$!
  PIDS+=("$DPID")
  for _ in $(seq 100); do NBDCLONE_CONTROL=$CTL "$BIN" ls >/dev/null 2>&1 && break; sleep 0.1; done
}
serve_stop() { kill "$DPID"; wait "$DPID" 2>/dev/null || true; }
vm_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; } # pid field → KiB
# /usr/bin/time -v's peak RSS in MiB from its report file.
time_peak_mib() { awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$1"; }
fio_json() { # file rw percentile? → IOPS, MiB/s (sequential) or a clat percentile in µs
  python3 - "$@" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"]
rw = sys.argv[2]
side = "trim" if "trim" in rw else "write" if "write" in rw else "read"
if len(sys.argv) > 3:
    print(j[0][side]["clat_ns"]["percentile"][sys.argv[3]] / 1000)
elif rw in ("read", "write"):
    print(sum(x[side]["bw_bytes"] for x in j) / 2**20)
else:
    print(sum(x[side]["iops"] for x in j))
PY
}
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; } # case, competitor, value

echo "bench: ${SIZE_MB} MiB, ${REPS} repetitions, work dir $OUT" >&2
head -c "${SIZE_MB}M" /dev/urandom >"$OUT/src.img"
cat "$OUT/src.img" >/dev/null # warm the page cache, as the anchors do

"$BIN" serve --listen "unix:$OUT/nbd.sock" --state "$OUT/state" --log-level warn 2>"$OUT/serve.log" &
PIDS+=($!)
for _ in $(seq 100); do "$BIN" ls >/dev/null 2>&1 && break; sleep 0.1; done

hydrate_once() {
  rm -rf "$OUT/md" "$OUT/dst.img"
  truncate -s "${SIZE_MB}M" "$OUT/dst.img"
  sync
  local t0 t1
  t0=$(now)
  "$BIN" create h --table "0 $SECTORS clone $OUT/md $OUT/dst.img $OUT/src.img $REGION 0 4 $TUNING"
  "$BIN" wait h
  t1=$(now)
  "$BIN" remove h
  echo "$t1 - $t0" | bc
}

if want H1; then
echo "bench: H1 hydration" >&2
for _ in $(seq "$REPS"); do
  record "H1 hydrate local file (s)" nbdclone "$(hydrate_once)"
  rm -f "$OUT/dd.img"; sync
  t0=$(now); dd if="$OUT/src.img" of="$OUT/dd.img" bs=4M conv=fsync status=none; t1=$(now)
  record "H1 hydrate local file (s)" "dd bs=4M conv=fsync" "$(echo "$t1 - $t0" | bc)"
  rm -f "$OUT/dd.img"; sync
  t0=$(now); cp "$OUT/src.img" "$OUT/dd.img"; sync "$OUT/dd.img"; t1=$(now)
  record "H1 hydrate local file (s)" "cp + sync" "$(echo "$t1 - $t0" | bc)"
  rm -f "$OUT/dd.img"
done
cmp "$OUT/src.img" "$OUT/dst.img" || { echo "bench: hydrated destination differs from the source" >&2; exit 1; }
fi

if want H2; then
echo "bench: H2 hydration from an NBD source" >&2
H2_READS=${H2_READS:-300}
nbdkit -f -U "$OUT/src.sock" file "$OUT/src.img" &
PIDS+=($!)
nbdkit -f -U "$OUT/srcd.sock" --filter=delay file "$OUT/src.img" rdelay=2ms &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$OUT/src.sock" ] && [ -S "$OUT/srcd.sock" ] && break; sleep 0.1; done
h2_clone() { # source URI → seconds from create to hydrated and committed
  rm -rf "$OUT/md2" "$OUT/dst2.img"
  truncate -s "${SIZE_MB}M" "$OUT/dst2.img"
  sync
  local t0 t1
  t0=$(now)
  "$BIN" create h2 --table "0 $SECTORS clone $OUT/md2 $OUT/dst2.img $1 $REGION"
  "$BIN" wait h2
  t1=$(now)
  "$BIN" remove h2
  cmp "$OUT/src.img" "$OUT/dst2.img" || { echo "bench: H2 destination differs from the source" >&2; exit 1; }
  echo "$t1 - $t0" | bc
}
h2_nbdcopy() { # source URI → seconds
  rm -f "$OUT/cp2.img"; sync
  local t0 t1
  t0=$(now); nbdcopy --flush "$1" "$OUT/cp2.img"; t1=$(now)
  rm -f "$OUT/cp2.img"
  echo "$t1 - $t0" | bc
}
# nbdkit's cow overlay is a deleted file in TMPDIR that nothing ever syncs,
# while nbdclone and nbdcopy --flush end with their copy on disk. So cow runs
# twice: as it is, and with a sync before nbdkit exits (the overlay's dirty
# pages written, which is what the others' final fsync costs them).
h2_cow() { # sync|nosync [rdelay] → seconds (the overlay lives in TMPDIR)
  local t0 t1 delay=() run='nbdcopy "$uri" null:'
  [ "$1" = sync ] && run="$run && sync"
  [ -n "${2:-}" ] && delay=(--filter=delay)
  sync
  t0=$(now)
  nbdkit -U - --filter=cow "${delay[@]}" file "$OUT/src.img" cow-on-read=true ${2:+rdelay=$2} --run "$run"
  t1=$(now)
  echo "$t1 - $t0" | bc
}
ttfb() { # URI → "median p99" of cold 4 KiB reads in ms
  "$NBDPY" - "$1" "$H2_READS" "$SIZE_MB" <<'PY'
import nbd, random, statistics, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n, size = int(sys.argv[2]), int(sys.argv[3]) << 20
offs = random.Random(1).sample(range(size // 4096), n)
lat = []
for o in offs:
    t0 = time.perf_counter()
    h.pread(4096, o * 4096)
    lat.append((time.perf_counter() - t0) * 1000)
lat.sort()
print(f"{statistics.median(lat):.4f} {lat[int(len(lat) * 0.99) - 1]:.4f}")
PY
}
h2_run() { # competitor-index rdelay? → records one run
  local label="H2 hydrate from nbdkit (s)" sock=src
  [ -n "${2:-}" ] && label="H2 hydrate from nbdkit rdelay=$2 (s)" sock=srcd
  case $1 in
  0) record "$label" nbdclone "$(h2_clone "nbd+unix:///?socket=$OUT/$sock.sock")" ;;
  1) record "$label" "nbdcopy --flush" "$(h2_nbdcopy "nbd+unix:///?socket=$OUT/$sock.sock")" ;;
  2) record "$label" "nbdkit cow-on-read + nbdcopy" "$(h2_cow nosync ${2:-})" ;;
  3) record "$label" "nbdkit cow-on-read + nbdcopy + sync" "$(h2_cow sync ${2:-})" ;;
  esac
}
# Each repetition starts with the next competitor, as in S1. The runs take
# about 2 s each and vary by ±0.4 s on these disks, so H2 repeats twice as
# often as the other cases (H2_REPS).
for rep in $(seq "${H2_REPS:-$((REPS * 2))}"); do
  for i in 0 1 2 3; do h2_run $(((rep - 1 + i) % 4)); done
  for i in 0 1 2 3; do h2_run $(((rep - 1 + i) % 4)) 2ms; done
done
# Time to first byte: reads of cold regions (no_hydration keeps them cold).
for src in "src" "srcd"; do
  rm -rf "$OUT/md2"; truncate -s "${SIZE_MB}M" "$OUT/dst2.img"
  "$BIN" create h2 --table "0 $SECTORS clone $OUT/md2 $OUT/dst2.img nbd+unix:///?socket=$OUT/$src.sock $REGION 1 no_hydration"
  label="H2 TTFB cold 4K read, nbdkit"
  [ "$src" = srcd ] && label="H2 TTFB cold 4K read, nbdkit rdelay=2ms"
  for _ in $(seq "$REPS"); do
    read -r med p99 <<<"$(ttfb "nbd+unix:///h2?socket=$OUT/nbd.sock")"
    record "$label median (ms)" nbdclone "$med"; record "$label p99 (ms)" nbdclone "$p99"
    read -r med p99 <<<"$(ttfb "nbd+unix:///?socket=$OUT/$src.sock")"
    record "$label median (ms)" "source itself" "$med"; record "$label p99 (ms)" "source itself" "$p99"
  done
  "$BIN" remove h2
done
# Reads of hydrated regions while hydration from a slow source runs.
nbdkit -f -U "$OUT/srcd5.sock" --filter=delay file "$OUT/src.img" rdelay=5ms &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$OUT/srcd5.sock" ] && break; sleep 0.1; done
rm -rf "$OUT/md2"; truncate -s "${SIZE_MB}M" "$OUT/dst2.img"
"$BIN" create h2 --table "0 $SECTORS clone $OUT/md2 $OUT/dst2.img nbd+unix:///?socket=$OUT/srcd5.sock $REGION 1 no_hydration"
"$NBDPY" -c "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.cache($((SIZE_MB / 4)) << 20, 0)" \
  "nbd+unix:///h2?socket=$OUT/nbd.sock" # the first quarter hydrated
h2_fio() { # → IOPS of 4 KiB random reads in the hydrated quarter
  fio --name=b --ioengine=nbd --uri="nbd+unix:///h2?socket=$OUT/nbd.sock" --rw=randread --bs=4k --iodepth=32 \
    --size="$((SIZE_MB / 4))M" --runtime="$FIO_SECONDS" --time_based --output-format=json --output="$OUT/fio2.json" >/dev/null 2>&1
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' "$OUT/fio2.json"
}
for _ in $(seq "$REPS"); do
  "$BIN" message h2 0 disable_hydration
  record "H2 4K randread QD32 of hydrated regions (IOPS)" "hydration disabled" "$(h2_fio)"
  "$BIN" message h2 0 enable_hydration
  record "H2 4K randread QD32 of hydrated regions (IOPS)" nbdclone "$(h2_fio)"
done
"$BIN" remove h2
rm -f "$OUT/dst2.img"
fi

if want S1; then
echo "bench: S1 serving a hydrated clone" >&2
rm -rf "$OUT/md"; rm -f "$OUT/dst.img"; truncate -s "${SIZE_MB}M" "$OUT/dst.img"
"$BIN" create h --table "0 $SECTORS clone $OUT/md $OUT/dst.img $OUT/src.img $REGION 0 4 $TUNING"
"$BIN" wait h
# Hydration leaves what it copied out of the page cache (as nbdcopy and
# kcopyd do); every competitor starts from the same cached image, cached in
# 4 KiB pages. A file read sequentially (cat) or written 1 MiB at a time is
# cached in large folios (up to 2 MiB on this kernel's ext4), and a 4 KiB
# write then dirties, and writeback writes, the whole folio: 4K randwrite
# fell from 116K to 13K IOPS under nbdkit file alone, the same for every
# server, which measures the kernel and not the servers. So the image is
# dropped and read back 4 KiB at a time without readahead before the runs
# and again before each randwrite run. (nbdclone's own reads never cache
# large folios: its destination has the kernel's readahead off and it reads
# ahead itself. The last two rows of each repetition show what that costs
# and gains against servers whose reads do.)
small_pages() { # file
  sync
  dd if="$1" iflag=nocache count=0 status=none # drops the file's clean pages
  fio --name=warm --filename="$1" --rw=read --bs=4k --ioengine=psync --fadvise_hint=random \
    --size="${SIZE_MB}M" --output=/dev/null >/dev/null 2>&1
}
small_pages "$OUT/dst.img"
nbdkit -U "$OUT/kit.sock" -P "$OUT/kit.pid" file "$OUT/dst.img"
qemu-nbd -f raw -k "$OUT/qemu.sock" -t "$OUT/dst.img" &
PIDS+=($!)
sleep 1
declare -A URIS=(
  [nbdclone]="nbd+unix:///h?socket=$OUT/nbd.sock"
  ["nbdkit file"]="nbd+unix:///?socket=$OUT/kit.sock"
  ["qemu-nbd"]="nbd+unix:///?socket=$OUT/qemu.sock"
)
fio_once() { # uri rw bs depth → IOPS (or MiB/s for sequential)
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size="${SIZE_MB}M" \
    --runtime="$FIO_SECONDS" --time_based --output-format=json --output="$OUT/fio.json" >/dev/null 2>&1
  python3 - "$OUT/fio.json" "$2" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if "write" in sys.argv[2] else j["read"]
print(side["bw_bytes"] / 2**20 if sys.argv[2] in ("read", "write") else side["iops"])
PY
}
fio_cold() { # uri → MiB/s of one pass of 128 KiB sequential reads at QD4 over the dropped image
  sync; dd if="$OUT/dst.img" iflag=nocache count=0 status=none
  fio --name=b --ioengine=nbd --uri="$1" --rw=read --bs=128k --iodepth=4 --size="${SIZE_MB}M" \
    --output-format=json --output="$OUT/fio.json" >/dev/null 2>&1
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["bw_bytes"] / 2**20)' "$OUT/fio.json"
}
# Each repetition starts with the next server (so none always runs right
# after another's writes), and every run starts with no dirty page left by
# the one before it (sync): a write's writeback otherwise lands on whoever
# runs next.
S1_ALL=(nbdclone "nbdkit file" "qemu-nbd")
for rep in $(seq "$REPS"); do
  for i in 0 1 2; do
    who=${S1_ALL[$(((rep - 1 + i) % 3))]}
    sync; record "S1 4K randread QD32 (IOPS)" "$who" "$(fio_once "${URIS[$who]}" randread 4k 32)"
    small_pages "$OUT/dst.img"
    record "S1 4K randwrite QD32 (IOPS)" "$who" "$(fio_once "${URIS[$who]}" randwrite 4k 32)"
    sync; record "S1 1M seq read QD8 (MiB/s)" "$who" "$(fio_once "${URIS[$who]}" read 1M 8)"
    sync; record "S1 1M seq write QD8 (MiB/s)" "$who" "$(fio_once "${URIS[$who]}" write 1M 8)"
    sync; record "S1 4M seq read QD8 (MiB/s)" "$who" "$(fio_once "${URIS[$who]}" read 4M 8)"
    # A guest's first pass over its disk (a boot, a backup, a scan), then
    # small random writes to what it read: the page cache is then what
    # the server's reads left in it.
    record "S1 cold 128K seq read QD4 (MiB/s)" "$who" "$(fio_cold "${URIS[$who]}")"
    record "S1 4K randwrite QD32 after a seq read (IOPS)" "$who" "$(fio_once "${URIS[$who]}" randwrite 4k 32)"
  done
done
"$BIN" remove h --force
fi

if want M1; then
  # A 1 TiB sparse device with 4 KiB regions; 10% of its regions hydrated
  # at random through NBD requests, then the daemon's peak RSS, the
  # metadata directory's size and the FLUSH round trip after bursts of
  # writes. The regions are hydrated by 4 KiB TRIMs (fio randtrim with its
  # random map: each region once): a whole-region discard marks the region
  # hydrated without copying, exactly as a whole-region write would, and
  # 107 GiB of data would not fit on these disks. no_discard_passdown
  # keeps the destination untouched (the case measures metadata).
  M1_GB=${M1_GB:-1024}
  M1_PCT=${M1_PCT:-10}
  M1_BURSTS=${M1_BURSTS:-40}
  M1_BURST=${M1_BURST:-1000}
  echo "bench: M1 ${M1_GB} GiB, ${M1_PCT}% hydrated at random (minutes)" >&2
  serve_start m1
  rm -rf "$OUT/m1md" "$OUT/m1src.img" "$OUT/m1dst.img"
  truncate -s "${M1_GB}G" "$OUT/m1src.img" "$OUT/m1dst.img"
  NBDCLONE_CONTROL=$CTL "$BIN" create m1 --table \
    "0 $((M1_GB << 21)) clone $OUT/m1md $OUT/m1dst.img $OUT/m1src.img 8 2 no_hydration no_discard_passdown"
  m1_uri="nbd+unix:///m1?socket=$NBDS"
  half=$((M1_GB / 2))
  t0=$(now)
  fio --name=m1 --ioengine=nbd --uri="$m1_uri" --rw=randtrim --bs=4k --iodepth=32 --numjobs=2 \
    --size="${half}G" --offset_increment="${half}G" --io_size=$((M1_GB * 1024 * M1_PCT / 100 / 2))M \
    --output-format=json --output="$OUT/m1fio.json" >/dev/null 2>&1
  t1=$(now)
  record "M1 hydrate ${M1_PCT}% by 4K TRIM (s)" nbdclone "$(echo "$t1 - $t0" | bc)"
  record "M1 4K TRIM QD32×2 (IOPS)" nbdclone "$(fio_json "$OUT/m1fio.json" randtrim)"
  # Commit latency: bursts of 4 KiB writes to random regions, then FLUSH.
  read -r p50 p99 <<<"$("$NBDPY" - "$m1_uri" "$M1_BURSTS" "$M1_BURST" "$M1_GB" <<'PY'
import nbd, random, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
bursts, burst, regions = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) << 18
rng = random.Random(2)
buf = nbd.Buffer.from_bytearray(bytearray(b"m" * 4096))
lat = []
for _ in range(bursts):
    for r in rng.sample(range(regions), burst):
        while h.aio_in_flight() >= 64:
            h.poll(-1)
        h.aio_pwrite(buf, r * 4096)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    t0 = time.perf_counter()
    h.flush()
    lat.append((time.perf_counter() - t0) * 1000)
lat.sort()
print(f"{lat[len(lat) // 2]:.3f} {lat[max(0, int(len(lat) * 0.99) - 1)]:.3f}")
PY
)"
  record "M1 FLUSH after ${M1_BURST} random 4K writes, p50 (ms)" nbdclone "$p50"
  record "M1 FLUSH after ${M1_BURST} random 4K writes, p99 (ms)" nbdclone "$p99"
  sleep 2 # the periodic commit of the last writes
  NBDCLONE_CONTROL=$CTL "$BIN" status m1 -o json >"$OUT/m1status.json"
  hydrated=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["target"]["clone"]["hydrated_regions"])' "$OUT/m1status.json" 2>/dev/null ||
    python3 -c 'import json, sys, re; print(re.search(r"\"hydrated_regions\": *(\d+)", open(sys.argv[1]).read()).group(1))' "$OUT/m1status.json")
  echo "bench: M1 hydrated regions $hydrated of $((M1_GB << 18))" >&2
  rss=$(echo "scale=1; $(vm_kib "$DPID" VmHWM) / 1024" | bc)
  md=$(echo "scale=1; $(du -sk "$OUT/m1md" | cut -f1) / 1024" | bc)
  record "M1 daemon peak RSS VmHWM (MiB)" nbdclone "$rss"
  record "M1 daemon peak RSS VmHWM (MiB)" "goal" 128
  record "M1 metadata directory du (MiB)" nbdclone "$md"
  record "M1 metadata directory du (MiB)" "goal" 40
  record "M1 daemon RSS at the end VmRSS (MiB)" nbdclone "$(echo "scale=1; $(vm_kib "$DPID" VmRSS) / 1024" | bc)"
  NBDCLONE_CONTROL=$CTL "$BIN" remove m1 --force
  serve_stop
  rm -rf "$OUT/m1md" "$OUT/m1src.img" "$OUT/m1dst.img"
fi

if want S2; then
  # Serving an unhydrated clone: no_hydration, so every read goes to the
  # source (the local file), vs nbdkit's cow filter over the same file
  # (nothing written, so every read passes through to the file).
  echo "bench: S2 serving an unhydrated clone" >&2
  serve_start s2
  rm -rf "$OUT/s2md"; truncate -s "${SIZE_MB}M" "$OUT/s2dst.img"
  NBDCLONE_CONTROL=$CTL "$BIN" create s2 --table "0 $SECTORS clone $OUT/s2md $OUT/s2dst.img $OUT/src.img $REGION 1 no_hydration"
  /usr/bin/time -v -o "$OUT/s2kit.time" nbdkit -f -U "$OUT/s2kit.sock" -P "$OUT/s2kit.pid" --filter=cow file "$OUT/src.img" &
  s2time=$!
  for _ in $(seq 100); do [ -S "$OUT/s2kit.sock" ] && [ -s "$OUT/s2kit.pid" ] && break; sleep 0.1; done
  declare -A S2URIS=([nbdclone]="nbd+unix:///s2?socket=$NBDS" ["nbdkit cow"]="nbd+unix:///?socket=$OUT/s2kit.sock")
  s2_fio() { # uri rw bs depth → IOPS or MiB/s
    fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size="${SIZE_MB}M" \
      --runtime="$FIO_SECONDS" --time_based --output-format=json --output="$OUT/s2fio.json" >/dev/null 2>&1
    fio_json "$OUT/s2fio.json" "$2"
  }
  for rep in $(seq "$REPS"); do
    order=(nbdclone "nbdkit cow")
    [ $((rep % 2)) = 0 ] && order=("nbdkit cow" nbdclone)
    for who in "${order[@]}"; do
      record "S2 unhydrated 4K randread QD32 (IOPS)" "$who" "$(s2_fio "${S2URIS[$who]}" randread 4k 32)"
      record "S2 unhydrated 1M seq read QD8 (MiB/s)" "$who" "$(s2_fio "${S2URIS[$who]}" read 1M 8)"
    done
  done
  hydrated=$(NBDCLONE_CONTROL=$CTL "$BIN" status s2 | awk '{ print $7 }')
  echo "bench: S2 clone hydrated regions after the runs: $hydrated (reads never hydrate under no_hydration)" >&2
  record "S2 peak RSS (MiB)" nbdclone "$(echo "scale=1; $(vm_kib "$DPID" VmHWM) / 1024" | bc)"
  kill "$(cat "$OUT/s2kit.pid")"; wait "$s2time" || true
  record "S2 peak RSS (MiB)" "nbdkit cow" "$(time_peak_mib "$OUT/s2kit.time")"
  NBDCLONE_CONTROL=$CTL "$BIN" remove s2
  serve_stop
  rm -f "$OUT/s2dst.img"
fi

if want S3; then
  # Foreground reads under background hydration: fio 4 KiB random reads
  # (QD1, so clat is the round trip) of regions hydrated beforehand (by
  # NBD_CMD_CACHE), while hydration of the rest runs at full speed from a
  # fast source (nbdkit pattern: generated data, no disk, so the copier,
  # not the source, is the limit), vs the same reads with hydration off.
  S3_MB=${S3_MB:-8192}
  S3_HOT_MB=${S3_HOT_MB:-256}
  echo "bench: S3 latency under hydration (${S3_MB} MiB source, ${S3_HOT_MB} MiB hot)" >&2
  nbdkit -f -U "$OUT/pat.sock" pattern size="${S3_MB}M" &
  PIDS+=($!)
  serve_start s3
  for _ in $(seq 100); do [ -S "$OUT/pat.sock" ] && break; sleep 0.1; done
  s3_fio() { # → "p50 p99" in µs
    fio --name=b --ioengine=nbd --uri="nbd+unix:///s3?socket=$NBDS" --rw=randread --bs=4k --iodepth=1 \
      --size="${S3_HOT_MB}M" --runtime="$FIO_SECONDS" --time_based --output-format=json --output="$OUT/s3fio.json" >/dev/null 2>&1
    echo "$(fio_json "$OUT/s3fio.json" randread 50.000000) $(fio_json "$OUT/s3fio.json" randread 99.000000)"
  }
  s3_hydrated() { NBDCLONE_CONTROL=$CTL "$BIN" status s3 | awk '{ split($7, a, "/"); print a[1] }'; }
  for _ in $(seq "$REPS"); do
    rm -rf "$OUT/s3md"; truncate -s "${S3_MB}M" "$OUT/s3dst.img"
    NBDCLONE_CONTROL=$CTL "$BIN" create s3 --table \
      "0 $((S3_MB * 2048)) clone $OUT/s3md $OUT/s3dst.img nbd+unix:///?socket=$OUT/pat.sock $REGION 1 no_hydration 4 $TUNING"
    "$NBDPY" -c "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.cache($S3_HOT_MB << 20, 0)" "nbd+unix:///s3?socket=$NBDS"
    read -r p50 p99 <<<"$(s3_fio)"
    record "S3 4K randread QD1 of hydrated regions, p50 (µs)" "idle (hydration off)" "$p50"
    record "S3 4K randread QD1 of hydrated regions, p99 (µs)" "idle (hydration off)" "$p99"
    before=$(s3_hydrated)
    NBDCLONE_CONTROL=$CTL "$BIN" message s3 0 enable_hydration
    read -r p50 p99 <<<"$(s3_fio)"
    after=$(s3_hydrated)
    record "S3 4K randread QD1 of hydrated regions, p50 (µs)" nbdclone "$p50"
    record "S3 4K randread QD1 of hydrated regions, p99 (µs)" nbdclone "$p99"
    record "S3 hydrated during the busy run (MiB/s)" nbdclone "$(echo "scale=1; ($after - $before) * $REGION / 2048 / $FIO_SECONDS" | bc)"
    NBDCLONE_CONTROL=$CTL "$BIN" remove s3 --force
    rm -f "$OUT/s3dst.img"
  done
  serve_stop
fi

if want F1; then
  # The fstrim flow: a 2 GiB ext4 image, half full of files, cloned from
  # create to a mounted (nbdfuse + loop), trimmed, fully hydrated clone,
  # vs dd of the whole source. Only the used half should be copied: the
  # discards of the free half skip their regions.
  F1_MB=${F1_MB:-2048}
  echo "bench: F1 fstrim flow (${F1_MB} MiB ext4, half full)" >&2
  for tool in nbdfuse losetup mkfs.ext4 fstrim mount umount; do
    command -v "$tool" >/dev/null || { echo "bench: F1 needs $tool" >&2; exit 1; }
  done
  mkdir -p "$OUT/f1data" "$OUT/fuse" "$OUT/fs"
  for i in $(seq $((F1_MB / 2 / 64))); do head -c 64M /dev/urandom >"$OUT/f1data/file$i"; done
  mkfs.ext4 -q -F -d "$OUT/f1data" "$OUT/f1src.img" "${F1_MB}M"
  rm -rf "$OUT/f1data"
  cat "$OUT/f1src.img" >/dev/null
  serve_start f1
  f1_clone() { # → seconds from create to mounted, trimmed and hydrated
    rm -rf "$OUT/f1md"; rm -f "$OUT/f1dst.img"; truncate -s "${F1_MB}M" "$OUT/f1dst.img"; sync
    local t0 t1 fusepid loop
    t0=$(now)
    NBDCLONE_CONTROL=$CTL "$BIN" create f1 --table \
      "0 $((F1_MB * 2048)) clone $OUT/f1md $OUT/f1dst.img $OUT/f1src.img $REGION 1 no_hydration 4 $TUNING"
    nbdfuse "$OUT/fuse/disk" "nbd+unix:///f1?socket=$NBDS" &
    fusepid=$!
    for _ in $(seq 200); do [ -e "$OUT/fuse/disk" ] && break; sleep 0.05; done
    loop=$(losetup -f --show "$OUT/fuse/disk")
    mount "$loop" "$OUT/fs"
    fstrim "$OUT/fs"
    NBDCLONE_CONTROL=$CTL "$BIN" message f1 0 enable_hydration
    NBDCLONE_CONTROL=$CTL "$BIN" wait f1
    t1=$(now)
    NBDCLONE_CONTROL=$CTL "$BIN" status f1 -o json >"$OUT/f1status.json"
    umount "$OUT/fs"; losetup -d "$loop"; umount "$OUT/fuse"; wait "$fusepid" || true
    NBDCLONE_CONTROL=$CTL "$BIN" remove f1
    echo "$t1 - $t0" | bc
  }
  f1_stat() { python3 -c 'import json, sys
def find(o, k):
    if isinstance(o, dict):
        if k in o: return o[k]
        for v in o.values():
            r = find(v, k)
            if r is not None: return r
print(find(json.load(open(sys.argv[1])), sys.argv[2]) / 2**20)' "$OUT/f1status.json" "$1"; }
  for _ in $(seq "$REPS"); do
    record "F1 create → mounted, trimmed, hydrated (s)" nbdclone "$(f1_clone)"
    record "F1 skipped by discard (MiB)" nbdclone "$(f1_stat hydrated_discard_bytes)"
    record "F1 copied from the source (MiB)" nbdclone "$(f1_stat source_copy_bytes)"
    rm -f "$OUT/f1dd.img"; sync
    t0=$(now); dd if="$OUT/f1src.img" of="$OUT/f1dd.img" bs=4M conv=fsync status=none; t1=$(now)
    record "F1 create → mounted, trimmed, hydrated (s)" "dd bs=4M conv=fsync (whole source)" "$(echo "$t1 - $t0" | bc)"
    record "F1 copied from the source (MiB)" "dd bs=4M conv=fsync (whole source)" "$F1_MB"
    rm -f "$OUT/f1dd.img"
  done
  serve_stop
  rm -f "$OUT/f1src.img" "$OUT/f1dst.img"
fi

python3 - "$RESULTS" "$OUT/bench.json" <<'PY'
import json, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
cases = {}
for case, who, v in rows:
    cases.setdefault(case, {}).setdefault(who, []).append(float(v))
out = {}
print("| case | competitor | median | runs | ratio nbdclone/competitor |")
print("|---|---|---|---|---|")
for case, whos in cases.items():
    med = {w: statistics.median(v) for w, v in whos.items()}
    ours = med["nbdclone"]
    what = case[case.rfind("(") + 1:-1] if case.endswith(")") else ""
    higher_better = what in ("IOPS", "MiB/s")
    unit = "" if higher_better or not what else f" {what}"
    for w, m in med.items():
        ratio = (ours / m) if w != "nbdclone" else 1.0
        note = "" if w == "nbdclone" else (" (≥1 is better)" if higher_better else " (≤1 is better)")
        print(f"| {case} | {w} | {m:.3f}{unit} | {len(whos[w])} | {ratio:.2f}{note} |")
    out[case] = {"median": med, "runs": whos}
json.dump(out, open(sys.argv[2], "w"), indent=1)
PY
echo "bench: JSON in $OUT/bench.json" >&2
