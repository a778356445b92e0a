package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestEventBusSlowSubscriber: a subscriber that never reads does not hold
// up publishing (nor a fast subscriber); what did not fit in its buffer is
// dropped and reported as one EventLost exactly at the gap, as soon as it
// makes room.
func TestEventBusSlowSubscriber(t *testing.T) {
	const n = 1000
	b := newEventBus(slog.New(slog.DiscardHandler), nil)
	slow := b.subscribe("", 4)
	fast := b.subscribe("", 2*n)     // room for all: it never loses one
	other := b.subscribe("other", 4) // another device's: sees nothing of "d"

	got := make(chan []Event)
	go func() {
		var evs []Event
		for ev := range fast.C() {
			evs = append(evs, ev)
		}
		got <- evs
	}()
	published := make(chan struct{})
	go func() {
		for i := range n {
			b.publish(Event{Kind: EventResumed, Device: "d", Detail: fmt.Sprint(i)})
		}
		close(published)
	}()
	select {
	case <-published:
	case <-time.After(30 * time.Second):
		t.Fatal("publish blocked on a subscriber that does not read")
	}

	// The slow one kept the first 4; 996 were dropped.
	for i := range 2 {
		if ev := <-slow.C(); ev.Detail != fmt.Sprint(i) || ev.Seq != uint64(i+1) {
			t.Fatalf("slow subscriber event %d: %+v", i, ev)
		}
	}
	b.publish(Event{Kind: EventSuspended, Device: "d", Detail: "after"})
	var rest []Event
	for range 4 {
		rest = append(rest, <-slow.C())
	}
	if rest[0].Detail != "2" || rest[1].Detail != "3" {
		t.Errorf("slow subscriber: %+v", rest[:2])
	}
	if lost := rest[2]; lost.Kind != EventLost || lost.Lost != n-4 || !strings.HasSuffix(lost.String(), fmt.Sprintf(" lost %d events: this reader fell too far behind", n-4)) {
		t.Errorf("at the gap: %+v, want an EventLost of %d", lost, n-4)
	}
	if last := rest[3]; last.Detail != "after" || last.Seq != n+1 {
		t.Errorf("after the gap: %+v", last)
	}
	if l := b.unsubscribe(slow); l != 0 {
		t.Errorf("unreported losses %d", l)
	}

	b.unsubscribe(fast)
	evs := <-got
	if len(evs) != n+1 {
		t.Fatalf("fast subscriber got %d events, want %d", len(evs), n+1)
	}
	for i, ev := range evs {
		if ev.Seq != uint64(i+1) || ev.Kind == EventLost {
			t.Fatalf("fast subscriber event %d: %+v", i, ev)
		}
	}
	if len(other.C()) != 0 {
		t.Errorf("a subscriber of another device got %d events", len(other.C()))
	}
	st := b.snapshot()
	if st.lost != n-4 || st.subscribers != 1 {
		t.Errorf("bus stats: %d lost, %d subscribers; want %d, 1", st.lost, st.subscribers, n-4)
	}
	counts := map[string]uint64{}
	for _, c := range st.counts {
		counts[c.kind] = c.count
	}
	if counts[EventResumed] != n || counts[EventSuspended] != 1 || counts[EventCreated] != 0 {
		t.Errorf("counts %v", counts)
	}
	if _, ok := counts[EventLost]; ok {
		t.Error("EventLost is counted as raised")
	}
}

