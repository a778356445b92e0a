package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/nbdclone/nbdclone/target"
)

const (
	autoLinearRetryMin = time.Second
	autoLinearRetryMax = time.Minute
	eventQueue         = 64
	eventCmdTimeout    = time.Minute
	maxEventOutput     = 4 << 10
)

// autoLinear watches every live clone: it gives each snapshot to the
// monitor (hydration events, rate and ETA), and swaps an auto_linear clone to "linear <destination> 0" the moment it is
// hydrated, as suspend, load and resume would (NBD clients stay
// connected). A swap is deferred while the device is suspended or has a
// table loaded by hand (the user's swap wins), and retried with a backoff
// when it fails.
type autoLinear struct {
	log    *slog.Logger
	reg    *registry
	mon    *monitor
	goFunc func(func())
	now    func() time.Time

	mu sync.Mutex
	// Guarded by mu.
	ctx      context.Context // Run's; nil until started
	watching map[*device]*watch
}

// watch is the state of one device's watcher.
type watch struct {
	h          *handle       // the live clone it watches
	autoLinear bool          // h has the auto_linear feature
	settled    chan struct{} // closed when the watcher ends
	lastErr    error         // the last failed swap
}

func newAutoLinear(log *slog.Logger, reg *registry, mon *monitor, goFunc func(func())) *autoLinear {
	return &autoLinear{
		log: log.With("component", "auto_linear"), reg: reg, mon: mon,
		goFunc: goFunc, now: time.Now, watching: map[*device]*watch{},
	}
}

// start enables watchers; devices restored before it are watched now.
func (m *autoLinear) start(ctx context.Context) {
	m.mu.Lock()
	m.ctx = ctx
	m.mu.Unlock()
	for _, d := range m.reg.all() {
		m.live(d)
	}
}

// live is the registry hook: d has a new live table.
func (m *autoLinear) live(d *device) {
	h := d.tryAcquire()
	if h == nil {
		return
	}
	info := h.t.Info()
	h.release()
	if info.Clone == nil {
		return // nothing to watch: linear is always complete
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ctx == nil {
		return
	}
	if w := m.watching[d]; w != nil && w.h == h {
		return
	}
	w := &watch{h: h, autoLinear: info.Clone.AutoLinear, settled: make(chan struct{})}
	m.watching[d] = w
	ctx := m.ctx
	m.goFunc(func() {
		defer func() {
			m.mu.Lock()
			if m.watching[d] == w {
				delete(m.watching, d)
			}
			m.mu.Unlock()
			m.mon.forget(d, w.h)
			close(w.settled)
		}()
		m.run(ctx, d, w)
	})
}

// pending is the registry hook for wait: for an auto_linear clone, a
// channel closed when its swap to linear is over (the clone closed, the
// new table saved), and the last failure; nil for any other device.
func (m *autoLinear) pending(d *device) (<-chan struct{}, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	w := m.watching[d]
	if w == nil || !w.autoLinear {
		return nil, nil
	}
	return w.settled, w.lastErr
}

// run watches one live clone until it is no longer the live table.
func (m *autoLinear) run(ctx context.Context, d *device, w *watch) {
	backoff := time.Duration(0)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		var events <-chan struct{}
		switch h := d.tryAcquire(); {
		case h == nil:
			// A swap is under way or the device failed: look again soon.
		case h != w.h:
			h.release()
			return // another table took over
		default:
			events = h.t.Events()
			info := h.t.Info()
			h.release()
			m.mon.observe(d, w.h, info)
			if c := info.Clone; c.Hydrated && c.AutoLinear {
				done, err := m.swap(ctx, d, w.h)
				if done {
					return
				}
				if err != nil {
					m.mu.Lock()
					w.lastErr = err
					m.mu.Unlock()
					backoff = min(max(2*backoff, autoLinearRetryMin), autoLinearRetryMax)
					m.emit(d, EventAutoLinearFailed, w.h.table.String(), fmt.Sprintf("%v; retrying in %v", err, backoff))
					t := time.NewTimer(backoff)
					select {
					case <-t.C:
						continue
					case <-d.removed:
					case <-ctx.Done():
					}
					t.Stop()
					return
				}
			}
		}
		select {
		case <-events:
		case <-tick.C:
		case <-d.removed:
			return
		case <-ctx.Done():
			return
		}
	}
}

