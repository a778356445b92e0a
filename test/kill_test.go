package e2e

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"flag"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

var killRounds = flag.Int("kill.rounds", 20, "kill -9 rounds in TestKill9DuringWorkload")

// pythonNBD returns a python3 that can import libnbd's Python module.
func pythonNBD(t testing.TB) string {
	t.Helper()
	for _, py := range []string{"python3", "/usr/bin/python3"} {
		if err := exec.Command(py, "-c", "import nbd").Run(); err == nil {
			return py
		}
	}
	testutil.Unavailable(t, "no python3 with the nbd module (python3-libnbd)")
	return ""
}

const slotSize = 4096

// killWriter writes whole 4 KiB slots, each filled with its sequence
// number, and makes each durable (FLUSH, or FUA) before logging it as
// acknowledged; "issue" is logged before the write is sent.
const killWriter = `
import nbd, random, struct, sys
uri, seed, base, nslots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
r = random.Random(seed)
seq = base
while True:
    slot = r.randrange(nslots)
    seq += 1
    print("issue", seq, slot, flush=True)
    if r.random() < 0.3:
        h.pwrite(struct.pack("<Q", seq) * 512, slot * 4096, nbd.CMD_FLAG_FUA)
    else:
        h.pwrite(struct.pack("<Q", seq) * 512, slot * 4096)
        h.flush()
    print("ack", seq, slot, flush=True)
`

// killReader prints, for every slot, 0 when it holds the source's bytes,
// its sequence number when it holds one whole write, or "torn".
const killReader = `
import nbd, struct, sys
uri, src, nslots = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
with open(src, "rb") as f:
    source = f.read(nslots * 4096)
for slot in range(nslots):
    d = h.pread(4096, slot * 4096)
    if d == source[slot * 4096:(slot + 1) * 4096]:
        print(slot, 0)
    elif d == d[:8] * 512:
        print(slot, struct.unpack("<Q", d[:8])[0])
    else:
        print(slot, "torn")
`

