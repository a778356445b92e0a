package rate

import "time"

// Window is how far back the rate is measured by default.
const Window = 10 * time.Second

type sample struct {
	at    time.Time
	bytes int64
}

// Estimator keeps the samples of the last window. Not safe for concurrent
// use: callers guard it.
type Estimator struct {
	window  time.Duration
	samples []sample
}

// New returns an estimator over window (0: Window).
func New(window time.Duration) *Estimator {
	if window <= 0 {
		window = Window
	}
	return &Estimator{window: window}
}

// Add records that bytes were hydrated at t. Samples must come in time
// order; one older than the newest is ignored, and a drop in bytes (a new
// table) starts over.
func (e *Estimator) Add(t time.Time, bytes int64) {
	if n := len(e.samples); n > 0 {
		last := e.samples[n-1]
		if t.Before(last.at) {
			return
		}
		if bytes < last.bytes {
			e.samples = e.samples[:0]
		}
	}
	e.samples = append(e.samples, sample{at: t, bytes: bytes})
	drop := 0
	for len(e.samples)-drop > 2 && t.Sub(e.samples[drop].at) > e.window {
		drop++
	}
	if drop > 0 {
		e.samples = append(e.samples[:0], e.samples[drop:]...)
	}
}

// Rate is bytes per second over the window, or -1 when unknown.
func (e *Estimator) Rate() float64 {
	if len(e.samples) < 2 {
		return -1
	}
	first, last := e.samples[0], e.samples[len(e.samples)-1]
	dt := last.at.Sub(first.at).Seconds()
	if dt <= 0 {
		return -1
	}
	return float64(last.bytes-first.bytes) / dt
}

// ETA is the time left to hydrate remaining bytes at Rate; ok is false
// when it is unknown.
func (e *Estimator) ETA(remaining int64) (eta time.Duration, ok bool) {
	if remaining <= 0 {
		return 0, true
	}
	r := e.Rate()
	if r <= 0 {
		return 0, false
	}
	return time.Duration(float64(remaining) / r * float64(time.Second)), true
}
