package histogram

import (
	"math"
	"sync"
	"testing"
	"time"
)

// TestBuckets: each observation lands in the first bucket whose bound is
// >= it (bounds are inclusive, Prometheus' "le"); above the last bound
// only Count grows; the sum is exact.
func TestBuckets(t *testing.T) {
	h := New([]time.Duration{time.Millisecond, 10 * time.Millisecond, 100 * time.Millisecond})
	for _, d := range []time.Duration{
		0, -time.Second, // negative counts as 0
		time.Millisecond,             // on a bound: that bucket
		time.Millisecond + 1,         // just above: the next
		50 * time.Millisecond,        // third
		100 * time.Millisecond,       // third (inclusive)
		time.Second, 5 * time.Second, // above every bound
	} {
		h.Observe(d)
	}
	s := h.Snapshot()
	want := []uint64{3, 4, 6}
	for i, w := range want {
		if s.Cumulative[i] != w {
			t.Errorf("cumulative[%d] (le %v) = %d, want %d", i, s.Bounds[i], s.Cumulative[i], w)
		}
	}
	if s.Count != 8 {
		t.Errorf("count %d, want 8", s.Count)
	}
	wantSum := (time.Millisecond + time.Millisecond + 1 + 50*time.Millisecond + 100*time.Millisecond + 6*time.Second).Seconds()
	if math.Abs(s.SumSeconds-wantSum) > 1e-9 {
		t.Errorf("sum %v, want %v", s.SumSeconds, wantSum)
	}
	if s.Bounds[1] != 0.01 {
		t.Errorf("bounds in seconds: %v", s.Bounds)
	}
	m := s.Buckets()
	if len(m) != 3 || m[0.001] != 3 || m[0.1] != 6 {
		t.Errorf("Buckets() = %v", m)
	}
}

// TestQuantile interpolates inside the bucket, as histogram_quantile does.
func TestQuantile(t *testing.T) {
	h := New([]time.Duration{time.Second, 2 * time.Second})
	if q := h.Snapshot().Quantile(0.5); !math.IsNaN(q) {
		t.Errorf("quantile of nothing: %v, want NaN", q)
	}
	for range 10 {
		h.Observe(500 * time.Millisecond)
	}
	for range 10 {
		h.Observe(1500 * time.Millisecond)
	}
	s := h.Snapshot()
	if q := s.Quantile(0.5); q != 1 {
		t.Errorf("median %v, want 1", q)
	}
	if q := s.Quantile(0.75); q != 1.5 {
		t.Errorf("p75 %v, want 1.5", q)
	}
}

// TestConcurrent: observations from many goroutines are all counted
// (run with -race), and a snapshot taken meanwhile is self-consistent.
func TestConcurrent(t *testing.T) {
	h := New(nil)
	const workers, each = 8, 2000
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				h.Observe(time.Duration(w*each+i) * time.Microsecond)
			}
		})
	}
	for range 50 {
		s := h.Snapshot()
		for i := 1; i < len(s.Cumulative); i++ {
			if s.Cumulative[i] < s.Cumulative[i-1] {
				t.Fatalf("snapshot not cumulative: %v", s.Cumulative)
			}
		}
		if last := s.Cumulative[len(s.Cumulative)-1]; last > s.Count {
			t.Fatalf("bucket %d above count %d", last, s.Count)
		}
	}
	wg.Wait()
	if s := h.Snapshot(); s.Count != workers*each {
		t.Errorf("count %d, want %d", s.Count, workers*each)
	}
}

// TestObserveAllocs: the hot path allocates nothing.
func TestObserveAllocs(t *testing.T) {
	h := New(nil)
	if n := testing.AllocsPerRun(1000, func() { h.Observe(3 * time.Millisecond) }); n != 0 {
		t.Errorf("Observe allocates %v times per call", n)
	}
}

func BenchmarkObserve(b *testing.B) {
	h := New(nil)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			h.Observe(300 * time.Microsecond)
		}
	})
}
