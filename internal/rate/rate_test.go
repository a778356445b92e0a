package rate

import (
	"testing"
	"time"
)

func TestRateAndETA(t *testing.T) {
	e := New(10 * time.Second)
	t0 := time.Unix(1000, 0)
	if r := e.Rate(); r != -1 {
		t.Errorf("rate without samples %v", r)
	}
	e.Add(t0, 0)
	if _, ok := e.ETA(100); ok {
		t.Error("ETA known from one sample")
	}
	// 1 MiB/s for 30 s: the window keeps the last 10 s only.
	for i := 1; i <= 30; i++ {
		e.Add(t0.Add(time.Duration(i)*time.Second), int64(i)<<20)
	}
	if r := e.Rate(); r != 1<<20 {
		t.Errorf("rate %v, want 1 MiB/s", r)
	}
	if n := len(e.samples); n != 11 {
		t.Errorf("%d samples kept, want 11 (10 s window)", n)
	}
	if eta, ok := e.ETA(30 << 20); !ok || eta != 30*time.Second {
		t.Errorf("ETA %v %v, want 30s", eta, ok)
	}
	if eta, ok := e.ETA(0); !ok || eta != 0 {
		t.Errorf("ETA of nothing left %v %v", eta, ok)
	}
	// The rate changes to 4 MiB/s: after a window, only that counts.
	b := int64(30 << 20)
	for i := 31; i <= 45; i++ {
		b += 4 << 20
		e.Add(t0.Add(time.Duration(i)*time.Second), b)
	}
	if r := e.Rate(); r != 4<<20 {
		t.Errorf("rate after the change %v, want 4 MiB/s", r)
	}
	// A stall: zero rate, unknown ETA.
	for i := 46; i <= 60; i++ {
		e.Add(t0.Add(time.Duration(i)*time.Second), b)
	}
	if _, ok := e.ETA(1); ok || e.Rate() != 0 {
		t.Errorf("stalled: rate %v", e.Rate())
	}
	// Out of order samples are ignored; fewer bytes start over.
	e.Add(t0, 0)
	if len(e.samples) == 0 || e.samples[len(e.samples)-1].bytes != b {
		t.Error("an older sample was taken")
	}
	e.Add(t0.Add(61*time.Second), 5)
	if e.Rate() != -1 {
		t.Errorf("rate after a restart %v, want unknown", e.Rate())
	}
}
