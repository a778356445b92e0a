package hydrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/nbdclone/nbdclone/blockdev"
)

// Cause says why regions are copied.
type Cause int

const (
	// CauseBackground: the linear background sweep.
	CauseBackground Cause = iota
	// CauseHint: a user read of an unhydrated region asked for it (reads
	// as hints, dm-clone known issue 1).
	CauseHint
)

// busyRecheck is how often a held-back sweep looks whether the device
// became idle: busy can end without a kick (a planner may count a device
// busy for a while after its last request).
const busyRecheck = 10 * time.Millisecond

// Planner is what the Sweeper needs from a clone: the bitmap, the region
// locks and the copy. Implementations are safe for concurrent use.
type Planner interface {
	NrRegions() uint64
	// Claim locks the first region in [from, limit) that is neither
	// hydrated nor locked, plus up to max-1 contiguous followers (which may
	// lie past limit) that are neither, and returns them. count is 0 when
	// there is none.
	Claim(from, limit, max uint64) (start, count uint64)
	// Hydrate copies the claimed regions and marks them hydrated if and
	// only if the copy succeeded. They stay locked until Release.
	Hydrate(ctx context.Context, start, count uint64, cause Cause) error
	// Release unlocks claimed regions once the sweeper has recorded what
	// their copy did, so a failed region is not claimed again before its
	// failure counts (and stops the sweep when it is one too many).
	Release(start, count uint64)
	// Busy reports whether user I/O is in flight (or, for a clone, was
	// moments ago).
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
	// RegionSize in bytes; needed by WindowBytes, MinBatchBytes and Rate.
	RegionSize int64
	// WindowBytes, for a remote source, is the floor of bytes in flight:
	// the threshold counts at least WindowBytes/RegionSize regions (never
	// when the threshold is 0). 0 keeps dm-clone's semantics.
	WindowBytes int64
	// MinBatchBytes, for a remote source, is the floor of a batch's bytes:
	// the batch size counts at least MinBatchBytes/RegionSize regions.
	MinBatchBytes int64
	// Rate limits background and hinted copies to this many bytes per
	// second (a token bucket); 0 means no limit.
	Rate int64
	// MaxErrors consecutive failed batches stop the sweep (OnStop is
	// called); enable_hydration or retry_hydration restarts it. Batches
	// that were in flight together when one failed count once. 0 means 16.
	MaxErrors int
	// MaxRegionErrors consecutive failed copies of one region stop the
	// sweep too. 0 means 8.
	MaxRegionErrors int
	// Backoff after a failed batch doubles from this up to MaxBackoff.
	Backoff, MaxBackoff time.Duration
	// BusyInterval: while user I/O is in flight dm-clone starts nothing;
	// we start at most one batch per BusyInterval so hydration cannot
	// starve under constant load. 0 means 1 s (dm-clone's waker period);
	// negative means dm-clone's strict rule. Hinted regions are not held
	// back by user I/O: a user is waiting for them.
	BusyInterval time.Duration
	// MaxHints bounds the queue of hinted ranges (oldest dropped first).
	// 0 means 4096.
	MaxHints int
	Logger   *slog.Logger
	// OnStop is called (without locks held) when the sweep stops by itself.
	OnStop func(reason string)
}

