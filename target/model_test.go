package target

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdclone/nbdclone/blockdev"
)

var (
	modelSeed = flag.Uint64("seed", 0, "seed for the random model test (0: time-based; a failure prints its seed)")
	modelOps  = flag.Int("model.ops", 400, "operations per worker in the random model test")
)

// model is the expected content of a clone: per byte, a value or undefined
// (after a discard). Workers own disjoint byte zones, so the model needs no
// lock for content; zones are not region-aligned on purpose, so workers
// share regions and contend on region locks.
type model struct {
	data    []byte
	defined []bool
}

type opLog struct {
	mu  sync.Mutex
	ops []string
}

func (l *opLog) add(format string, args ...any) {
	l.mu.Lock()
	l.ops = append(l.ops, fmt.Sprintf(format, args...))
	l.mu.Unlock()
}

func (l *opLog) tail(n int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.ops[max(0, len(l.ops)-n):], "\n")
}

func TestRandomModel(t *testing.T) {
	seed := *modelSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	for round := range 3 {
		s := seed + uint64(round)
		t.Run(fmt.Sprintf("seed=%d", s), func(t *testing.T) { runModel(t, s, *modelOps) })
	}
}

func runModel(t *testing.T, seed uint64, opsPerWorker int) {
	rng := rand.New(rand.NewPCG(seed, 1))
	regionSectors := []int{8, 16}[rng.IntN(2)]
	regionSize := int64(regionSectors) * 512
	nrFull := 20 + rng.Int64N(40)
	tail := rng.Int64N(regionSize/512) * 512
	size := nrFull*regionSize + tail
	f := newFixture(t, size, seed)
	// Half the runs use a source that looks remote: a window in flight
	// (parallel chunks, a raised threshold), holes it reports (zeroed, not
	// copied), reads as hints.
	remote := rng.IntN(2) == 0
	if remote {
		punchSourceHoles(t, f, rng, regionSize)
	}
	t.Logf("seed %d: region %d B, size %d B, remote source %v", seed, regionSize, size, remote)
	// Hydration starts enabled and slow, so copies are in flight while
	// the workers write, zero and discard.
	tb, err := ParseTable(f.line(regionSectors, "0 4 hydration_threshold 4 hydration_batch_size 2"))
	if err != nil {
		t.Fatal(err)
	}
	env := f.env()
	env.Sweep.BusyInterval = time.Millisecond
	// A slow source keeps copies in flight long enough for user I/O to
	// race with them: that is where region-lock bugs live.
	open := env.OpenSource
	env.OpenSource = func(ctx context.Context, spec string) (blockdev.Reader, error) {
		src, err := open(ctx, spec)
		if err != nil {
			return nil, err
		}
		if remote {
			m := src.(countingReader).Reader.(blockdev.Mapper)
			return remoteReader{Reader: slowReader{src}, window: 8 * regionSize, request: 2 * regionSize, mapper: m}, nil
		}
		return slowReader{src}, nil
	}
	tg, err := Build(bg, tb, env)
	if err != nil {
		t.Fatal(err)
	}
	c := tg.(*clone)
	defer c.Close()
	c.Resume()

	m := &model{data: append([]byte(nil), f.srcData...), defined: make([]bool, size)}
	for i := range m.defined {
		m.defined[i] = true
	}
	log := &opLog{}
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d: %s\nlast ops:\n%s\nreplay: go test ./target -run 'TestRandomModel' -seed %d",
			seed, fmt.Sprintf(format, args...), log.tail(30), seed)
	}

	const workers = 4
	bounds := []int64{0}
	for i := 1; i < workers; i++ {
		bounds = append(bounds, (size*int64(i)/workers)/512*512+int64(rng.IntN(3))*512)
	}
	bounds = append(bounds, size)

	var gate sync.RWMutex // workers hold it shared per op; suspend takes it exclusively
	var wg sync.WaitGroup
	errs := make(chan string, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)+100))
			lo, hi := bounds[w], bounds[w+1]
			for i := range opsPerWorker {
				if msg := modelStep(c, m, r, lo, hi, &gate, log, w, i); msg != "" {
					errs <- msg
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for msg := range errs {
		fail("%s", msg)
	}

	// Hydrate everything and check the clone and the destination.
	c.Message(bg, []string{"hydration_threshold", "64"})
	c.Message(bg, []string{"hydration_batch_size", "8"})
	c.Message(bg, []string{"hydration_rate", "0"})
	c.Message(bg, []string{"enable_hydration"})
	waitHydrated(t, c, 60*time.Second)
	got := mustRead(t, c, 0, size)
	if i := firstDiff(got, m); i >= 0 {
		fail("after hydration, byte %d = %#x, want %#x", i, got[i], m.data[i])
	}
	if i := firstDiff(f.destContent(t), m); i >= 0 {
		fail("after hydration, destination byte %d differs from the model", i)
	}
	f.checkSourceUnchanged(t)

	// Everything was committed at the last commit: a reopened clone agrees.
	c.Suspend(bg)
	c.Close()
	c2 := f.build(t, regionSectors, "")
	if c2.md.Hydrated() != c2.geom.NrRegions() {
		fail("after reopen %d/%d hydrated", c2.md.Hydrated(), c2.geom.NrRegions())
	}
	if i := firstDiff(mustRead(t, c2, 0, size), m); i >= 0 {
		fail("after reopen, byte %d differs", i)
	}
	t.Logf("%d operations by %d workers agreed with the model, then hydration and a reopen", workers*opsPerWorker, workers)
}

// punchSourceHoles punches a few regions' worth of holes (some not region
// aligned) into the fixture's source, keeping srcData in step.
func punchSourceHoles(t *testing.T, f *fixture, rng *rand.Rand, regionSize int64) {
	t.Helper()
	fd, err := os.OpenFile(f.src, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	for range 4 {
		off := rng.Int64N(f.size/4096) * 4096
		n := min(f.size-off, (1+rng.Int64N(4))*regionSize)
		if err := unix.Fallocate(int(fd.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
			t.Fatalf("punching the source: %v", err)
		}
		clear(f.srcData[off : off+n])
	}
}

// slowReader delays most reads by up to half a millisecond.
type slowReader struct{ blockdev.Reader }

func (s slowReader) ReadAt(p []byte, off int64) (int, error) {
	if d := rand.IntN(2500); d < 2000 {
		time.Sleep(time.Duration(d) * time.Microsecond)
	}
	return s.Reader.ReadAt(p, off)
}

func firstDiff(got []byte, m *model) int {
	for i := range got {
		if m.defined[i] && got[i] != m.data[i] {
			return i
		}
	}
	return -1
}

// modelStep runs one random operation in [lo, hi) and returns a failure
// message, or "".
func modelStep(c *clone, m *model, r *rand.Rand, lo, hi int64, gate *sync.RWMutex, log *opLog, w, i int) string {
	ctx := context.Background()
	span := hi - lo
	// Offsets and lengths: mostly sector-aligned, sometimes byte-unaligned,
	// sometimes exactly a region.
	pick := func() (int64, int64) {
		rs := c.geom.RegionSize()
		switch r.IntN(4) {
		case 0: // a whole region, if one fits in the zone
			first := (lo + rs - 1) / rs
			last := hi / rs
			if last > first {
				reg := first + r.Int64N(last-first)
				return reg * rs, min(rs, c.geom.TargetSize()-reg*rs)
			}
			fallthrough
		case 1: // unaligned
			off := lo + r.Int64N(span)
			return off, 1 + r.Int64N(min(hi-off, 3*rs))
		default: // sectors, possibly spanning regions
			off := lo + r.Int64N(span/512)*512
			n := (1 + r.Int64N(max(1, min(hi-off, 4*rs)/512))) * 512
			return off, min(n, hi-off)
		}
	}
	op := r.IntN(100)
	if op < 3 { // suspend / resume with I/O drained, as the daemon does
		gate.Lock()
		log.add("w%d#%d suspend+resume", w, i)
		err := c.Suspend(ctx)
		if err == nil {
			err = c.Resume()
		}
		gate.Unlock()
		if err != nil {
			return fmt.Sprintf("suspend/resume: %v", err)
		}
		return ""
	}
	gate.RLock()
	defer gate.RUnlock()
	switch {
	case op < 35:
		off, n := pick()
		p := make([]byte, n)
		log.add("w%d#%d read %d+%d", w, i, off, n)
		if err := c.ReadAt(ctx, p, off); err != nil {
			return fmt.Sprintf("read %d+%d: %v", off, n, err)
		}
		for j := range p {
			if m.defined[off+int64(j)] && p[j] != m.data[off+int64(j)] {
				return fmt.Sprintf("read %d+%d: byte %d = %#x, want %#x", off, n, off+int64(j), p[j], m.data[off+int64(j)])
			}
		}
	case op < 65:
		off, n := pick()
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(r.Uint32())
		}
		fua := r.IntN(4) == 0
		log.add("w%d#%d write %d+%d fua=%v", w, i, off, n, fua)
		if err := c.WriteAt(ctx, p, off, fua); err != nil {
			return fmt.Sprintf("write %d+%d: %v", off, n, err)
		}
		copy(m.data[off:], p)
		for j := off; j < off+n; j++ {
			m.defined[j] = true
		}
	case op < 73:
		off, n := pick()
		log.add("w%d#%d zero %d+%d", w, i, off, n)
		if err := c.WriteZeroes(ctx, off, n, r.IntN(2) == 0); err != nil {
			return fmt.Sprintf("write-zeroes %d+%d: %v", off, n, err)
		}
		for j := off; j < off+n; j++ {
			m.data[j], m.defined[j] = 0, true
		}
	case op < 81:
		off, n := pick()
		log.add("w%d#%d trim %d+%d", w, i, off, n)
		if err := c.Trim(ctx, off, n); err != nil {
			return fmt.Sprintf("trim %d+%d: %v", off, n, err)
		}
		first, count := c.geom.WholeRegions(off, n)
		if count > 0 {
			for j := c.geom.Start(first); j < c.geom.Start(first)+c.geom.RangeLen(first, count); j++ {
				m.defined[j] = false
			}
		}
	case op < 88:
		log.add("w%d#%d flush", w, i)
		if err := c.Flush(ctx); err != nil {
			return fmt.Sprintf("flush: %v", err)
		}
	case op < 92:
		off, n := pick()
		log.add("w%d#%d cache %d+%d", w, i, off, n)
		if err := c.Cache(ctx, off, n); err != nil {
			return fmt.Sprintf("cache: %v", err)
		}
	default:
		msgs := [][]string{
			{"enable_hydration"}, {"disable_hydration"},
			{"hydration_threshold", fmt.Sprint(r.IntN(9))},
			{"hydration_batch_size", fmt.Sprint(r.IntN(6))},
			{"hydration_rate", fmt.Sprint([]int{0, 64 << 10, 1 << 20}[r.IntN(3)])},
			{"retry_hydration"},
		}
		msg := msgs[r.IntN(len(msgs))]
		log.add("w%d#%d message %v", w, i, msg)
		if err := c.Message(ctx, msg); err != nil {
			return fmt.Sprintf("message %v: %v", msg, err)
		}
	}
	return ""
}

// TestModelDestinationAfterWritesMatchesSourceOverlay is issue 2's
// end-state promise at the target level: after full hydration the
// destination is the source overlaid with the writes.
func TestModelDestinationAfterWritesMatchesSourceOverlay(t *testing.T) {
	f := newFixture(t, 50*4096+2048, 77)
	c := f.build(t, 8, "1 no_hydration")
	want := append([]byte(nil), f.srcData...)
	r := rand.New(rand.NewPCG(5, 5))
	for range 200 {
		off := r.Int64N(f.size - 1)
		n := 1 + r.Int64N(min(f.size-off, 3*4096))
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(r.Uint32())
		}
		if err := c.WriteAt(bg, p, off, false); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	c.Message(bg, []string{"hydration_threshold", "32"})
	c.Message(bg, []string{"enable_hydration"})
	waitHydrated(t, c, 30*time.Second)
	if !bytes.Equal(f.destContent(t), want) {
		t.Fatal("destination is not the source overlaid with the writes")
	}
	f.checkSourceUnchanged(t)
}
