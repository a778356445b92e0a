package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"
)

// Events the daemon raises: logged, counted (nbdclone_events_total),
// streamed to `nbdclone events` subscribers and given to the --on-event
// command. The hydration events come from each clone's watcher
// (monitor.go), the others from the operations themselves.
const (
	EventCreated   = "created"   // a device was created
	EventRestored  = "restored"  // a device was rebuilt from the state directory at start
	EventRemoved   = "removed"   // a device was removed
	EventFailed    = "failed"    // a device lost its live table (I/O fails until a table is resumed)
	EventLoaded    = "loaded"    // a table was loaded (inactive until resume)
	EventSuspended = "suspended" // I/O is held, the target suspended (metadata committed)
	EventResumed   = "resumed"   // I/O flows again
	EventSwapped   = "swapped"   // a loaded table became the live one (at resume)
	EventAttached  = "attached"  // the device was attached to a /dev/nbdX
	EventDetached  = "detached"  // ... and detached from it

	// EventHydrated: a clone finished hydrating (every region hydrated
	// and committed).
	EventHydrated = "hydrated"
	// EventHydrationStopped: background hydration stopped (paused) on
	// errors, until enable_hydration or retry_hydration.
	EventHydrationStopped = "hydration_stopped"
	// EventHydrationResumed: it runs again after such a stop.
	EventHydrationResumed = "hydration_resumed"
	// EventModeChanged: the clone's metadata mode changed (rw, ro, Fail).
	EventModeChanged = "mode_changed"
	// EventLinear: an auto_linear clone was swapped to linear.
	EventLinear = "linear"
	// EventAutoLinearFailed: that swap failed; it is retried.
	EventAutoLinearFailed = "auto_linear_failed"

	// EventLost is never raised: a subscriber's stream carries it where
	// events were dropped because the subscriber read too slowly.
	EventLost = "lost"
)

// eventKinds lists the events raised, for the zero counters a scrape
// shows before any happened.
func eventKinds() []string {
	return []string{
		EventCreated, EventRestored, EventRemoved, EventFailed, EventLoaded,
		EventSuspended, EventResumed, EventSwapped, EventAttached, EventDetached,
		EventHydrated, EventHydrationStopped, EventHydrationResumed, EventModeChanged,
		EventLinear, EventAutoLinearFailed,
	}
}

// DefaultEventBuffer is how many events a subscriber may fall behind
// before events are dropped for it.
const DefaultEventBuffer = 256

// Event is one daemon event.
type Event struct {
	// Seq numbers the events of one daemon run from 1: a gap in what a
	// subscriber received is events it lost.
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Kind   string    `json:"type"`
	Device string    `json:"device"`
	NBD    string    `json:"nbd,omitempty"`   // the /dev/nbdX the device is attached to, if any
	Table  string    `json:"table,omitempty"` // the live table after the event
	Detail string    `json:"detail,omitempty"`
	// Lost is, for an EventLost, how many events were dropped.
	Lost uint64 `json:"lost,omitempty"`
}

