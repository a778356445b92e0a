package target

import "sync"

// syncGroup coalesces concurrent flushes: a caller needs one run of fn that
// starts after it arrived; callers arriving while a run is in progress share
// the next run. Many FLUSH requests from many connections cost one commit.
type syncGroup struct {
	mu   sync.Mutex
	cond *sync.Cond
	// guarded by mu:
	running  bool
	started  uint64 // generation of the latest run started
	finished uint64 // generation of the latest run finished
	lastErr  error  // result of the run that finished last
}

func newSyncGroup() *syncGroup {
	g := &syncGroup{}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// do returns the result of a run of fn that started after the call began.
func (g *syncGroup) do(fn func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	need := g.started + 1
	for g.finished < need {
		if g.running {
			g.cond.Wait()
			continue
		}
		g.running = true
		g.started++
		gen := g.started
		g.mu.Unlock()
		err := fn()
		g.mu.Lock()
		g.running = false
		g.finished = gen
		g.lastErr = err
		g.cond.Broadcast()
	}
	return g.lastErr
}
