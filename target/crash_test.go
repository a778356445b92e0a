package target

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/internal/faultdev"
)

var crashOps = flag.Int("crash.ops", 60, "operations in each run of TestCrashAtEveryIO's workload (make soak: more)")

var crashMax = flag.Int("crash.max", 400, "crash points to try in TestCrashAtEveryIO (the run stops earlier when the workload finishes before the crash point)")

// durability is what may be read back at each byte after a crash: the value
// made durable by the last acknowledged FLUSH or FUA covering it, or any
// value written since (the device may or may not have persisted it).
type durability struct {
	durable    []byte
	durableAny []bool   // a flushed discard: anything may be read
	pending    [][]byte // values written since the last flush, per byte
	pendingAny []bool   // a discard since the last flush
	last       []byte   // the latest value written, per byte
	lastTrim   []bool   // the latest operation was a discard
}

func newDurability(src []byte) *durability {
	n := len(src)
	return &durability{
		durable: append([]byte(nil), src...), durableAny: make([]bool, n),
		pending: make([][]byte, n), pendingAny: make([]bool, n),
		last: append([]byte(nil), src...), lastTrim: make([]bool, n),
	}
}

// issue records a write before it is sent: from then on its data may be on
// the device.
func (d *durability) issue(off int64, p []byte) {
	for i, b := range p {
		j := off + int64(i)
		d.pending[j] = append(d.pending[j], b)
		d.last[j], d.lastTrim[j] = b, false
	}
}

func (d *durability) issueTrim(off, n int64) {
	for j := off; j < off+n; j++ {
		d.pendingAny[j], d.lastTrim[j] = true, true
	}
}

// flushed records an acknowledged FLUSH: the latest state of every byte is
// durable.
func (d *durability) flushed() {
	for j := range d.durable {
		if d.pending[j] == nil && !d.pendingAny[j] {
			continue
		}
		if d.lastTrim[j] {
			d.durableAny[j] = true
		} else {
			d.durable[j], d.durableAny[j] = d.last[j], false
		}
		d.pending[j], d.pendingAny[j] = nil, false
	}
}

// fua records an acknowledged FUA write: its own bytes are durable.
func (d *durability) fua(off int64, p []byte) {
	for i, b := range p {
		j := off + int64(i)
		d.durable[j], d.durableAny[j] = b, false
		d.pending[j], d.pendingAny[j] = nil, false
	}
}

func (d *durability) allowed(j int, v byte) bool {
	return d.durableAny[j] || d.pendingAny[j] || v == d.durable[j] || slices.Contains(d.pending[j], v)
}

// TestCrashAtEveryIO crashes a clone at its Nth destination or metadata
// operation, for N = 0, 1, 2, …, during a seeded workload with background
// hydration running, then builds a clone on what a power failure would leave
// (the synced destination, plus for odd N a random subset of the unsynced
// writes) and the metadata store, and checks every byte: writes
// acknowledged before a FLUSH or FUA are there, hydrated regions hold the
// right data, unhydrated ones read from the source.
func TestCrashAtEveryIO(t *testing.T) {
	seed := *modelSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (replay: go test ./target -run TestCrashAtEveryIO -seed %d)", seed, seed)
	completed := false
	for n := 0; n < *crashMax; n++ {
		if crashRun(t, seed, n) {
			completed = true
			t.Logf("the workload finished before crash point %d: every point before it was tried", n)
			break
		}
		if t.Failed() {
			return
		}
	}
	if !completed {
		t.Logf("stopped after %d crash points (-crash.max)", *crashMax)
	}
}

