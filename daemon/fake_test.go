package daemon

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/nbdclone/nbdclone/target"
)

// fakeTarget is an in-memory target. I/O on it while it is suspended or
// closed fails, so a test sees any I/O that slipped past the gate.
type fakeTarget struct {
	f                         *fakeFactory
	table                     target.Table
	size                      int64
	md                        string // clone tables: the metadata store it holds
	suspends, resumes, closes atomic.Int32
	ioDone                    atomic.Int64
	resumeErr                 error

	mu sync.Mutex
	// Guarded by mu.
	// hold, when set, blocks every I/O until it is closed; entered
	// receives one value per I/O that started (see setHold).
	hold        chan struct{}
	entered     chan struct{}
	data        []byte
	running     bool
	closed      bool
	clone       target.CloneInfo
	events      chan struct{}
	badIO       []string // I/O that reached a suspended or closed target
	messages    [][]string
	statusOps   int
	eventsReads int
}

func (t *fakeTarget) setHold(hold, entered chan struct{}) {
	t.mu.Lock()
	t.hold, t.entered = hold, entered
	t.mu.Unlock()
}

func (t *fakeTarget) io(ctx context.Context, what string, fn func()) error {
	t.mu.Lock()
	hold, entered := t.hold, t.entered
	t.mu.Unlock()
	if entered != nil {
		select {
		case entered <- struct{}{}:
		default:
		}
	}
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed || !t.running {
		t.badIO = append(t.badIO, what)
		if t.closed {
			return target.ErrClosed
		}
		return target.ErrSuspended
	}
	if fn != nil {
		fn()
	}
	t.ioDone.Add(1)
	return nil
}

func (t *fakeTarget) Size() int64 { return t.size }
func (t *fakeTarget) ReadAt(ctx context.Context, p []byte, off int64) error {
	return t.io(ctx, "read", func() { copy(p, t.data[off:]) })
}
func (t *fakeTarget) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return t.io(ctx, "write", func() { copy(t.data[off:], p) })
}
func (t *fakeTarget) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	return t.io(ctx, "zero", func() { clear(t.data[off : off+n]) })
}
func (t *fakeTarget) Trim(ctx context.Context, off, n int64) error {
	return t.io(ctx, "trim", nil)
}
func (t *fakeTarget) Flush(ctx context.Context) error { return t.io(ctx, "flush", nil) }
func (t *fakeTarget) Cache(ctx context.Context, off, n int64) error {
	return t.io(ctx, "cache", nil)
}

func (t *fakeTarget) Status() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.statusOps++
	if t.table.Type == "clone" {
		return fmt.Sprintf("8 1/2 8 %d/%d 0 0 4 hydration_threshold 1 hydration_batch_size 1 %s",
			t.clone.HydratedRegions, t.clone.Regions, t.clone.Mode)
	}
	return ""
}

func (t *fakeTarget) Table() string { return strings.Join(t.table.Args, " ") }

func (t *fakeTarget) Message(_ context.Context, args []string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if args[0] != "ok" {
		return &target.DMError{Msg: "Unsupported message"}
	}
	t.messages = append(t.messages, args)
	return nil
}

func (t *fakeTarget) Info() target.Info {
	t.mu.Lock()
	defer t.mu.Unlock()
	info := target.Info{Type: t.table.Type, Size: t.size}
	if t.table.Type == "clone" {
		c := t.clone
		info.Clone = &c
	}
	return info
}

// setClone changes the clone info and raises an event.
func (t *fakeTarget) setClone(fn func(*target.CloneInfo)) {
	t.mu.Lock()
	fn(&t.clone)
	ev := t.events
	t.events = make(chan struct{})
	t.mu.Unlock()
	close(ev)
}

func (t *fakeTarget) Suspend(context.Context) error {
	t.suspends.Add(1)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.running = false
	return nil
}

func (t *fakeTarget) Resume() error {
	t.resumes.Add(1)
	if t.resumeErr != nil {
		return t.resumeErr
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return target.ErrClosed
	}
	t.running = true
	return nil
}

func (t *fakeTarget) Events() <-chan struct{} {
	fromWait := calledFrom(".(*registry).wait")
	t.mu.Lock()
	defer t.mu.Unlock()
	if fromWait {
		// Only a waiter counts: every live clone's watcher (monitor.go)
		// reads Events too.
		t.eventsReads++
	}
	return t.events
}

// calledFrom reports whether a function whose name ends in suffix is on
// the caller's stack.
func calledFrom(suffix string) bool {
	pcs := make([]uintptr, 32)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(2, pcs)])
	for {
		f, more := frames.Next()
		if strings.HasSuffix(f.Function, suffix) {
			return true
		}
		if !more {
			return false
		}
	}
}

// eventsRead reports whether a waiter (registry.wait) has asked for Events.
func (t *fakeTarget) eventsRead() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.eventsReads > 0
}

func (t *fakeTarget) Close() error {
	t.closes.Add(1)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	t.running = false
	if t.md != "" {
		t.f.mu.Lock()
		delete(t.f.mdOpen, t.md)
		t.f.mu.Unlock()
	}
	return nil
}

func (t *fakeTarget) violations() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.badIO...)
}

// fakeFactory builds fakeTargets for "fake" and "clone" tables. A clone
// holds its metadata store (args[0], resolved) locked until Close, as the
// real one does, so building a second clone on it fails. An argument
// "fail" makes the build fail; after failBuilds[table] more builds fail.
type fakeFactory struct {
	mu sync.Mutex
	// Guarded by mu.
	built   []*fakeTarget
	mdOpen  map[string]bool
	failing map[string]int // table string → builds left to fail
	setup   func(*fakeTarget)
}

func newFakeFactory() *fakeFactory {
	return &fakeFactory{mdOpen: map[string]bool{}, failing: map[string]int{}}
}

func (f *fakeFactory) build(_ context.Context, tbl target.Table, env target.Env) (target.Target, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n := f.failing[tbl.String()]; n > 0 {
		f.failing[tbl.String()] = n - 1
		return nil, &target.DMError{Msg: "Failed to load metadata", Err: errors.New("injected")}
	}
	for _, a := range tbl.Args {
		if a == "fail" {
			return nil, &target.DMError{Msg: "Region size is not a power of 2"}
		}
	}
	t := &fakeTarget{f: f, table: tbl, size: tbl.Bytes(), data: make([]byte, tbl.Bytes()), events: make(chan struct{})}
	switch tbl.Type {
	case "fake":
	case "clone":
		if len(tbl.Args) < 1 {
			return nil, &target.DMError{Msg: "Invalid number of arguments"}
		}
		md := env.Path(tbl.Args[0])
		if f.mdOpen[md] {
			return nil, &target.DMError{Msg: "Error opening metadata device", Err: errors.New("store locked")}
		}
		f.mdOpen[md] = true
		t.md = md
		t.clone = target.CloneInfo{Metadata: md, RegionSize: 4096, Regions: uint64((tbl.Bytes() + 4095) / 4096), Mode: "rw"}
	default:
		return nil, &target.DMError{Msg: fmt.Sprintf("unknown target type %q", tbl.Type)}
	}
	if f.setup != nil {
		f.setup(t)
	}
	f.built = append(f.built, t)
	return t, nil
}

// last returns the most recently built target.
func (f *fakeFactory) last() *fakeTarget {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.built[len(f.built)-1]
}

func (f *fakeFactory) all() []*fakeTarget {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*fakeTarget(nil), f.built...)
}

func (f *fakeFactory) failNext(table string, n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failing[table] = n
}