// String is the event as `nbdclone events` prints it.
func (e Event) String() string {
	s := e.Time.Local().Format("2006-01-02T15:04:05.000") + " " + e.Kind
	if e.Kind == EventLost {
		return s + " " + e.Detail
	}
	if e.Device != "" {
		s += " " + e.Device
	}
	if e.NBD != "" {
		s += " nbd=" + e.NBD
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

// eventBus fans events out. publish never blocks: each subscriber has a
// bounded buffer, and what does not fit is dropped for that subscriber
// and reported to it as one EventLost at the gap.
type eventBus struct {
	log    *slog.Logger
	now    func() time.Time
	runner *eventRunner // the --on-event command; may be nil

	mu sync.Mutex
	// Guarded by mu.
	seq    uint64
	counts map[string]uint64
	subs   map[*subscription]struct{}
	lost   uint64 // events dropped for slow subscribers, over all of them
}

// subscription is one subscriber's stream.
type subscription struct {
	device string     // only this device's events; "" for all
	ch     chan Event // buffered; closed by unsubscribe
	lost   uint64     // dropped since the last EventLost; guarded by eventBus.mu
}

// C is the subscriber's stream.
func (s *subscription) C() <-chan Event { return s.ch }

func newEventBus(log *slog.Logger, runner *eventRunner) *eventBus {
	counts := map[string]uint64{}
	for _, k := range eventKinds() {
		counts[k] = 0
	}
	return &eventBus{log: log.With("component", "events"), now: time.Now, runner: runner,
		counts: counts, subs: map[*subscription]struct{}{}}
}

// publish logs ev, counts it and hands it to every subscriber and the
// --on-event command. It never blocks.
func (b *eventBus) publish(ev Event) {
	level := slog.LevelInfo
	switch ev.Kind {
	case EventFailed, EventHydrationStopped, EventAutoLinearFailed:
		level = slog.LevelWarn
	case EventModeChanged:
		if ev.Detail != "rw" {
			level = slog.LevelWarn
		}
	}
	b.mu.Lock()
	b.seq++
	ev.Seq = b.seq
	ev.Time = b.now()
	b.counts[ev.Kind]++
	for s := range b.subs {
		if s.device == "" || s.device == ev.Device {
			if !s.offerLocked(ev) {
				b.lost++
			}
		}
	}
	b.mu.Unlock()
	b.log.Log(context.Background(), level, "event", "event", ev.Kind, "device", ev.Device, "seq", ev.Seq,
		"nbd", ev.NBD, "table", ev.Table, "detail", ev.Detail)
	b.runner.send(ev)
}

// offerLocked queues ev without blocking, or reports it dropped; after a
// drop, an EventLost goes first as soon as there is room for it and ev.
func (s *subscription) offerLocked(ev Event) bool {
	if s.lost > 0 {
		if cap(s.ch)-len(s.ch) < 2 {
			s.lost++
			return false
		}
		s.ch <- Event{Seq: ev.Seq, Time: ev.Time, Kind: EventLost, Device: s.device, Lost: s.lost,
			Detail: fmt.Sprintf("%d events: this reader fell too far behind", s.lost)}
		s.lost = 0
	}
	select {
	case s.ch <- ev:
		return true
	default:
		s.lost++
		return false
	}
}

// subscribe opens a stream of the events of device ("" for every device)
// with room for buffer events (0: DefaultEventBuffer).
func (b *eventBus) subscribe(device string, buffer int) *subscription {
	if buffer <= 0 {
		buffer = DefaultEventBuffer
	}
	s := &subscription{device: device, ch: make(chan Event, max(buffer, 2))}
	b.mu.Lock()
	b.subs[s] = struct{}{}
	b.mu.Unlock()
	return s
}

// unsubscribe ends s: its channel is closed after what is queued. It
// returns how many events were dropped and not yet reported.
func (b *eventBus) unsubscribe(s *subscription) uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subs[s]; !ok {
		return 0
	}
	delete(b.subs, s)
	close(s.ch)
	return s.lost
}

// eventCount is one kind's count, for metrics.
type eventCount struct {
	kind  string
	count uint64
}

// busStats is the bus for metrics: events raised by kind, subscribers,
// events dropped for slow subscribers.
type busStats struct {
	counts      []eventCount
	subscribers int
	lost        uint64
}

func (b *eventBus) snapshot() busStats {
	b.mu.Lock()
	st := busStats{counts: make([]eventCount, 0, len(b.counts)), subscribers: len(b.subs), lost: b.lost}
	for k, n := range b.counts {
		st.counts = append(st.counts, eventCount{k, n})
	}
	b.mu.Unlock()
	sort.Slice(st.counts, func(i, j int) bool { return st.counts[i].kind < st.counts[j].kind })
	return st
}