// swap makes h's device linear on its destination. done is true when the
// watcher has nothing left to do (swapped, or h is no longer live).
func (m *autoLinear) swap(ctx context.Context, d *device, h *handle) (done bool, err error) {
	unlock, err := d.lockOps(ctx)
	if err != nil {
		return errors.Is(err, ErrNotFound), nil
	}
	defer unlock()
	if d.liveOpsHeld() != h {
		return true, nil
	}
	d.mu.Lock()
	manual := d.inactive != nil
	d.mu.Unlock()
	if manual || d.isSuspended() {
		// The user is in the middle of a swap of their own (or holds the
		// device): theirs goes first; this is tried again on resume.
		return false, nil
	}
	info := h.t.Info()
	if info.Clone == nil || !info.Clone.Hydrated {
		return false, nil
	}
	tbl := linearOver(h.table, info.Clone.Destination)
	t, err := m.reg.build(ctx, tbl, m.reg.env(d.name, h.dir))
	if err != nil {
		return false, buildErr(err)
	}
	start := m.now()
	if err := m.reg.swapOpsHeld(ctx, d, &loaded{table: tbl, dir: h.dir, t: t}); err != nil {
		return d.liveOpsHeld() != h, err
	}
	m.log.Info("auto_linear: swapped to linear", "device", d.name, "table", tbl.String(), "pause", m.now().Sub(start))
	m.emit(d, EventLinear, tbl.String(), "hydration complete; the clone target is closed")
	return true, nil
}

// linearOver is the linear table of a clone's destination.
func linearOver(clone target.Table, dest string) target.Table {
	return target.Table{Start: clone.Start, Length: clone.Length, Type: "linear", Args: []string{dest, "0"}}
}

func (m *autoLinear) emit(d *device, kind, table, detail string) {
	m.reg.emitTable(d.name, kind, table, detail)
}

// checkLinearLoad refuses a linear table over a clone that is not fully
// hydrated, unless forced: its destination still has unhydrated regions,
// whose content is whatever was there (garbage to the user).
func checkLinearLoad(d *device, tbl target.Table, force bool) error {
	if force || tbl.Type != "linear" {
		return nil
	}
	h := d.liveOpsHeld()
	if h == nil {
		return nil
	}
	info := h.t.Info()
	c := info.Clone
	if c == nil || c.Hydrated {
		return nil
	}
	return newErr(ErrInvalid, "device %s is not fully hydrated (%d/%d regions): a linear table would expose the unhydrated regions of the destination; wait for hydration (nbdclone wait %s) or load with --force",
		d.name, c.HydratedRegions, c.Regions, d.name)
}

// eventRunner runs the --on-event command once per event (it is fed by
// the event bus, events.go), one at a time, with the event in its
// environment.
type eventRunner struct {
	log   *slog.Logger
	cmd   string // "" runs nothing
	queue chan Event
}

func newEventRunner(log *slog.Logger, cmd string) *eventRunner {
	return &eventRunner{log: log.With("component", "on-event"), cmd: cmd, queue: make(chan Event, eventQueue)}
}

func (e *eventRunner) enabled() bool { return e != nil && e.cmd != "" }

func (e *eventRunner) send(ev Event) {
	if e == nil || e.cmd == "" {
		return
	}
	select {
	case e.queue <- ev:
	default:
		e.log.Warn("event queue full; --on-event not run for this event", "event", ev.Kind, "device", ev.Device)
	}
}

// run executes queued events until ctx ends.
func (e *eventRunner) run(ctx context.Context) {
	if e.cmd == "" {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-e.queue:
			e.exec(ctx, ev)
		}
	}
}

func (e *eventRunner) exec(ctx context.Context, ev Event) {
	ctx, cancel := context.WithTimeout(ctx, eventCmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", e.cmd)
	cmd.Env = append(os.Environ(),
		"NBDCLONE_EVENT="+ev.Kind,
		"NBDCLONE_DEVICE="+ev.Device,
		"NBDCLONE_NBD="+ev.NBD,
		"NBDCLONE_TABLE="+ev.Table,
		"NBDCLONE_DETAIL="+ev.Detail,
	)
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	text := strings.TrimSpace(out.String())
	if len(text) > maxEventOutput {
		text = text[:maxEventOutput] + "…"
	}
	if err != nil {
		e.log.Warn("--on-event command failed", "event", ev.Kind, "device", ev.Device, "err", err, "output", text)
		return
	}
	e.log.Info("--on-event command ran", "event", ev.Kind, "device", ev.Device, "output", text)
}
