package daemon

import (
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/target"
)

// TestMonitorEvents: the monitor raises each hydration event once, on the
// change: hydrated (not for a table complete at load), hydration stopped
// and running again, metadata mode changes; a new table starts afresh;
// the rate and ETA follow the samples (the progress bar's estimator).
func TestMonitorEvents(t *testing.T) {
	var got []string
	m := newMonitor(func(d *device, kind, table, detail string) {
		got = append(got, kind+":"+detail)
	})
	now := time.Unix(1000, 0)
	m.now = func() time.Time { return now }
	d := &device{name: "c"}
	info := func(hydrated uint64, stopped, mode string) target.Info {
		c := &target.CloneInfo{Regions: 100, HydratedRegions: hydrated, RegionSize: 1 << 20, Hydrated: hydrated == 100,
			HydrationStopped: stopped, Mode: mode}
		c.Stats.HydratedBackgroundBytes = int64(hydrated) << 20
		return target.Info{Type: "clone", Size: 100 << 20, Clone: c}
	}
	h := &handle{}
	steps := []struct {
		info target.Info
		want string
	}{
		{info(0, "", "rw"), ""},
		{info(10, "", "rw"), ""},
		{info(20, "source gone", "rw"), "hydration_stopped:source gone"},
		{info(20, "source gone", "rw"), ""},
		{info(20, "", "rw"), "hydration_resumed:was: source gone"},
		{info(60, "", "ro"), "mode_changed:ro (was rw)"},
		{info(100, "", "ro"), "hydrated:100 regions"},
		{info(100, "", "ro"), ""},
	}
	for i, s := range steps {
		got = nil
		m.observe(d, h, s.info)
		if strings.Join(got, ",") != s.want {
			t.Errorf("step %d: events %q, want %q", i, got, s.want)
		}
		now = now.Add(time.Second)
	}
	p, ok := m.progress(d)
	if !ok || !p.etaKnown || p.eta != 0 {
		t.Errorf("progress once hydrated: %+v %v", p, ok)
	}

	// A new table, complete from the start (nothing hydrated by it): no
	// event; one that completes by itself before the first look: one.
	h2 := &handle{}
	got = nil
	done := info(100, "", "rw")
	done.Clone.Stats = target.CloneStats{}
	m.observe(d, h2, done)
	if len(got) != 0 {
		t.Errorf("a table complete at load raised %q", got)
	}
	h3 := &handle{}
	m.observe(d, h3, info(100, "", "rw"))
	if strings.Join(got, ",") != "hydrated:100 regions" {
		t.Errorf("a table that completed before the first look raised %q", got)
	}

	// Rate and ETA: 10 MiB/s, 50 MiB left.
	h4 := &handle{}
	for i := range 6 {
		m.observe(d, h4, info(uint64(i*10), "", "rw"))
		now = now.Add(time.Second)
	}
	p, _ = m.progress(d)
	if p.rate != 10<<20 || !p.etaKnown || p.eta != 5 {
		t.Errorf("progress at 50%% and 10 MiB/s: %+v", p)
	}
	m.forget(d, h3) // not the one followed: kept
	if _, ok := m.progress(d); !ok {
		t.Error("forget of an old table dropped the current one")
	}
	m.forget(d, h4)
	if _, ok := m.progress(d); ok {
		t.Error("progress kept after forget")
	}
}
