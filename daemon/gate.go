package daemon

import (
	"context"
	"sync"
)

// gate holds a device's NBD I/O back while it is suspended, so a table swap
// is invisible to clients: I/O that arrives while the gate is closed waits
// (it is not failed) until the gate opens again.
type gate struct {
	mu sync.Mutex
	// Guarded by mu.
	closed bool
	// failErr, when set, fails every entry instead (a removed device, a
	// daemon shutting down, a device left without a target).
	failErr error
	// opened is closed when the gate opens or fails; a new one is made
	// each time the gate closes.
	opened   chan struct{}
	inflight int
	// drained is closed when inflight reaches zero; nil unless someone
	// waits for that.
	drained chan struct{}
}

func newGate() *gate {
	g := &gate{opened: make(chan struct{})}
	close(g.opened)
	return g
}

// enter admits one I/O, waiting while the gate is closed. Every successful
// enter must be paired with leave.
func (g *gate) enter(ctx context.Context) error {
	for {
		g.mu.Lock()
		if g.failErr != nil {
			err := g.failErr
			g.mu.Unlock()
			return err
		}
		if !g.closed {
			g.inflight++
			g.mu.Unlock()
			return nil
		}
		opened := g.opened
		g.mu.Unlock()
		select {
		case <-opened:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (g *gate) leave() {
	g.mu.Lock()
	g.inflight--
	if g.inflight == 0 && g.drained != nil {
		close(g.drained)
		g.drained = nil
	}
	g.mu.Unlock()
}

// close stops admitting I/O and waits until the I/O in flight has left. If
// ctx ends first, the gate is reopened and the number of requests still in
// flight is returned with ctx's error.
func (g *gate) close(ctx context.Context) (inflight int, err error) {
	g.mu.Lock()
	if !g.closed && g.failErr == nil {
		g.closed = true
		g.opened = make(chan struct{})
	}
	g.mu.Unlock()
	if n, err := g.drain(ctx); err != nil {
		g.open()
		return n, err
	}
	return 0, nil
}

// drain waits until no I/O is in flight.
func (g *gate) drain(ctx context.Context) (inflight int, err error) {
	g.mu.Lock()
	if g.inflight == 0 {
		g.mu.Unlock()
		return 0, nil
	}
	if g.drained == nil {
		g.drained = make(chan struct{})
	}
	drained := g.drained
	g.mu.Unlock()
	select {
	case <-drained:
		return 0, nil
	case <-ctx.Done():
		g.mu.Lock()
		n := g.inflight
		g.mu.Unlock()
		return n, ctx.Err()
	}
}

// open admits I/O again, waking everything that waits, and clears a failure.
func (g *gate) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failErr = nil
	if g.closed {
		g.closed = false
		close(g.opened)
	}
}

// fail makes every entry, waiting or future, return err until open.
func (g *gate) fail(err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failErr = err
	if g.closed {
		g.closed = false
		close(g.opened)
	}
}

// isClosed reports whether I/O is held back.
func (g *gate) isClosed() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closed
}

// inFlight is the number of I/O requests admitted and not yet left.
func (g *gate) inFlight() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.inflight
}
