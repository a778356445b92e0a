package histogram

import (
	"math"
	"sync/atomic"
	"time"
)

// LatencyBounds are the default upper bounds for I/O latencies: 10 µs to
// 10 s, about three per decade (Prometheus' own default buckets stop at
// 5 ms at the low end, too coarse for a page cache hit).
var LatencyBounds = []time.Duration{
	10 * time.Microsecond, 25 * time.Microsecond, 50 * time.Microsecond,
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

// Histogram counts observations into buckets by upper bound (inclusive,
// as Prometheus' "le").
type Histogram struct {
	bounds []time.Duration // ascending
	// counts[i] counts observations in (bounds[i-1], bounds[i]];
	// counts[len(bounds)] those above the last bound.
	counts   []atomic.Uint64
	sumNanos atomic.Int64
}

// New returns a histogram with the given ascending upper bounds (nil:
// LatencyBounds). The slice is not copied; do not change it.
func New(bounds []time.Duration) *Histogram {
	if bounds == nil {
		bounds = LatencyBounds
	}
	return &Histogram{bounds: bounds, counts: make([]atomic.Uint64, len(bounds)+1)}
}

// Observe records one observation of d (negative counts as 0).
func (h *Histogram) Observe(d time.Duration) {
	d = max(d, 0)
	// A linear scan: 20 compares of an int64, cheaper than the branch
	// misses of a binary search at this size.
	i := 0
	for i < len(h.bounds) && d > h.bounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNanos.Add(int64(d))
}

// Since observes the time elapsed since start.
func (h *Histogram) Since(start time.Time) { h.Observe(time.Since(start)) }

// Snapshot is a histogram read at one moment.
type Snapshot struct {
	// Bounds are the upper bounds in seconds; Cumulative[i] counts the
	// observations <= Bounds[i]. Count includes those above the last.
	Bounds     []float64
	Cumulative []uint64
	Count      uint64
	SumSeconds float64
}

// Snapshot reads the histogram. Concurrent observations may or may not be
// included, but the result is always self-consistent (invariant 2): the
// buckets are read once each, and Count is their total.
func (h *Histogram) Snapshot() Snapshot {
	s := Snapshot{
		Bounds:     make([]float64, len(h.bounds)),
		Cumulative: make([]uint64, len(h.bounds)),
	}
	var total uint64
	for i := range h.counts {
		total += h.counts[i].Load()
		if i < len(h.bounds) {
			s.Bounds[i] = h.bounds[i].Seconds()
			s.Cumulative[i] = total
		}
	}
	s.Count = total
	s.SumSeconds = float64(h.sumNanos.Load()) / 1e9
	return s
}

// Buckets returns the snapshot as Prometheus' const-histogram map: upper
// bound in seconds to cumulative count.
func (s Snapshot) Buckets() map[float64]uint64 {
	m := make(map[float64]uint64, len(s.Bounds))
	for i, b := range s.Bounds {
		m[b] = s.Cumulative[i]
	}
	return m
}

// Quantile estimates the q-quantile (0 < q <= 1) in seconds by linear
// interpolation inside its bucket, as Prometheus' histogram_quantile does;
// NaN without observations. Above the last bound it answers the last bound.
func (s Snapshot) Quantile(q float64) float64 {
	if s.Count == 0 || len(s.Bounds) == 0 {
		return math.NaN()
	}
	rank := q * float64(s.Count)
	prevBound, prevCount := 0.0, uint64(0)
	for i, b := range s.Bounds {
		if float64(s.Cumulative[i]) >= rank {
			in := s.Cumulative[i] - prevCount
			if in == 0 {
				return b
			}
			return prevBound + (b-prevBound)*(rank-float64(prevCount))/float64(in)
		}
		prevBound, prevCount = b, s.Cumulative[i]
	}
	return s.Bounds[len(s.Bounds)-1]
}