// TestEventStream: `nbdclone events` over the control socket sees a
// clone's life in order: create, hydration complete, suspend/resume, a
// table swap, remove; a device filter sees only its device; the
// --on-event command is fed from the same events.
func TestEventStream(t *testing.T) {
	dir := t.TempDir()
	cloneFiles(t, dir)
	if err := os.WriteFile(filepath.Join(dir, "dest2.img"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	hook := filepath.Join(dir, "hook")
	td := startDaemon(t, filepath.Join(t.TempDir(), "state"), nil, func(c *Config) {
		c.OnEvent = `echo "$NBDCLONE_EVENT $NBDCLONE_DEVICE" >>` + hook
	})
	c := dial(t, td.control)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	all, err := c.Events(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	defer all.Close()
	onlyC, err := c.Events(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	defer onlyC.Close()

	if _, err := c.Create(ctx, "other", "0 2048 clone md2 dest2.img src.img 8 1 no_hydration", dir); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Create(ctx, "c", "0 2048 clone md dest.img src.img 8", dir); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	next := func(s *EventStream) Event {
		t.Helper()
		ev, err := s.Next()
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	// The hydrated event is raised by the watcher; wait for it before
	// going on, so the order below is fixed.
	want := []string{"created other", "created c", "hydrated c"}
	var seen []string
	for len(seen) < len(want) {
		ev := next(all)
		seen = append(seen, ev.Kind+" "+ev.Device)
	}
	if strings.Join(seen, ",") != strings.Join(want, ",") {
		t.Fatalf("events %q, want %q", seen, want)
	}
	for _, step := range []func() error{
		func() error { return c.Suspend(ctx, "c", 0) },
		func() error { return c.Resume(ctx, "c") },
		func() error { return c.Load(ctx, "c", "0 2048 linear dest.img 0", dir) },
		func() error { return c.Resume(ctx, "c") },
		func() error { return c.Remove(ctx, "c", false) },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	// A swap suspends first; so does remove (it commits what was
	// acknowledged).
	want = []string{"suspended", "resumed", "loaded", "suspended", "swapped", "resumed", "suspended", "removed"}
	seen = nil
	for len(seen) < len(want) {
		ev := next(all)
		if ev.Device != "c" {
			t.Fatalf("unexpected event %+v", ev)
		}
		seen = append(seen, ev.Kind)
		if ev.Kind == EventSwapped && ev.Table != "0 2048 linear "+filepath.Join(dir, "dest.img")+" 0" {
			t.Errorf("swapped event's table %q", ev.Table)
		}
	}
	if strings.Join(seen, ",") != strings.Join(want, ",") {
		t.Errorf("events %q, want %q", seen, want)
	}
	// The filtered stream: c's events only, the same sequence numbers.
	want = append([]string{"created", "hydrated"}, want...)
	seen = nil
	var lastSeq uint64
	for len(seen) < len(want) {
		ev := next(onlyC)
		if ev.Device != "c" || ev.Seq <= lastSeq {
			t.Fatalf("filtered stream: %+v after seq %d", ev, lastSeq)
		}
		lastSeq = ev.Seq
		seen = append(seen, ev.Kind)
	}
	if strings.Join(seen, ",") != strings.Join(want, ",") {
		t.Errorf("filtered events %q, want %q", seen, want)
	}
	// The hook ran for c's events too, in order.
	waitUntil(t, func() bool { return strings.Contains(readString(hook), "removed c") })
	var hooked []string
	for _, l := range strings.Split(strings.TrimSpace(readString(hook)), "\n") {
		if strings.HasSuffix(l, " c") {
			hooked = append(hooked, strings.TrimSuffix(l, " c"))
		}
	}
	if strings.Join(hooked, ",") != strings.Join(want, ",") {
		t.Errorf("--on-event saw %q, want %q", hooked, want)
	}
}

func readString(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// TestEventStreamSlowReader: a stream client that stops reading holds up
// neither the daemon nor other streams; when it reads again, every gap in
// the sequence numbers is announced by an EventLost of exactly its size.
func TestEventStreamSlowReader(t *testing.T) {
	td := startDaemon(t, filepath.Join(t.TempDir(), "state"), nil, nil)
	c := dial(t, td.control)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	slow, err := c.Events(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	// Big events fill the buffer and the socket quickly.
	const n = 5000
	detail := strings.Repeat("x", 4096)
	published := make(chan struct{})
	go func() {
		for range n {
			td.bus.publish(Event{Kind: EventResumed, Device: "d", Detail: detail})
		}
		close(published)
	}()
	select {
	case <-published:
	case <-time.After(time.Minute):
		t.Fatal("publishing blocked on a stream that is not read")
	}
	// Until the reader catches up, markers are published; the first one
	// it sees ends the check.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
				td.bus.publish(Event{Kind: EventSuspended, Device: "d", Detail: "end"})
			}
		}
	}()
	var prev uint64
	var pendingLost uint64
	delivered, lost := 0, uint64(0)
	for {
		ev, err := slow.Next()
		if err != nil {
			t.Fatal(err)
		}
		if ev.Kind == EventLost {
			if pendingLost != 0 {
				t.Fatalf("two lost markers in a row")
			}
			pendingLost = ev.Lost
			lost += ev.Lost
			continue
		}
		if gap := ev.Seq - prev - 1; gap != pendingLost {
			t.Fatalf("event %d after %d: a gap of %d, announced %d lost", ev.Seq, prev, gap, pendingLost)
		}
		pendingLost = 0
		prev = ev.Seq
		if ev.Detail == "end" {
			break
		}
		delivered++
	}
	if lost == 0 || delivered == 0 {
		t.Errorf("%d delivered, %d lost: the reader was not slow enough to lose any", delivered, lost)
	}
	t.Logf("%d delivered, %d lost", delivered, lost)
}
