package daemon

import (
	"context"

	"github.com/nbdclone/nbdclone/nbdserver"
)

// registryHooks are the daemon's extensions to the registry's operations:
// /dev/nbdX attachments (attach.go) and auto_linear (autolinear.go). A
// registry without a daemon (unit tests) has none: every field may be nil.
type registryHooks struct {
	// live is told that a table became d's live table (create, restore,
	// resume of a loaded table).
	live func(d *device)
	// attached is the /dev/nbdX device name is attached to, or "".
	attached func(name string) string
	// removing runs before a remove takes the device away: it refuses
	// while the device is attached, or detaches it when forced.
	removing func(ctx context.Context, name string, force bool) error
	// autoLinearPending returns, for a hydrated auto_linear clone, a
	// channel closed when its swap to linear is over (nil: nothing is
	// pending), and the last failure of that swap.
	autoLinearPending func(d *device) (<-chan struct{}, error)
	// event publishes an event (events.go).
	event func(ev Event)
}

// emit raises an event of device d, with its live table.
func (r *registry) emit(d *device, kind, detail string) {
	d.mu.Lock()
	table := d.table.String()
	d.mu.Unlock()
	r.emitTable(d.name, kind, table, detail)
}

// emitTable raises an event of the device called name.
func (r *registry) emitTable(name, kind, table, detail string) {
	if r.hooks.event == nil {
		return
	}
	ev := Event{Kind: kind, Device: name, Table: table, Detail: detail}
	if r.hooks.attached != nil {
		ev.NBD = r.hooks.attached(name)
	}
	r.hooks.event(ev)
}

func (r *registry) tableLive(d *device) {
	if r.hooks.live != nil {
		r.hooks.live(d)
	}
}

// hookUp builds the daemon's extensions and plugs them into the registry.
func (d *Daemon) hookUp() {
	d.att = newAttacher(d.log, d.reg, d.cfg.StateDir)
	d.events = newEventRunner(d.log, d.cfg.OnEvent)
	d.bus = newEventBus(d.log, d.events)
	d.mon = newMonitor(func(dev *device, kind, table, detail string) { d.reg.emitTable(dev.name, kind, table, detail) })
	d.auto = newAutoLinear(d.log, d.reg, d.mon, d.goFunc)
	d.reg.hooks = registryHooks{
		live:              d.auto.live,
		attached:          d.att.attachedTo,
		removing:          d.att.removing,
		autoLinearPending: d.auto.pending,
		event: func(ev Event) {
			// Devices come, go and change tables with events: the
			// memory limit follows them.
			d.mem.update(d.reg.all())
			d.bus.publish(ev)
		},
	}
	d.collector.bus, d.collector.mon = d.bus, d.mon
}

// startHooks runs once the devices are restored, before the daemon is
// ready: attachments are served and reconnected, events and auto_linear
// swaps start (a clone that finished while the daemon was down is swapped
// now).
func (d *Daemon) startHooks(ctx, nbdCtx context.Context) {
	// In-process socket pairs: trusted, never asked for TLS.
	plain := nbdserver.TLSOff
	d.goFunc(func() { d.srv.ServeListener(nbdCtx, d.att.listener, nbdserver.ListenerOptions{TLS: &plain}) })
	d.goFunc(func() { d.events.run(ctx) })
	d.att.restore(ctx)
	d.auto.start(ctx)
}
