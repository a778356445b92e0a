package hydrate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// fakePlanner is an in-memory bitmap with locks; Hydrate takes copyTime.
type fakePlanner struct {
	mu        sync.Mutex
	n         uint64
	hydrated  []bool
	locked    []bool
	inFlight  uint64 // regions claimed and not yet completed
	maxFlight uint64
	batches   [][2]uint64
	busy      bool
	fail      bool
	copyTime  time.Duration
	claimedAt []time.Time
	causes    []Cause
	// failRegion, if set, fails the batches it returns true for.
	failRegion func(start, count uint64) bool
	failErr    error // what failRegion's failures return
}

func newFake(n uint64) *fakePlanner {
	return &fakePlanner{n: n, hydrated: make([]bool, n), locked: make([]bool, n)}
}

func (f *fakePlanner) NrRegions() uint64 { return f.n }

func (f *fakePlanner) Claim(from, limit, maxCount uint64) (uint64, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for r := from; r < min(limit, f.n); r++ {
		if f.hydrated[r] || f.locked[r] {
			continue
		}
		c := uint64(0)
		for r+c < f.n && c < maxCount && !f.hydrated[r+c] && !f.locked[r+c] {
			f.locked[r+c] = true
			c++
		}
		f.inFlight += c
		f.maxFlight = max(f.maxFlight, f.inFlight)
		f.claimedAt = append(f.claimedAt, time.Now())
		f.batches = append(f.batches, [2]uint64{r, c})
		f.causes = append(f.causes, -1)
		return r, c
	}
	return 0, 0
}

func (f *fakePlanner) Hydrate(ctx context.Context, start, count uint64, cause Cause) error {
	if f.copyTime > 0 {
		time.Sleep(f.copyTime)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.batches) - 1; i >= 0; i-- {
		if f.batches[i][0] == start && f.causes[i] == -1 {
			f.causes[i] = cause
			break
		}
	}
	if f.failRegion != nil && f.failRegion(start, count) {
		if f.failErr != nil {
			return f.failErr
		}
		return errors.New("injected region failure")
	}
	for r := start; r < start+count; r++ {
		if !f.fail {
			f.hydrated[r] = true
		}
	}
	if f.fail {
		return errors.New("injected copy failure")
	}
	return nil
}

func (f *fakePlanner) Release(start, count uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for r := start; r < start+count; r++ {
		if !f.locked[r] {
			panic(fmt.Sprintf("fakePlanner: release of unclaimed region %d", r))
		}
		f.locked[r] = false
	}
	f.inFlight -= count
}

func (f *fakePlanner) Busy() bool { f.mu.Lock(); defer f.mu.Unlock(); return f.busy }

func (f *fakePlanner) CanHydrate() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, h := range f.hydrated {
		if !h {
			return true
		}
	}
	return false
}

func (f *fakePlanner) count() (n uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, h := range f.hydrated {
		if h {
			n++
		}
	}
	return n
}

func TestSweepThresholdAndBatches(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(100)
		f.copyTime = 10 * time.Millisecond
		s := NewSweeper(f, Options{Enabled: true, Threshold: 6, BatchSize: 4})
		defer s.Close()
		s.Resume()
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if f.count() != 100 {
			t.Fatalf("hydrated %d/100", f.count())
		}
		if f.maxFlight > 6 {
			t.Fatalf("%d regions in flight, threshold 6", f.maxFlight)
		}
		for _, b := range f.batches {
			if b[1] == 0 || b[1] > 4 {
				t.Fatalf("batch %v exceeds the batch size", b)
			}
		}
		if f.maxFlight < 5 {
			t.Fatalf("threshold 6 never used: max in flight %d", f.maxFlight)
		}
	})
}

func TestThresholdZeroDisabledAndPaused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(10)
		s := NewSweeper(f, Options{Enabled: true, Threshold: 0, BatchSize: 1})
		defer s.Close()
		s.Resume()
		time.Sleep(3 * time.Second)
		if f.count() != 0 {
			t.Fatal("threshold 0 hydrated something")
		}
		s.SetThreshold(1)
		s.SetEnabled(false)
		time.Sleep(3 * time.Second)
		if f.count() != 0 {
			t.Fatal("disabled sweep hydrated something")
		}
		s.Pause()
		s.SetEnabled(true)
		time.Sleep(3 * time.Second)
		if f.count() != 0 {
			t.Fatal("paused sweep hydrated something")
		}
		s.Resume()
		time.Sleep(3 * time.Second)
		if f.count() != 10 {
			t.Fatalf("after resume hydrated %d/10", f.count())
		}
	})
}

func TestPauseWaitsForCopiesInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(50)
		f.copyTime = 100 * time.Millisecond
		s := NewSweeper(f, Options{Enabled: true, Threshold: 8, BatchSize: 2})
		defer s.Close()
		s.Resume()
		time.Sleep(50 * time.Millisecond)
		s.Pause()
		f.mu.Lock()
		inFlight := f.inFlight
		f.mu.Unlock()
		if inFlight != 0 || s.State().InFlight != 0 {
			t.Fatalf("Pause returned with %d regions in flight", inFlight)
		}
		before := f.count()
		time.Sleep(2 * time.Second)
		if f.count() != before {
			t.Fatal("a copy started after Pause")
		}
	})
}

func TestBusyYieldsToUserIO(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(1000)
		f.busy = true
		s := NewSweeper(f, Options{Enabled: true, Threshold: 4, BatchSize: 1, BusyInterval: time.Second})
		defer s.Close()
		s.Resume()
		time.Sleep(10*time.Second + time.Millisecond)
		synctest.Wait()
		// One batch per BusyInterval while user I/O is in flight.
		if n := f.count(); n < 9 || n > 11 {
			t.Fatalf("under constant I/O hydrated %d regions in 10 s, want one per second", n)
		}
		strict := newFake(1000)
		strict.busy = true
		s2 := NewSweeper(strict, Options{Enabled: true, Threshold: 4, BatchSize: 1, BusyInterval: -1})
		defer s2.Close()
		s2.Resume()
		time.Sleep(5 * time.Second)
		if strict.count() != 0 {
			t.Fatal("dm-clone's strict rule: nothing may start while I/O is in flight")
		}
		strict.mu.Lock()
		strict.busy = false
		strict.mu.Unlock()
		s2.Kick() // the target kicks when its last user I/O completes
		time.Sleep(time.Second)
		synctest.Wait()
		if strict.count() != 1000 {
			t.Fatalf("idle: hydrated %d/1000", strict.count())
		}
	})
}

func TestErrorsAreBoundedAndReported(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(20)
		f.fail = true
		var stopped []string
		var mu sync.Mutex
		s := NewSweeper(f, Options{Enabled: true, Threshold: 1, BatchSize: 1, MaxErrors: 5,
			Backoff: 100 * time.Millisecond, MaxBackoff: time.Second,
			OnStop: func(r string) { mu.Lock(); stopped = append(stopped, r); mu.Unlock() }})
		defer s.Close()
		s.Resume()
		time.Sleep(30 * time.Second)
		synctest.Wait()
		st := s.State()
		mu.Lock()
		defer mu.Unlock()
		if st.Stopped == "" || len(stopped) != 1 {
			t.Fatalf("after persistent failures: stopped=%q, OnStop called %d times", st.Stopped, len(stopped))
		}
		if f.count() != 0 {
			t.Fatal("a failed copy marked a region hydrated")
		}
		if n := len(f.batches); n != 5 {
			t.Fatalf("%d attempts, want exactly MaxErrors=5", n)
		}
		// Exponential backoff between the attempts: 0.1, 0.2, 0.4, 0.8 s.
		for i := 1; i < len(f.claimedAt); i++ {
			want := 100 * time.Millisecond << (i - 1)
			if gap := f.claimedAt[i].Sub(f.claimedAt[i-1]); gap < want {
				t.Fatalf("attempt %d came %v after the previous one, want ≥ %v", i, gap, want)
			}
		}
		f.mu.Lock()
		f.fail = false
		f.mu.Unlock()
		s.SetEnabled(true) // restarts after the errors are fixed
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if f.count() != 20 {
			t.Fatalf("after re-enable hydrated %d/20", f.count())
		}
	})
}

func TestCopier(t *testing.T) {
	src := bytes.Repeat([]byte("0123456789"), 1000)
	dst := make(sliceRW, len(src))
	c := NewCopier(bytes.NewReader(src), dst, CopierOptions{Chunk: 1024})
	if err := c.Copy(context.Background(), 1000, 5000); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst[1000:6000], src[1000:6000]) || dst[999] != 0 || dst[6000] != 0 {
		t.Fatal("copied the wrong range")
	}
	if c.CopiedBytes() != 5000 {
		t.Fatalf("CopiedBytes = %d", c.CopiedBytes())
	}
	// A short source is an error, never a partial success.
	if err := c.Copy(context.Background(), 9000, 2000); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short read: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Copy(ctx, 0, 100); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled copy: %v", err)
	}
	if c.Errors() != 2 {
		t.Fatalf("Errors = %d", c.Errors())
	}
}

type sliceRW []byte

func (s sliceRW) WriteAt(p []byte, off int64) (int, error) { return copy(s[off:], p), nil }
