package hydrate

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Planner is what the Sweeper needs from a clone: the bitmap, the region
// locks and the copy. Implementations are safe for concurrent use.
type Planner interface {
	NrRegions() uint64
	// Claim locks the first region at or after from that is neither
	// hydrated nor locked, plus up to max-1 contiguous followers that are
	// neither, and returns them. count is 0 when there is none before the
	// end of the device.
	Claim(from, max uint64) (start, count uint64)
	// Hydrate copies the claimed regions, marks them hydrated if and only
	// if the copy succeeded, and unlocks them in every case.
	Hydrate(ctx context.Context, start, count uint64) error
	// Busy reports whether user I/O is in flight.
	Busy() bool
	// CanHydrate reports whether there is anything to do and the metadata
	// can record it (mode rw, some region unhydrated).
	CanHydrate() bool
}

// Options configure a Sweeper.
type Options struct {
	Enabled   bool
	Threshold uint32 // regions in flight at most; 0 stops hydration
	BatchSize uint32 // contiguous regions per copy; 0 and 1 mean 1
	// MaxErrors consecutive failed batches stop the sweep (OnStop is
	// called); enable_hydration restarts it. 0 means 16.
	MaxErrors int
	// Backoff after a failed batch doubles from this up to MaxBackoff.
	Backoff, MaxBackoff time.Duration
	// BusyInterval: while user I/O is in flight dm-clone starts nothing;
	// we start at most one batch per BusyInterval so hydration cannot
	// starve under constant load. 0 means 1 s (dm-clone's waker period);
	// negative means dm-clone's strict rule.
	BusyInterval time.Duration
	Logger       *slog.Logger
	// OnStop is called (without locks held) when the sweep stops by itself.
	OnStop func(reason string)
}