func (o *Options) setDefaults() {
	if o.MaxErrors <= 0 {
		o.MaxErrors = 16
	}
	if o.MaxRegionErrors <= 0 {
		o.MaxRegionErrors = 8
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
	if o.MaxHints <= 0 {
		o.MaxHints = 4096
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// maxTrackedRegions bounds the per-region failure counts kept at once.
const maxTrackedRegions = 1 << 16

// hintRange is a queued run of hinted regions [start, end).
type hintRange struct{ start, end uint64 }

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
	rate      int64
	limiter   *rate.Limiter // nil without a rate
	rateAt    time.Time     // no batch starts before (token bucket debt)
	stopped   string        // why the sweep stopped by itself; "" while it may run
	inFlight  uint64        // regions being copied
	reserved  uint64        // regions a Claim in progress may take
	offset    uint64        // where the sweep resumes
	failures  int           // consecutive failed batches
	failGen   uint64        // bumped at each counted failure
	regionErr map[uint64]int
	retryAt   time.Time
	lastBatch time.Time
	hints     []hintRange
	// busy: the last background batch considered found user I/O in
	// flight (it is held back to one batch per BusyInterval).
	busy bool
	// retries counts failed batches whose regions are retried later.
	retries uint64
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
		regionErr: map[uint64]int{},
	}
	s.setRateLocked(opts.Rate)
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

// regionsFor is the number of regions that make up bytes, at least 1.
func (s *Sweeper) regionsFor(bytes int64) uint64 {
	if s.opts.RegionSize <= 0 || bytes <= 0 {
		return 1
	}
	return uint64(max(1, (bytes+s.opts.RegionSize-1)/s.opts.RegionSize))
}

// rateCapLocked is how many regions a quarter second of the rate allows:
// the floors of a remote source never make bursts bigger than that.
func (s *Sweeper) rateCapLocked() uint64 {
	if s.rate <= 0 {
		return ^uint64(0)
	}
	return s.regionsFor(s.rate / 4)
}

// thresholdLocked is the threshold in force: the user's, raised to the
// window of a remote source (never from 0).
func (s *Sweeper) thresholdLocked() uint64 {
	t := uint64(s.threshold)
	if t == 0 || s.opts.WindowBytes <= 0 {
		return t
	}
	return max(t, min(s.regionsFor(s.opts.WindowBytes), s.rateCapLocked()))
}

// batchLocked is the batch size in force.
func (s *Sweeper) batchLocked() uint64 {
	b := uint64(max(s.batchSize, 1))
	if s.opts.MinBatchBytes <= 0 {
		return b
	}
	return max(b, min(s.regionsFor(s.opts.MinBatchBytes), s.rateCapLocked()))
}

// fill starts batches until the threshold is reached or there is nothing to
// start, and returns how long to sleep at most before trying again.
func (s *Sweeper) fill() time.Duration {
	const period = time.Second // dm-clone's waker
	for {
		s.mu.Lock()
		threshold := s.thresholdLocked()
		if !s.enabled || s.paused || s.stopped != "" || threshold == 0 ||
			s.inFlight+s.reserved >= threshold || s.ctx.Err() != nil {
			s.mu.Unlock()
			return period
		}
		now := time.Now()
		if now.Before(s.retryAt) {
			d := s.retryAt.Sub(now)
			s.mu.Unlock()
			return d
		}
		if now.Before(s.rateAt) {
			d := s.rateAt.Sub(now)
			s.mu.Unlock()
			return d
		}
		if !s.p.CanHydrate() {
			s.hints = nil
			s.mu.Unlock()
			return period
		}
		want := min(s.batchLocked(), threshold-s.inFlight-s.reserved)
		cause := CauseBackground
		from, limit := s.offset, s.p.NrRegions()
		busy := false
		if len(s.hints) > 0 {
			h := s.hints[0]
			s.hints = s.hints[1:]
			cause, from, limit = CauseHint, h.start, h.end
		} else {
			busy = s.p.Busy()
			s.busy = busy
			if busy {
				if s.opts.BusyInterval < 0 {
					s.mu.Unlock()
					return period
				}
				if since := now.Sub(s.lastBatch); since < s.opts.BusyInterval {
					s.mu.Unlock()
					// Busy ends without a kick (it lasts a little past
					// the last request): look again soon.
					return min(s.opts.BusyInterval-since, busyRecheck)
				}
			}
		}
		s.reserved += want
		s.mu.Unlock()

		start, count := s.p.Claim(from, limit, want)
		if count == 0 && cause == CauseBackground && from > 0 {
			start, count = s.p.Claim(0, limit, want) // wrap: retry earlier failures
		}

		s.mu.Lock()
		s.reserved -= want
		if count == 0 {
			s.signalIdleLocked()
			s.mu.Unlock()
			if cause == CauseHint {
				continue // hydrated or being copied already
			}
			return period // everything hydrated or being copied
		}
		s.inFlight += count
		if cause == CauseHint {
			if start+count < limit {
				// The rest of the hinted range goes first next time.
				s.hints = append([]hintRange{{start + count, limit}}, s.hints...)
			}
		} else {
			s.offset = start + count
			if s.offset >= s.p.NrRegions() {
				s.offset = 0
			}
			s.lastBatch = now
		}
		s.reserveRateLocked(now, count)
		gen := s.failGen
		s.copies.Add(1)
		s.mu.Unlock()
		go s.copy(start, count, cause, gen)
		if busy {
			return busyRecheck
		}
	}
}

// reserveRateLocked takes count regions' bytes from the token bucket; the
// next batch waits until the debt is paid.
func (s *Sweeper) reserveRateLocked(now time.Time, count uint64) {
	if s.limiter == nil {
		return
	}
	bytes := int64(count) * max(s.opts.RegionSize, 1)
	burst := int64(s.limiter.Burst())
	for bytes > 0 {
		k := min(bytes, burst)
		r := s.limiter.ReserveN(now, int(k))
		if d := r.DelayFrom(now); now.Add(d).After(s.rateAt) {
			s.rateAt = now.Add(d)
		}
		bytes -= k
	}
}

func (s *Sweeper) setRateLocked(bytesPerSec int64) {
	s.rate = bytesPerSec
	s.rateAt = time.Time{}
	if bytesPerSec <= 0 {
		s.limiter = nil
		return
	}
	// A quarter second of burst: smooth, and never a batch's worth of
	// tokens refused outright (reserveRateLocked takes them in pieces).
	s.limiter = rate.NewLimiter(rate.Limit(bytesPerSec), int(max(1, bytesPerSec/4)))
}

func (s *Sweeper) copy(start, count uint64, cause Cause, gen uint64) {
	defer s.copies.Done()
	err := s.p.Hydrate(s.ctx, start, count, cause)
	var stopReason string
	s.mu.Lock()
	switch {
	case err != nil && s.ctx.Err() == nil:
		stopReason = s.failedLocked(start, count, gen, err)
	case err == nil:
		if gen == s.failGen {
			s.failures = 0
		}
		if len(s.regionErr) > 0 {
			for r := start; r < start+count; r++ {
				delete(s.regionErr, r)
			}
		}
	}
	s.mu.Unlock()
	// The outcome is recorded: only now may the regions be claimed again.
	// They count in flight until they are released, so whoever waits for
	// the sweep to be idle finds them unlocked.
	s.p.Release(start, count)
	s.mu.Lock()
	s.inFlight -= count
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

// failedLocked records a failed batch and returns why the sweep stops
// now, or "".
func (s *Sweeper) failedLocked(start, count, gen uint64, err error) string {
	worst, worstRegion := 0, start
	for r := start; r < start+count; r++ {
		n, ok := s.regionErr[r]
		if !ok && len(s.regionErr) >= maxTrackedRegions {
			continue
		}
		s.regionErr[r] = n + 1
		if n+1 > worst {
			worst, worstRegion = n+1, r
		}
	}
	// Copies that were in flight together when one failed fail together
	// (a dropped connection, a source restart): they count once.
	counted := gen == s.failGen
	if counted {
		s.failures++
		s.failGen++
		backoff := min(s.opts.Backoff<<min(s.failures-1, 20), s.opts.MaxBackoff)
		s.retryAt = time.Now().Add(backoff)
	}
	s.log.Warn("hydration copy failed", "regions", fmt.Sprintf("%d+%d", start, count),
		"consecutive_failures", s.failures, "region_failures", worst, "retry_at", s.retryAt, "err", err)
	if s.stopped != "" {
		return ""
	}
	switch {
	case errors.Is(err, blockdev.ErrSourceChanged):
		// Retrying cannot help, and must not: the other version's bytes
		// would land next to this one's.
		s.stopped = fmt.Sprintf("the source changed: %v", err)
	case s.failures >= s.opts.MaxErrors:
		s.stopped = fmt.Sprintf("%d consecutive copy failures, last: %v", s.failures, err)
	case worst >= s.opts.MaxRegionErrors:
		s.stopped = fmt.Sprintf("region %d failed %d times in a row, last: %v", worstRegion, worst, err)
	default:
		s.retries++
		return ""
	}
	s.hints = nil
	return s.stopped
}

func (s *Sweeper) signalIdleLocked() {
	if s.inFlight+s.reserved == 0 {
		s.cond.Broadcast()
	}
}

// Hint queues regions [first, first+count) for hydration ahead of the
// sweep: a user read them from the source. It does nothing while
// hydration is disabled, stopped or at threshold 0 (with no_hydration
// nothing is copied, as in dm-clone).
func (s *Sweeper) Hint(first, count uint64) {
	if count == 0 {
		return
	}
	s.mu.Lock()
	if !s.enabled || s.stopped != "" || s.threshold == 0 {
		s.mu.Unlock()
		return
	}
	end := first + count
	if n := len(s.hints); n > 0 && s.hints[n-1].end >= first && s.hints[n-1].start <= end {
		h := &s.hints[n-1]
		h.start, h.end = min(h.start, first), max(h.end, end)
	} else {
		if len(s.hints) >= s.opts.MaxHints {
			s.hints = s.hints[1:] // the oldest hint is the least urgent
		}
		s.hints = append(s.hints, hintRange{first, end})
	}
	s.mu.Unlock()
	s.Kick()
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
		s.clearErrorsLocked()
	} else {
		s.hints = nil
	}
	s.mu.Unlock()
	s.Kick()
}

// Retry is the retry_hydration message: forget the failures and the
// backoff, restart a sweep that stopped on errors (if enabled).
func (s *Sweeper) Retry() {
	s.mu.Lock()
	s.clearErrorsLocked()
	s.mu.Unlock()
	s.Kick()
}

func (s *Sweeper) clearErrorsLocked() {
	s.stopped = ""
	s.failures = 0
	s.failGen++
	clear(s.regionErr)
	s.retryAt = time.Time{}
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

// SetRate is the hydration_rate message: bytes per second, 0 for no limit.
func (s *Sweeper) SetRate(bytesPerSec int64) {
	s.mu.Lock()
	s.setRateLocked(bytesPerSec)
	s.mu.Unlock()
	s.Kick()
}

// State is a snapshot of the sweeper's settings and progress.
type State struct {
	Enabled   bool
	Threshold uint32 // as set (the status line shows it)
	BatchSize uint32
	Rate      int64
	// EffectiveThreshold and EffectiveBatch are in force now: raised for a
	// remote source's window.
	EffectiveThreshold, EffectiveBatch uint64
	InFlight                           uint64
	QueuedHints                        int
	Stopped                            string
	// Why background batches wait now (ours, for metrics): the rate
	// limit's token bucket, user I/O in flight, a backoff after errors.
	Throttled, BusyPaused, BackingOff bool
	// Retries counts failed batches whose regions are retried later.
	Retries uint64
}

// State returns a snapshot.
func (s *Sweeper) State() State {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := State{
		Enabled: s.enabled, Threshold: s.threshold, BatchSize: s.batchSize, Rate: s.rate,
		EffectiveThreshold: s.thresholdLocked(), EffectiveBatch: s.batchLocked(),
		InFlight: s.inFlight, QueuedHints: len(s.hints), Stopped: s.stopped,
		Retries: s.retries,
	}
	if st.Enabled && !s.paused && st.Stopped == "" && s.p.CanHydrate() {
		now := time.Now()
		st.Throttled = now.Before(s.rateAt)
		st.BackingOff = now.Before(s.retryAt)
		st.BusyPaused = s.busy && s.p.Busy()
	}
	return st
}

// Close stops the sweeper: copies in flight see a cancelled context
// (between chunks) and nothing new starts. It waits for every goroutine.
// Idempotent.
func (s *Sweeper) Close() {
	s.cancel()
	s.loop.Wait()
	s.copies.Wait()
}
