package daemon

import (
	"fmt"
	"sync"
	"time"

	"github.com/nbdclone/nbdclone/internal/rate"
	"github.com/nbdclone/nbdclone/target"
)

// monitor follows every live clone through the snapshots its watcher
// (autolinear.go) takes each second and at each target event: it raises
// the hydration events by comparing them (complete, stopped on errors,
// running again, metadata mode) and keeps the rate estimator behind the
// rate and ETA metrics, the same estimator the progress bar uses.
type monitor struct {
	emit func(d *device, kind, table, detail string)
	now  func() time.Time

	mu sync.Mutex
	// Guarded by mu.
	devs map[*device]*devProgress
}

// devProgress is what the monitor knows of one device's live clone.
type devProgress struct {
	h        *handle // the live table it follows
	hydrated bool    // complete (and reported, or complete at load)
	stopped  string  // why hydration stopped; "" while it may run
	mode     string
	est      *rate.Estimator
	// Latest estimate.
	rate      float64       // bytes/s, -1 unknown
	eta       time.Duration // valid when etaKnown
	etaKnown  bool
	remaining int64
}

func newMonitor(emit func(d *device, kind, table, detail string)) *monitor {
	return &monitor{emit: emit, now: time.Now, devs: map[*device]*devProgress{}}
}

// hydratedBytes is how much of the device is hydrated, as the progress bar
// counts it.
func hydratedBytes(info target.Info) int64 {
	c := info.Clone
	if c == nil {
		return info.Size
	}
	return min(int64(c.HydratedRegions)*c.RegionSize, info.Size)
}

// madeHydrated is what this target hydrated in its life, by any cause.
func madeHydrated(s target.CloneStats) int64 {
	return s.HydratedBackgroundBytes + s.HydratedWriteBytes + s.HydratedOverwriteBytes +
		s.HydratedDiscardBytes + s.HydratedZeroBytes + s.HydratedCacheBytes + s.HydratedHintBytes +
		s.HydratedCommandBytes
}

// observe takes one snapshot of h, d's live clone, and raises what
// changed since the previous one.
func (m *monitor) observe(d *device, h *handle, info target.Info) {
	c := info.Clone
	if c == nil {
		return
	}
	type raised struct{ kind, detail string }
	var events []raised
	m.mu.Lock()
	p := m.devs[d]
	if p == nil || p.h != h {
		// A new table: what it is now is no event, except a completion it
		// reached by itself before this first look (a small clone).
		p = &devProgress{h: h, hydrated: c.Hydrated && madeHydrated(c.Stats) == 0, mode: c.Mode, est: rate.New(rate.Window)}
		m.devs[d] = p
	}
	if c.Hydrated && !p.hydrated {
		p.hydrated = true
		events = append(events, raised{EventHydrated, fmt.Sprintf("%d regions", c.Regions)})
	}
	if c.HydrationStopped != p.stopped {
		if c.HydrationStopped != "" {
			events = append(events, raised{EventHydrationStopped, c.HydrationStopped})
		} else {
			events = append(events, raised{EventHydrationResumed, "was: " + p.stopped})
		}
		p.stopped = c.HydrationStopped
	}
	if c.Mode != p.mode {
		events = append(events, raised{EventModeChanged, fmt.Sprintf("%s (was %s)", c.Mode, p.mode)})
		p.mode = c.Mode
	}
	p.addLocked(m.now(), info)
	m.mu.Unlock()
	for _, e := range events {
		m.emit(d, e.kind, h.table.String(), e.detail)
	}
}

// sample adds a progress sample of h (a scrape's), without looking for
// events; nothing when the monitor does not follow h (yet).
func (m *monitor) sample(d *device, h *handle, info target.Info) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p := m.devs[d]; p != nil && p.h == h && info.Clone != nil {
		p.addLocked(m.now(), info)
	}
}

func (p *devProgress) addLocked(now time.Time, info target.Info) {
	done := hydratedBytes(info)
	p.est.Add(now, done)
	p.rate = p.est.Rate()
	p.remaining = info.Size - done
	p.eta, p.etaKnown = p.est.ETA(p.remaining)
}

// forget drops d's progress if it still follows h.
func (m *monitor) forget(d *device, h *handle) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p := m.devs[d]; p != nil && p.h == h {
		delete(m.devs, d)
	}
}

// progressSample is the rate and ETA of one device for metrics.
type progressSample struct {
	rate     float64 // bytes/s; -1 unknown
	eta      float64 // seconds; valid when etaKnown
	etaKnown bool
}

func (m *monitor) progress(d *device) (progressSample, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.devs[d]
	if p == nil {
		return progressSample{}, false
	}
	return progressSample{rate: p.rate, eta: p.eta.Seconds(), etaKnown: p.etaKnown}, true
}
