#!/usr/bin/env bash
# nbdclone benchmarks: every case runs its competitors in the same run,
# alternating, REPS times, and reports medians and ratios as a markdown
# table (and JSON in $OUT/bench.json). Timings on shared machines are noisy:
# read the ratios, not the absolute numbers.
#
#   scripts/bench.sh [path/to/nbdclone]
#   SIZE_MB=1024 REPS=5 FIO_SECONDS=8 scripts/bench.sh
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
#       read through by nbdcopy. Then the time to the first byte of a cold
#       4 KiB read through a clone vs a read from the source itself (median
#       and p99 of H2_READS reads at distinct offsets, in ms). Last, fio 4 KiB
#       random reads (QD32) of hydrated regions while hydration from a source
#       behind rdelay=5ms runs, vs the same with hydration disabled.
#   S1  serving a hydrated clone: fio ioengine=nbd 4 KiB randread and
#       randwrite at iodepth 32, and 1 MiB sequential read and write, vs
#       nbdkit file and qemu-nbd -f raw serving the destination file directly.
set -euo pipefail

BIN=$(realpath "${1:-bin/nbdclone}")
SIZE_MB=${SIZE_MB:-1024}
REPS=${REPS:-3}
FIO_SECONDS=${FIO_SECONDS:-5}
SECTORS=$((SIZE_MB * 2048))
TUNING=${TUNING:-"hydration_threshold 4096 hydration_batch_size 1024"}
REGION=${REGION:-8}

for tool in nbdkit qemu-nbd fio nbdcopy python3; do
  command -v "$tool" >/dev/null || { echo "bench: $tool missing: run scripts/install-deps.sh" >&2; exit 1; }
done

OUT=$(mktemp -d /tmp/nbdclone-bench.XXXXXX)
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

echo "bench: H1 hydration" >&2
for _ in $(seq "$REPS"); do
  record H1 nbdclone "$(hydrate_once)"
  rm -f "$OUT/dd.img"; sync
  t0=$(now); dd if="$OUT/src.img" of="$OUT/dd.img" bs=4M conv=fsync status=none; t1=$(now)
  record H1 "dd bs=4M conv=fsync" "$(echo "$t1 - $t0" | bc)"
  rm -f "$OUT/dd.img"; sync
  t0=$(now); cp "$OUT/src.img" "$OUT/dd.img"; sync "$OUT/dd.img"; t1=$(now)
  record H1 "cp + sync" "$(echo "$t1 - $t0" | bc)"
  rm -f "$OUT/dd.img"
done
cmp "$OUT/src.img" "$OUT/dst.img" || { echo "bench: hydrated destination differs from the source" >&2; exit 1; }

echo "bench: H2 hydration from an NBD source" >&2
H2_READS=${H2_READS:-300}
NBDPY=python3
python3 -c 'import nbd' 2>/dev/null || NBDPY=/usr/bin/python3 # pyenv pythons lack libnbd's module
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
h2_cow() { # [rdelay] → seconds (the overlay lives in TMPDIR)
  local t0 t1 delay=()
  [ -n "${1:-}" ] && delay=(--filter=delay)
  t0=$(now)
  nbdkit -U - --filter=cow "${delay[@]}" file "$OUT/src.img" cow-on-read=true ${1:+rdelay=$1} --run 'nbdcopy "$uri" null:'
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
for _ in $(seq "$REPS"); do
  record "H2 hydrate from nbdkit (s)" nbdclone "$(h2_clone "nbd+unix:///?socket=$OUT/src.sock")"
  record "H2 hydrate from nbdkit (s)" "nbdcopy --flush" "$(h2_nbdcopy "nbd+unix:///?socket=$OUT/src.sock")"
  record "H2 hydrate from nbdkit (s)" "nbdkit cow-on-read + nbdcopy" "$(h2_cow)"
  record "H2 hydrate from nbdkit rdelay=2ms (s)" nbdclone "$(h2_clone "nbd+unix:///?socket=$OUT/srcd.sock")"
  record "H2 hydrate from nbdkit rdelay=2ms (s)" "nbdcopy --flush" "$(h2_nbdcopy "nbd+unix:///?socket=$OUT/srcd.sock")"
  record "H2 hydrate from nbdkit rdelay=2ms (s)" "nbdkit cow-on-read + nbdcopy" "$(h2_cow 2ms)"
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

echo "bench: S1 serving a hydrated clone" >&2
rm -rf "$OUT/md"
"$BIN" create h --table "0 $SECTORS clone $OUT/md $OUT/dst.img $OUT/src.img $REGION 0 4 $TUNING"
"$BIN" wait h
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
for _ in $(seq "$REPS"); do
  for who in nbdclone "nbdkit file" "qemu-nbd"; do
    record "S1 4K randread QD32 (IOPS)" "$who" "$(fio_once "${URIS[$who]}" randread 4k 32)"
    record "S1 4K randwrite QD32 (IOPS)" "$who" "$(fio_once "${URIS[$who]}" randwrite 4k 32)"
    record "S1 1M seq read QD8 (MiB/s)" "$who" "$(fio_once "${URIS[$who]}" read 1M 8)"
    record "S1 1M seq write QD8 (MiB/s)" "$who" "$(fio_once "${URIS[$who]}" write 1M 8)"
  done
done
"$BIN" remove h --force

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
    higher_better = "IOPS" in case or "MiB/s" in case
    for w, m in med.items():
        ratio = (ours / m) if w != "nbdclone" else 1.0
        note = "" if w == "nbdclone" else (" (≥1 is better)" if higher_better else " (≤1 is better)")
        unit = "" if higher_better else (" ms" if "(ms)" in case else " s")
        print(f"| {case} | {w} | {m:.3f}{unit} | {len(whos[w])} | {ratio:.2f}{note} |")
    out[case] = {"median": med, "runs": whos}
json.dump(out, open(sys.argv[2], "w"), indent=1)
PY
echo "bench: JSON in $OUT/bench.json" >&2