// crashRun runs the workload with a crash at operation n and verifies the
// recovered clone. It reports whether the workload finished without
// reaching the crash.
func crashRun(t *testing.T, seed uint64, n int) (finished bool) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, uint64(n)))
	const regionSize = 4096
	size := int64(24*regionSize + 1024)
	f := newFixture(t, size, seed)
	plan := faultdev.NewPlan(n)
	var dev *faultdev.Device
	env := Env{
		OpenDevice: func(path string) (blockdev.Device, error) {
			d, err := blockdev.OpenFile(path)
			if err != nil {
				return nil, err
			}
			dev, err = faultdev.Wrap(d, plan)
			return dev, err
		},
		MetadataKV: faultdev.WrapKV(plan),
		Sweep:      SweepTuning{BusyInterval: time.Millisecond, Backoff: time.Millisecond},
	}
	tb, _ := ParseTable(f.line(8, "0 4 hydration_threshold 3 hydration_batch_size 2"))
	tg, err := Build(bg, tb, env)
	if err != nil {
		if plan.Crashed() {
			return false // crashed while formatting: nothing to check
		}
		t.Fatalf("crash point %d: build: %v", n, err)
	}
	tg.Resume()
	model := newDurability(f.srcData)
	ctx := context.Background()
	var log []string
	for i := 0; i < *crashOps && !plan.Crashed(); i++ {
		off := rng.Int64N(size - 1)
		ln := 1 + rng.Int64N(min(size-off, 3*regionSize))
		if rng.IntN(3) == 0 { // whole regions
			off = rng.Int64N(size/regionSize) * regionSize
			ln = min(regionSize*(1+rng.Int64N(2)), size-off)
		}
		switch op := rng.IntN(10); {
		case op < 5:
			p := make([]byte, ln)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			fua := rng.IntN(4) == 0
			log = append(log, fmt.Sprintf("write %d+%d fua=%v", off, ln, fua))
			model.issue(off, p)
			if err := tg.WriteAt(ctx, p, off, fua); err == nil && fua {
				model.fua(off, p)
			}
		case op < 6:
			log = append(log, fmt.Sprintf("zero %d+%d", off, ln))
			model.issue(off, make([]byte, ln))
			tg.WriteZeroes(ctx, off, ln, false)
		case op < 7:
			first, count := geomOf(tg).WholeRegions(off, ln)
			log = append(log, fmt.Sprintf("trim %d+%d", off, ln))
			if count > 0 {
				s := geomOf(tg).Start(first)
				model.issueTrim(s, geomOf(tg).RangeLen(first, count))
			}
			tg.Trim(ctx, off, ln)
		default:
			log = append(log, "flush")
			if err := tg.Flush(ctx); err == nil {
				model.flushed()
			}
		}
		if rng.IntN(8) == 0 {
			time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond) // let the sweep and the waker run
		}
	}
	finished = !plan.Crashed()
	plan.Crash() // a finished run crashes at its end: nothing unflushed is promised
	tg.Close()

	// Recover: the crash image of the destination, the metadata store as
	// its completed (synced) commits left it.
	var subset *rand.Rand
	if n%2 == 1 {
		subset = rand.New(rand.NewPCG(seed, uint64(n)+1<<32))
	}
	if err := os.WriteFile(f.dst, dev.CrashImage(subset), 0o600); err != nil {
		t.Fatal(err)
	}
	tb2, _ := ParseTable(f.line(8, "1 no_hydration"))
	rec, err := Build(bg, tb2, Env{})
	if err != nil {
		t.Fatalf("crash point %d: the metadata does not reopen after a crash: %v", n, err)
	}
	defer rec.Close()
	rec.Resume()
	got := make([]byte, size)
	if err := rec.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("crash point %d: read after recovery: %v", n, err)
	}
	for j := range got {
		if !model.allowed(j, got[j]) {
			r := uint64(j / regionSize)
			t.Fatalf("crash point %d (seed %d): byte %d (region %d, hydrated=%v) = %#x; durable %#x, pending %x\nops:\n%v",
				n, seed, j, r, rec.(*clone).md.IsHydrated(r), got[j], model.durable[j], model.pending[j], log)
		}
	}
	return finished
}

func geomOf(tg Target) interface {
	WholeRegions(off, n int64) (uint64, uint64)
	Start(r uint64) int64
	RangeLen(r, n uint64) int64
} {
	return tg.(*clone).geom
}