// TestKill9DuringWorkload kills the daemon with SIGKILL at random moments
// while a libnbd writer (every write made durable by FLUSH or FUA before it
// is logged) and fio (random writes with periodic flushes on another part
// of the device) run and background hydration copies, then restarts it and
// checks: every acknowledged write is there, whole (no torn slot), a write
// in flight at the kill is either there or not; the device keeps its
// hydration state and finishes hydrating to the expected image.
func TestKill9DuringWorkload(t *testing.T) {
	py := pythonNBD(t)
	fio := testutil.NeedTool(t, "fio")
	d := harness.Serve(t)
	const size = 64 << 20
	const nslots = 8192 // the writer's 32 MiB; fio gets the upper half
	src := makeSource(t, d.Dir, 9, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	// Hydration starts disabled, so the writer's first write to each slot
	// is a new metadata bit that only a commit makes durable; it is enabled
	// half way, so later rounds race with background copies.
	cli(t, d, "create", "k", "--table",
		"0 131072 clone ./md ./dest.img ./src.img 8 1 no_hydration 4 hydration_threshold 2 hydration_batch_size 4")
	uri := d.URI("k")

	srcSlot := func(slot int) []byte { return src[slot*slotSize : (slot+1)*slotSize] }
	// expect[slot]: the acknowledged sequence number (0: the source's bytes).
	expect := make([]uint64, nslots)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 3))
	var acked, survivedInFlight, lostInFlight int
	for round := range *killRounds {
		if round >= *killRounds/2 {
			// Messages are not part of the table: after each restart the
			// device is back to its table's no_hydration (dm semantics).
			cli(t, d, "message", "k", "0", "enable_hydration")
		}
		fioCmd := exec.Command(fio, "--name=load", "--ioengine=nbd", "--uri="+uri, "--rw=randwrite",
			"--bs=4k", "--iodepth=8", "--offset=32m", "--size=32m", "--fsync=16", "--time_based",
			"--runtime=60", "--output=/dev/null")
		startProc(t, fioCmd)
		w := exec.Command(py, "-c", killWriter, uri, strconv.Itoa(round), strconv.Itoa((round+1)*1_000_000), strconv.Itoa(nslots))
		out, err := w.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		startProc(t, w)
		time.Sleep(time.Duration(150+rng.IntN(600)) * time.Millisecond)
		d.Kill()
		issued := map[int]uint64{} // slot → the write in flight at the kill
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) != 3 {
				continue
			}
			seq, _ := strconv.ParseUint(f[1], 10, 64)
			slot, _ := strconv.Atoi(f[2])
			switch f[0] {
			case "issue":
				issued[slot] = seq
			case "ack":
				expect[slot] = seq
				delete(issued, slot)
				acked++
			}
		}
		w.Wait()
		fioCmd.Wait()

		d.Start()
		got := readSlots(t, py, uri, filepath.Join(d.Dir, "src.img"), nslots)
		for slot := range nslots {
			want := expect[slot]
			switch {
			case got[slot] == want:
			case issued[slot] != 0 && got[slot] == issued[slot]:
				expect[slot] = issued[slot] // it landed: it is the slot's content now
				survivedInFlight++
			default:
				t.Fatalf("round %d: slot %d holds %s, want %s (acknowledged) or %s (in flight at the kill)",
					round, slot, describe(got[slot]), describe(want), describe(issued[slot]))
			}
			if issued[slot] != 0 && expect[slot] != issued[slot] {
				lostInFlight++
			}
		}
	}
	t.Logf("%d kill -9 rounds: %d acknowledged writes all kept; in flight at the kill: %d landed, %d did not",
		*killRounds, acked, survivedInFlight, lostInFlight)

	// Hydration picks up where it was and finishes; the writer's part of
	// the destination is exactly the acknowledged writes over the source.
	cli(t, d, "message", "k", "0", "hydration_threshold", "256")
	cli(t, d, "message", "k", "0", "hydration_batch_size", "64")
	cli(t, d, "message", "k", "0", "enable_hydration")
	cli(t, d, "wait", "k")
	cli(t, d, "remove", "k")
	dest := readFile(t, filepath.Join(d.Dir, "dest.img"))
	for slot := range nslots {
		want := srcSlot(slot)
		if expect[slot] != 0 {
			want = bytes.Repeat(binary.LittleEndian.AppendUint64(nil, expect[slot]), slotSize/8)
		}
		if !bytes.Equal(dest[slot*slotSize:(slot+1)*slotSize], want) {
			t.Fatalf("destination slot %d differs from the expected image after hydration", slot)
		}
	}
	if !bytes.Equal(readFile(t, filepath.Join(d.Dir, "src.img")), src) {
		t.Fatal("the source changed")
	}
}

// slotTorn marks a slot that is neither the source nor one whole write.
const slotTorn = ^uint64(0)

func describe(v uint64) string {
	switch v {
	case slotTorn:
		return "a torn or foreign block"
	case 0:
		return "the source's bytes"
	}
	return "write " + strconv.FormatUint(v, 10)
}

// readSlots reads what every slot holds through the export.
func readSlots(t testing.TB, py, uri, src string, nslots int) []uint64 {
	t.Helper()
	out, err := exec.Command(py, "-c", killReader, uri, src, strconv.Itoa(nslots)).Output()
	if err != nil {
		t.Fatalf("reading slots: %v", err)
	}
	got := make([]uint64, nslots)
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != nslots {
		t.Fatalf("reader printed %d lines for %d slots", len(lines), nslots)
	}
	for _, line := range lines {
		f := strings.Fields(line)
		slot, _ := strconv.Atoi(f[0])
		if f[1] == "torn" {
			got[slot] = slotTorn
			continue
		}
		got[slot], _ = strconv.ParseUint(f[1], 10, 64)
	}
	return got
}
