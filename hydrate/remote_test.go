package hydrate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
)

func TestHintsGoAheadOfTheSweepAndIgnoreBusy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(1000)
		f.busy = true // constant user I/O: the sweep starts one batch a second
		s := NewSweeper(f, Options{Enabled: true, Threshold: 2, BatchSize: 1, BusyInterval: time.Second})
		defer s.Close()
		s.Resume()
		synctest.Wait()
		s.Hint(500, 3)
		s.Hint(900, 1)
		time.Sleep(100 * time.Millisecond)
		synctest.Wait()
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, r := range []uint64{500, 501, 502, 900} {
			if !f.hydrated[r] {
				t.Fatalf("hinted region %d not hydrated while the sweep is held back", r)
			}
		}
		hinted := 0
		for i, b := range f.batches {
			if f.causes[i] == CauseHint {
				hinted += int(b[1])
				if b[0] != 500 && b[0] != 501 && b[0] != 502 && b[0] != 900 {
					t.Fatalf("a hint claimed batch %v", b)
				}
			}
		}
		if hinted != 4 || len(f.batches) > 6 {
			t.Fatalf("%d hinted regions, %d batches: %v", hinted, len(f.batches), f.batches)
		}
	})
}

func TestHintsNeedHydrationEnabled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(100)
		s := NewSweeper(f, Options{Enabled: false, Threshold: 4, BatchSize: 4})
		defer s.Close()
		s.Resume()
		s.Hint(10, 5)
		time.Sleep(5 * time.Second)
		if f.count() != 0 || s.State().QueuedHints != 0 {
			t.Fatalf("no_hydration: %d regions hydrated from hints", f.count())
		}
		// Threshold first: enabled at threshold 4 even for a moment, the
		// sweep itself would copy regions.
		s.SetThreshold(0)
		s.SetEnabled(true)
		s.Hint(10, 5)
		time.Sleep(5 * time.Second)
		if f.count() != 0 {
			t.Fatal("threshold 0: a hint was hydrated")
		}
	})
}

func TestHintQueueIsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(100000)
		s := NewSweeper(f, Options{Enabled: true, Threshold: 1, BatchSize: 1, MaxHints: 10})
		defer s.Close()
		// Paused: hints queue up; the oldest fall off.
		for r := uint64(0); r < 1000; r += 2 {
			s.Hint(r, 1)
		}
		if q := s.State().QueuedHints; q != 10 {
			t.Fatalf("%d hints queued, bound 10", q)
		}
		s.Hint(989, 1) // adjoins the last: merged
		if q := s.State().QueuedHints; q != 10 {
			t.Fatalf("%d hints queued after a merge", q)
		}
	})
}

func TestRemoteWindowRaisesThresholdAndBatch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(400)
		f.copyTime = 10 * time.Millisecond
		s := NewSweeper(f, Options{Enabled: true, Threshold: 1, BatchSize: 1,
			RegionSize: 4096, WindowBytes: 64 << 10, MinBatchBytes: 16 << 10})
		defer s.Close()
		st := s.State()
		if st.Threshold != 1 || st.BatchSize != 1 || st.EffectiveThreshold != 16 || st.EffectiveBatch != 4 {
			t.Fatalf("state %+v", st)
		}
		s.Resume()
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if f.count() != 400 {
			t.Fatalf("hydrated %d/400", f.count())
		}
		if f.maxFlight != 16 {
			t.Fatalf("max in flight %d, want the window's 16 regions", f.maxFlight)
		}
		for _, b := range f.batches {
			if b[1] > 4 {
				t.Fatalf("batch %v exceeds the 4-region floor", b)
			}
		}
		// Threshold 0 still stops a remote sweep.
		g := newFake(10)
		s2 := NewSweeper(g, Options{Enabled: true, Threshold: 0, RegionSize: 4096, WindowBytes: 1 << 20})
		defer s2.Close()
		s2.Resume()
		time.Sleep(3 * time.Second)
		if g.count() != 0 {
			t.Fatal("threshold 0 hydrated a remote source")
		}
	})
}

func TestRateLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(1000)
		const regionSize, bps = 4096, 10 * 4096 // 10 regions a second
		s := NewSweeper(f, Options{Enabled: true, Threshold: 8, BatchSize: 2, RegionSize: regionSize, Rate: bps})
		defer s.Close()
		if st := s.State(); st.Rate != bps {
			t.Fatalf("state %+v", st)
		}
		start := time.Now()
		s.Resume()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		n := f.count()
		// 10 s at 10 regions/s, plus a quarter second of burst and the batch
		// in hand.
		if n < 95 || n > 106 {
			t.Fatalf("hydrated %d regions in %v at 10 regions/s", n, time.Since(start))
		}
		s.SetRate(0)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if f.count() != 1000 {
			t.Fatalf("unthrottled: %d/1000", f.count())
		}
	})
}

func TestRegionFailuresStopTheSweep(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(50)
		f.failRegion = func(start, count uint64) bool { return start <= 7 && 7 < start+count }
		var stops atomic.Int32
		s := NewSweeper(f, Options{Enabled: true, Threshold: 4, BatchSize: 1, MaxErrors: 100, MaxRegionErrors: 3,
			Backoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond, OnStop: func(string) { stops.Add(1) }})
		defer s.Close()
		s.Resume()
		time.Sleep(30 * time.Second)
		synctest.Wait()
		st := s.State()
		if !strings.Contains(st.Stopped, "region 7 failed 3 times") || stops.Load() != 1 {
			t.Fatalf("stopped %q after %d stops", st.Stopped, stops.Load())
		}
		if f.count() != 49 {
			t.Fatalf("hydrated %d/49 good regions", f.count())
		}
		attempts := func() (n int) {
			f.mu.Lock()
			defer f.mu.Unlock()
			for _, b := range f.batches {
				if b[0] == 7 {
					n++
				}
			}
			return n
		}
		if a := attempts(); a != 3 {
			t.Fatalf("region 7 tried %d times, bound 3", a)
		}
		// retry_hydration: three more attempts, then stopped again.
		s.Retry()
		time.Sleep(30 * time.Second)
		synctest.Wait()
		if a := attempts(); a != 6 || s.State().Stopped == "" || stops.Load() != 2 {
			t.Fatalf("after retry: %d attempts, stopped %q, %d stops", a, s.State().Stopped, stops.Load())
		}
	})
}

func TestFailuresInFlightTogetherCountOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(1000)
		f.fail = true
		f.copyTime = 10 * time.Millisecond
		s := NewSweeper(f, Options{Enabled: true, Threshold: 8, BatchSize: 1, MaxErrors: 3, MaxRegionErrors: 100,
			Backoff: 100 * time.Millisecond, MaxBackoff: time.Second})
		defer s.Close()
		s.Resume()
		time.Sleep(time.Minute)
		synctest.Wait()
		st := s.State()
		if !strings.HasPrefix(st.Stopped, "3 consecutive") {
			t.Fatalf("stopped %q", st.Stopped)
		}
		// Each round starts 8 copies; a round that fails together counts
		// once, so three rounds run, not 3 copies.
		if n := len(f.batches); n != 24 {
			t.Fatalf("%d copies before stopping, want 3 rounds of 8", n)
		}
	})
}

// mappedSource is a byte slice whose zero runs of 4 KiB blocks are
// reported as holes.
type mappedSource struct {
	*bytes.Reader
	data   []byte
	reads  atomic.Int64
	failAt int64 // a read covering this offset fails; -1 never
}

func (m *mappedSource) ReadAt(p []byte, off int64) (int, error) {
	if m.failAt >= 0 && off <= m.failAt && m.failAt < off+int64(len(p)) {
		return 0, errors.New("injected read failure")
	}
	m.reads.Add(int64(len(p)))
	return m.Reader.ReadAt(p, off)
}

func (m *mappedSource) Map(off, n int64) ([]blockdev.Extent, error) {
	var out []blockdev.Extent
	end := min(off+n, int64(len(m.data)))
	for o := off; o < end; {
		z := isZero(m.data[o:min(end, (o/4096+1)*4096)])
		e := min(end, (o/4096+1)*4096)
		for e < end && isZero(m.data[e:min(end, e+4096)]) == z {
			e = min(end, e+4096)
		}
		out = append(out, blockdev.Extent{Length: e - o, Hole: z, Zero: z})
		o = e
	}
	return out, nil
}

func isZero(b []byte) bool { return bytes.Count(b, []byte{0}) == len(b) }

type zeroDest struct {
	mu     sync.Mutex
	data   []byte
	zeroed int64
}

func (d *zeroDest) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return copy(d.data[off:], p), nil
}