func (o *Options) setDefaults() {
	if o.MaxErrors <= 0 {
		o.MaxErrors = 16
	}
	if o.Backoff <= 0 {
		o.Backoff = 100 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 10 * time.Second
	}
	if o.BusyInterval == 0 {
		o.BusyInterval = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Sweeper runs background hydration. It starts paused (a new target is
// suspended until its first resume).
type Sweeper struct {
	p    Planner
	opts Options
	log  *slog.Logger

	kick   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	loop   sync.WaitGroup
	copies sync.WaitGroup

	mu   sync.Mutex
	cond *sync.Cond // signalled when inFlight+reserved drops to 0; uses mu
	// The fields below are guarded by mu.
	enabled   bool
	paused    bool
	threshold uint32
	batchSize uint32
	stopped   string // why the sweep stopped by itself; "" while it may run
	inFlight  uint64 // regions being copied
	reserved  uint64 // regions a Claim in progress may take
	offset    uint64 // where the sweep resumes
	failures  int    // consecutive failed batches
	retryAt   time.Time
	lastBatch time.Time
}

// NewSweeper returns a paused sweeper; call Resume to start it.
func NewSweeper(p Planner, opts Options) *Sweeper {
	opts.setDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	s := &Sweeper{
		p: p, opts: opts, log: opts.Logger,
		kick: make(chan struct{}, 1), ctx: ctx, cancel: cancel,
		enabled: opts.Enabled, paused: true,
		threshold: opts.Threshold, batchSize: opts.BatchSize,
	}
	s.cond = sync.NewCond(&s.mu)
	s.loop.Add(1)
	go s.run()
	return s
}

// Kick wakes the sweeper: user I/O went idle, a region failed or finished,
// a setting changed.
func (s *Sweeper) Kick() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func (s *Sweeper) run() {
	defer s.loop.Done()
	timer := time.NewTimer(time.Second)
	defer timer.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.kick:
		case <-timer.C:
		}
		next := s.fill()
		timer.Reset(next)
	}
}

// fill starts batches until the threshold is reached or there is nothing to
// start, and returns how long to sleep at most before trying again.
func (s *Sweeper) fill() time.Duration {
	const period = time.Second // dm-clone's waker
	for {
		s.mu.Lock()
		if !s.enabled || s.paused || s.stopped != "" || s.threshold == 0 ||
			s.inFlight+s.reserved >= uint64(s.threshold) || s.ctx.Err() != nil {
			s.mu.Unlock()
			return period
		}
		now := time.Now()
		if now.Before(s.retryAt) {
			d := s.retryAt.Sub(now)
			s.mu.Unlock()
			return d
		}
		busy := s.p.Busy()
		if busy {
			if s.opts.BusyInterval < 0 {
				s.mu.Unlock()
				return period
			}
			if since := now.Sub(s.lastBatch); since < s.opts.BusyInterval {
				s.mu.Unlock()
				return s.opts.BusyInterval - since
			}
		}
		if !s.p.CanHydrate() {
			s.mu.Unlock()
			return period
		}
		want := min(uint64(max(s.batchSize, 1)), uint64(s.threshold)-s.inFlight-s.reserved)
		from := s.offset
		s.reserved += want
		s.mu.Unlock()

		start, count := s.p.Claim(from, want)
		if count == 0 && from > 0 {
			start, count = s.p.Claim(0, want) // wrap: retry earlier failures
		}

		s.mu.Lock()
		s.reserved -= want
		if count == 0 {
			s.signalIdleLocked()
			s.mu.Unlock()
			return period // everything hydrated or being copied
		}
		s.inFlight += count
		s.offset = start + count
		if s.offset >= s.p.NrRegions() {
			s.offset = 0
		}
		s.lastBatch = now
		s.copies.Add(1)
		s.mu.Unlock()
		go s.copy(start, count)
		if busy {
			return s.opts.BusyInterval
		}
	}
}

func (s *Sweeper) copy(start, count uint64) {
	defer s.copies.Done()
	err := s.p.Hydrate(s.ctx, start, count)
	var stopReason string
	s.mu.Lock()
	s.inFlight -= count
	if err != nil && s.ctx.Err() == nil {
		s.failures++
		backoff := s.opts.Backoff << min(s.failures-1, 20)
		s.retryAt = time.Now().Add(min(backoff, s.opts.MaxBackoff))
		s.log.Warn("hydration copy failed", "regions", fmt.Sprintf("%d+%d", start, count),
			"consecutive_failures", s.failures, "retry_in", min(backoff, s.opts.MaxBackoff), "err", err)
		if s.failures >= s.opts.MaxErrors && s.stopped == "" {
			s.stopped = fmt.Sprintf("%d consecutive copy failures, last: %v", s.failures, err)
			stopReason = s.stopped
		}
	} else if err == nil {
		s.failures = 0
	}
	s.signalIdleLocked()
	s.mu.Unlock()
	if stopReason != "" {
		s.log.Error("background hydration stopped", "reason", stopReason)
		if s.opts.OnStop != nil {
			s.opts.OnStop(stopReason)
		}
	}
	s.Kick()
}

func (s *Sweeper) signalIdleLocked() {
	if s.inFlight+s.reserved == 0 {
		s.cond.Broadcast()
	}
}

// Pause stops new copies and waits for those in flight to finish.
func (s *Sweeper) Pause() {
	s.mu.Lock()
	s.paused = true
	for s.inFlight+s.reserved > 0 {
		s.cond.Wait()
	}
	s.mu.Unlock()
}

// Resume lets copies start again.
func (s *Sweeper) Resume() {
	s.mu.Lock()
	s.paused = false
	s.mu.Unlock()
	s.Kick()
}

// SetEnabled is enable_hydration / disable_hydration. Enabling also
// restarts a sweep that stopped on errors.
func (s *Sweeper) SetEnabled(on bool) {
	s.mu.Lock()
	s.enabled = on
	if on {
		s.stopped = ""
		s.failures = 0
		s.retryAt = time.Time{}
	}
	s.mu.Unlock()
	s.Kick()
}

// SetThreshold is the hydration_threshold message.
func (s *Sweeper) SetThreshold(n uint32) {
	s.mu.Lock()
	s.threshold = n
	s.mu.Unlock()
	s.Kick()
}

// SetBatchSize is the hydration_batch_size message.
func (s *Sweeper) SetBatchSize(n uint32) {
	s.mu.Lock()
	s.batchSize = n
	s.mu.Unlock()
}

// State is a snapshot of the sweeper's settings and progress.
type State struct {
	Enabled   bool
	Threshold uint32
	BatchSize uint32
	InFlight  uint64
	Stopped   string
}

// State returns a snapshot.
func (s *Sweeper) State() State {
	s.mu.Lock()
	defer s.mu.Unlock()
	return State{Enabled: s.enabled, Threshold: s.threshold, BatchSize: s.batchSize, InFlight: s.inFlight, Stopped: s.stopped}
}

// Close stops the sweeper: copies in flight see a cancelled context
// (between chunks) and nothing new starts. It waits for every goroutine.
// Idempotent.
func (s *Sweeper) Close() {
	s.cancel()
	s.loop.Wait()
	s.copies.Wait()
}