func (d *zeroDest) WriteZeroes(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	clear(d.data[off : off+n])
	d.zeroed += n
	return nil
}

func TestCopierSkipsSourceHoles(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	clear(data[8192 : 8192+64<<10])
	clear(data[512<<10:])
	src := &mappedSource{Reader: bytes.NewReader(data), data: data, failAt: -1}
	dst := &zeroDest{data: bytes.Repeat([]byte{0xff}, len(data))}
	c := NewCopier(src, dst, CopierOptions{Chunk: 64 << 10})
	if err := c.Copy(context.Background(), 4096, int64(len(data))-4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst.data[4096:], data[4096:]) || dst.data[4095] != 0xff {
		t.Fatal("destination differs from the source")
	}
	holes := int64(64<<10) + int64(len(data)-512<<10)
	if c.HoleBytes() != holes || dst.zeroed != holes {
		t.Fatalf("hole bytes %d (destination zeroed %d), want %d", c.HoleBytes(), dst.zeroed, holes)
	}
	if got, want := src.reads.Load(), int64(len(data))-4096-holes; got != want || c.CopiedBytes() != want {
		t.Fatalf("read %d bytes from the source, copied %d, want %d", got, c.CopiedBytes(), want)
	}
}

// slowSource counts reads in flight; each takes 10 ms of (fake) time.
type slowSource struct {
	inFlight, peak atomic.Int64
	failAt         int64
}

func (s *slowSource) ReadAt(p []byte, off int64) (int, error) {
	n := s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	for old := s.peak.Load(); n > old && !s.peak.CompareAndSwap(old, n); old = s.peak.Load() {
	}
	time.Sleep(10 * time.Millisecond)
	if s.failAt >= 0 && off <= s.failAt && s.failAt < off+int64(len(p)) {
		return 0, errors.New("injected")
	}
	for i := range p {
		p[i] = byte(off + int64(i))
	}
	return len(p), nil
}

func TestCopierKeepsItsWindowInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &slowSource{failAt: -1}
		dst := &zeroDest{data: make([]byte, 1<<20)}
		c := NewCopier(src, dst, CopierOptions{Chunk: 16 << 10, InFlightBytes: 64 << 10})
		var wg sync.WaitGroup
		for i := range 2 {
			wg.Go(func() {
				if err := c.Copy(context.Background(), int64(i)*512<<10, 512<<10); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if p := src.peak.Load(); p != 4 {
			t.Fatalf("peak %d chunks in flight, want the window's 4", p)
		}
		for i, b := range dst.data {
			if b != byte(i) {
				t.Fatalf("byte %d wrong", i)
			}
		}
		// A failed chunk fails the copy, and the copy waits for the others.
		src.failAt = 300 << 10
		if err := c.Copy(context.Background(), 0, 1<<20); err == nil || src.inFlight.Load() != 0 {
			t.Fatalf("copy over a failing chunk: %v, %d reads still in flight", err, src.inFlight.Load())
		}
		if c.Errors() != 1 {
			t.Fatalf("Errors %d", c.Errors())
		}
		// Local copies stay one chunk at a time.
		src2 := &slowSource{failAt: -1}
		c2 := NewCopier(src2, dst, CopierOptions{Chunk: 16 << 10})
		c2.Copy(context.Background(), 0, 256<<10)
		if src2.peak.Load() != 1 {
			t.Fatalf("a local copier had %d chunks in flight", src2.peak.Load())
		}
	})
}

func TestSourceChangeStopsAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(100)
		f.failRegion = func(start, count uint64) bool { return start >= 50 }
		s := NewSweeper(f, Options{Enabled: true, Threshold: 1, BatchSize: 10})
		defer s.Close()
		f.mu.Lock()
		f.failErr = fmt.Errorf("copy: %w", blockdev.ErrSourceChanged)
		f.mu.Unlock()
		s.Resume()
		time.Sleep(time.Minute)
		synctest.Wait()
		if st := s.State(); !strings.HasPrefix(st.Stopped, "the source changed") {
			t.Fatalf("stopped %q", st.Stopped)
		}
		n := 0
		f.mu.Lock()
		for _, b := range f.batches {
			if b[0] >= 50 {
				n++
			}
		}
		f.mu.Unlock()
		if n != 1 || f.count() != 50 {
			t.Fatalf("%d attempts after the source changed, %d hydrated", n, f.count())
		}
	})
}
