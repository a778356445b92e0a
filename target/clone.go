package target

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/hydrate"
	"github.com/nbdclone/nbdclone/metadata"
	"github.com/nbdclone/nbdclone/regions"
)

// dm-clone's limits and defaults (dm-clone-target.c).
const (
	minRegionSectors          = 8       // 4 KiB
	maxRegionSectors          = 1 << 21 // 1 GiB
	maxRegions                = 1 << 31
	defaultHydrationThreshold = 1
	defaultHydrationBatchSize = 1
	commitPeriod              = time.Second
)

// cloneConfig is a parsed clone table line.
type cloneConfig struct {
	metadataPath, destPath, sourceSpec string
	regionSectors                      uint64
	hydration, passdown                bool
	threshold, batchSize               uint32
	autoLinear                         bool // ours: swap to linear once hydrated (the daemon does it)

	readHints bool  // ours: reads of unhydrated regions queue them (no_read_hints turns it off)
	rate      int64 // ours: hydration_rate, bytes/s; 0 is no limit
}

// clone is dm-clone's I/O mapping: reads of unhydrated regions go to the
// source, everything else to the destination, regions are copied in the
// background and before partial writes, discards skip copies.
type clone struct {
	table Table
	cfg   cloneConfig
	log   *slog.Logger
	geom  regions.Geometry

	src     blockdev.Reader // read-only by type: nothing here can write it
	dst     blockdev.Device
	md      *metadata.Store
	locks   *regions.Locks
	copier  *hydrate.Copier
	sweeper *hydrate.Sweeper
	group   *syncGroup

	passdown     atomic.Bool
	userInFlight atomic.Int64
	// lastUserIO is when user I/O last finished, in nanoseconds since
	// born (monotonic): the sweeper treats the device as busy for
	// busyHoldoff after it, not only while I/O is in flight.
	born       time.Time
	lastUserIO atomic.Int64
	onDemand   atomic.Int64 // regions copied or overwritten for user I/O now
	suspended  atomic.Bool

	// The periodic committer (dm-clone's waker); runs while resumed.
	wakerMu     sync.Mutex
	wakerCancel context.CancelFunc // guarded by wakerMu
	wakerDone   chan struct{}      // guarded by wakerMu
	commitReq   chan struct{}

	eventsMu       sync.Mutex
	events         chan struct{} // guarded by eventsMu; closed on an event
	completeRaised atomic.Bool

	stats struct {
		background, write, overwrite, discard, zero, cache, command atomic.Int64
		sourceRead                                                  atomic.Int64
		hint                                                        atomic.Int64
	}

	// A remote source's needs: its window, and CACHE batches that use it.
	remote                    blockdev.Remote // nil for a local source
	sourceID                  string
	cacheBatch, cacheParallel uint64

	obs cloneObs // metrics: commits by trigger, latencies (observe.go)

	closeOnce sync.Once
	closeErr  error
}

func parseCloneArgs(t Table, env Env) (cloneConfig, []string, error) {
	a := t.Args
	if len(a) < 4 {
		return cloneConfig{}, nil, dmErr("Invalid number of arguments", nil)
	}
	return cloneConfig{
		metadataPath: filepath.Clean(env.Path(a[0])),
		destPath:     env.Path(a[1]),
		sourceSpec:   a[2],
	}, a[3:], nil
}

// readArgGroup is dm_read_arg_group: a count in [0, max] that the remaining
// arguments can satisfy.
func readArgGroup(rest []string, maxCount uint64, msg string) (uint64, []string, error) {
	if len(rest) == 0 {
		return 0, rest, nil
	}
	n, err := strconv.ParseUint(rest[0], 10, 32)
	if err != nil || n > maxCount || n > uint64(len(rest)-1) {
		return 0, nil, dmErr(msg, nil)
	}
	return n, rest[1:], nil
}

func newClone(ctx context.Context, t Table, env Env) (Target, error) {
	cfg, _, err := parseCloneArgs(t, env)
	if err != nil {
		return nil, err
	}
	log := env.logger()
	length := t.Bytes()

	// Checked in dm-clone's order: metadata, destination, source, region
	// size, number of regions, features, core arguments, metadata load.
	if err := checkMetadataDir(cfg.metadataPath); err != nil {
		return nil, dmErr("Error opening metadata device", err)
	}
	dst, err := env.openDevice(cfg.destPath)
	if err != nil {
		return nil, dmErr("Error opening destination device", err)
	}
	fail := func(e error, closers ...io.Closer) (Target, error) {
		for _, c := range closers {
			c.Close()
		}
		return nil, e
	}
	if dst.Size() < length {
		return fail(dmErr("Device size larger than destination device", nil), dst)
	}
	src, err := env.openSource(ctx, cfg.sourceSpec)
	if err != nil {
		return fail(dmErr("Error opening source device", err), dst)
	}
	if src.Size() < length {
		return fail(dmErr("Device size larger than source device", nil), dst, src)
	}

	rest := t.Args[3:]
	rs, err := strconv.ParseUint(rest[0], 10, 32)
	if err != nil || rs < minRegionSectors || rs > maxRegionSectors {
		return fail(dmErr("Invalid region size", nil), dst, src)
	}
	if rs&(rs-1) != 0 {
		return fail(dmErr("Region size is not a power of 2", nil), dst, src)
	}
	if (rs*SectorSize)%uint64(src.LogicalBlockSize()) != 0 || (rs*SectorSize)%uint64(dst.LogicalBlockSize()) != 0 {
		return fail(dmErr("Region size is not a multiple of device logical block size", nil), dst, src)
	}
	cfg.regionSectors = rs
	geom, err := regions.NewGeometry(length, int64(rs)*SectorSize)
	if err != nil {
		return fail(dmErr("Invalid region size", err), dst, src)
	}
	if geom.NrRegions() > maxRegions {
		return fail(dmErr("Too many regions. Consider increasing the region size", nil), dst, src)
	}

	cfg.hydration, cfg.passdown = true, true
	cfg.threshold, cfg.batchSize = defaultHydrationThreshold, defaultHydrationBatchSize
	cfg.readHints = true
	rest = rest[1:]
	// dm-clone's two features, and ours: no_read_hints, auto_linear.
	nf, rest, err := readArgGroup(rest, 4, "Invalid number of feature arguments")
	if err != nil {
		return fail(err, dst, src)
	}
	for _, f := range rest[:nf] {
		switch strings.ToLower(f) {
		case "no_hydration":
			cfg.hydration = false
		case "no_discard_passdown":
			cfg.passdown = false
		case "no_read_hints": // ours: reads of unhydrated regions are not hydration hints
			cfg.readHints = false
		case "auto_linear": // ours: the daemon swaps to linear once hydrated
			cfg.autoLinear = true
		default:
			return fail(dmErr("Invalid feature argument", nil), dst, src)
		}
	}
	rest = rest[nf:]
	// dm-clone's two key/value pairs, and ours: hydration_rate.
	nc, rest, err := readArgGroup(rest, 6, "Invalid number of core arguments")
	if err != nil {
		return fail(err, dst, src)
	}
	if nc%2 != 0 {
		return fail(dmErr("Number of core arguments must be even", nil), dst, src)
	}
	for i := uint64(0); i < nc; i += 2 {
		key := strings.ToLower(rest[i])
		switch key {
		case "hydration_threshold", "hydration_batch_size":
			v, err := strconv.ParseUint(rest[i+1], 10, 32)
			if err != nil {
				return fail(dmErr(fmt.Sprintf("Invalid value for argument `%s'", key), nil), dst, src)
			}
			if key == "hydration_threshold" {
				cfg.threshold = uint32(v)
			} else {
				cfg.batchSize = uint32(v)
			}
		case "hydration_rate": // ours: bytes/s, 0 is no limit
			v, err := strconv.ParseUint(rest[i+1], 10, 63)
			if err != nil {
				return fail(dmErr(fmt.Sprintf("Invalid value for argument `%s'", key), nil), dst, src)
			}
			cfg.rate = int64(v)
		default:
			return fail(dmErr("Invalid core argument", nil), dst, src)
		}
	}
	rest = rest[nc:]
	if len(rest) != 0 {
		// dm-clone ignores trailing arguments; a typo there would silently
		// change nothing, so we refuse.
		return fail(dmErr(fmt.Sprintf("Invalid number of arguments: unexpected %q", strings.Join(rest, " ")), nil), dst, src)
	}

	var sourceID string
	if id, ok := src.(blockdev.Identifier); ok {
		sourceID = id.SourceID()
	}
	md, err := metadata.Open(metadata.Options{
		Dir: cfg.metadataPath, TargetSize: length, RegionSize: geom.RegionSize(),
		Source: cfg.sourceSpec, SourceSize: src.Size(), SourceID: sourceID, Logger: log,
		Destination: cfg.destPath,
		WrapKV:      env.MetadataKV,
	})
	if err != nil {
		if errors.Is(err, metadata.ErrNoWrite) {
			return fail(dmErr("Unable to get write access to metadata, please check/repair metadata", err), dst, src)
		}
		return fail(dmErr("Failed to load metadata", err), dst, src)
	}

	c := &clone{
		born:      time.Now(),
		table:     t,
		cfg:       cfg,
		log:       log,
		geom:      geom,
		src:       src,
		dst:       dst,
		md:        md,
		locks:     regions.NewLocks(),
		sourceID:  sourceID,
		group:     newSyncGroup(),
		commitReq: make(chan struct{}, 1),
		events:    make(chan struct{}),
		obs:       newCloneObs(),
	}
	c.passdown.Store(cfg.passdown)
	c.suspended.Store(true)
	// A remote source gets its window in flight whatever the threshold
	// (latency hiding); a local one keeps dm-clone's semantics exactly.
	var window, request int64
	if r, ok := src.(blockdev.Remote); ok {
		c.remote = r
		window, request = r.Window()
	}
	chunk := max(int64(hydrate.DefaultChunk), request)
	c.copier = hydrate.NewCopier(src, dst, hydrate.CopierOptions{Chunk: int(chunk), InFlightBytes: window,
		ObserveRead: c.obs.sourceCopy.Observe})
	c.cacheBatch = max(uint64(cfg.batchSize), uint64(max(1, chunk/geom.RegionSize())))
	c.cacheParallel = uint64(max(1, window/(int64(c.cacheBatch)*geom.RegionSize())))
	c.sweeper = hydrate.NewSweeper(c, hydrate.Options{
		Enabled:       cfg.hydration,
		Threshold:     cfg.threshold,
		BatchSize:     cfg.batchSize,
		RegionSize:    geom.RegionSize(),
		WindowBytes:   window,
		MinBatchBytes: request,
		Rate:          cfg.rate,
		Logger:        log,

		MaxErrors:    env.Sweep.MaxErrors,
		Backoff:      env.Sweep.Backoff,
		MaxBackoff:   env.Sweep.MaxBackoff,
		BusyInterval: env.Sweep.BusyInterval,
		OnStop:       func(string) { c.raiseEvent() },
	})
	if md.Released() {
		c.completeRaised.Store(true)
	}
	log.Info("clone constructed", "regions", geom.NrRegions(), "hydrated", md.Hydrated(),
		"region_size", geom.RegionSize(), "hydration", cfg.hydration)
	return c, nil
}

// checkMetadataDir accepts an existing directory, or a missing one whose
// parent exists (it is created when formatted).
func checkMetadataDir(p string) error {
	fi, err := os.Stat(p)
	if err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory", p)
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	parent, err := os.Stat(filepath.Dir(p))
	if err != nil {
		return err
	}
	if !parent.IsDir() {
		return fmt.Errorf("%s is not a directory", filepath.Dir(p))
	}
	return nil
}

func (c *clone) Size() int64 { return c.geom.TargetSize() }

func (c *clone) check(off, n int64) error {
	if !c.geom.Contains(off, n) {
		return ErrRange
	}
	if c.md.Mode() == metadata.ModeFail {
		return ErrIO
	}
	return nil
}

// enter and exit count user I/O in flight; background hydration yields to it.
func (c *clone) enter() { c.userInFlight.Add(1) }

func (c *clone) exit() {
	c.lastUserIO.Store(int64(time.Since(c.born)))
	c.userInFlight.Add(-1)
}

// runs calls fn for maximal runs of [off, off+n) whose regions share one
// hydration state. It looks at the request's own regions only: a scan for
// the next region of the other state would walk the bitmap to the end of
// the run, megabytes of it on a large device with one long run (a fresh
// 1 TiB clone with 4 KiB regions has 4M words of zeroes).
func (c *clone) runs(off, n int64, fn func(hydrated bool, off, n int64) error) error {
	if n <= 0 {
		return nil
	}
	end := off + n
	r, last := c.geom.Region(off), c.geom.Region(end-1)
	if c.md.RangeHydrated(r, last-r+1) {
		return fn(true, off, n)
	}
	for off < end {
		hydrated := c.md.IsHydrated(r)
		next := r + 1
		for next <= last && c.md.IsHydrated(next) == hydrated {
			next++
		}
		runEnd := end
		if next <= last {
			runEnd = c.geom.Start(next)
		}
		if err := fn(hydrated, off, runEnd-off); err != nil {
			return err
		}
		off, r = runEnd, next
	}
	return nil
}

func (c *clone) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := c.check(off, int64(len(p))); err != nil {
		return err
	}
	c.enter()
	defer c.exit()
	return c.runs(off, int64(len(p)), func(hydrated bool, o, n int64) error {
		buf := p[o-off : o-off+n]
		if hydrated {
			return readFull(ctx, c.dst, buf, o, "destination")
		}
		c.stats.sourceRead.Add(n)
		start := time.Now()
		err := readFull(ctx, c.src, buf, o, "source")
		c.obs.sourceRead.Since(start)
		if err != nil {
			return err
		}
		c.hintRead(o, n)
		return nil
	})
}

// hintRead queues the regions of a read served by the source for
// hydration, unless no_read_hints: reads as hints (dm-clone known issue
// 1), so the next read of them does not go to the source again.
func (c *clone) hintRead(off, n int64) {
	if c.cfg.readHints {
		first := c.geom.Region(off)
		c.sweeper.Hint(first, c.geom.Region(off+n-1)-first+1)
	}
}

// readFull reads all of p from a device of the clone; any failure is EIO
// to the client.
func readFull(ctx context.Context, r io.ReaderAt, p []byte, off int64, what string) error {
	if _, err := blockdev.ReadFullAt(ctx, r, p, off); err != nil {
		return fmt.Errorf("target: read %s at %d+%d: %w: %w", what, off, len(p), err, ErrIO)
	}
	return nil
}

func (c *clone) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := c.check(off, int64(len(p))); err != nil {
		return err
	}
	c.enter()
	defer c.exit()
	// Runs of hydrated regions go to the destination in one write (a 1 MiB
	// write over 4 KiB regions is one pwrite, not 256); unhydrated regions
	// are handled one by one under their locks.
	err := c.runs(off, int64(len(p)), func(hydrated bool, o, n int64) error {
		if hydrated {
			return c.writeDest(p[o-off:o-off+n], o)
		}
		return c.geom.Split(o, n, func(r uint64, ro, rn int64) error {
			return c.writeRegion(ctx, r, p[ro-off:ro-off+rn], ro)
		})
	})
	if err != nil {
		return err
	}
	if fua {
		return c.flush(triggerFUA)
	}
	return nil
}

// writeRegion writes a piece of region r. An unhydrated region is either
// overwritten whole (no copy) or copied first, under its lock, so no copy
// can land over the write.
func (c *clone) writeRegion(ctx context.Context, r uint64, p []byte, off int64) error {
	if c.md.IsHydrated(r) {
		return c.writeDest(p, off)
	}
	if err := c.locks.Lock(ctx, r); err != nil {
		return err
	}
	if c.md.IsHydrated(r) {
		c.locks.Unlock(r)
		return c.writeDest(p, off)
	}
	if c.md.Mode() != metadata.ModeRW {
		c.locks.Unlock(r)
		return fmt.Errorf("target: write to unhydrated region %d in %s mode: %w", r, c.md.Mode(), ErrIO)
	}
	c.onDemand.Add(1)
	defer c.onDemand.Add(-1)
	if c.geom.IsWhole(r, off, int64(len(p))) {
		err := c.writeDest(p, off)
		if err == nil {
			err = c.markHydrated(r, 1)
		}
		c.locks.Unlock(r)
		if err == nil {
			c.stats.overwrite.Add(int64(len(p)))
		}
		return err
	}
	if err := c.copyRegions(ctx, r, 1, true); err != nil {
		c.locks.Unlock(r)
		return err
	}
	c.stats.write.Add(c.geom.Len(r))
	c.locks.Unlock(r)
	return c.writeDest(p, off)
}

func (c *clone) writeDest(p []byte, off int64) error {
	if _, err := c.dst.WriteAt(p, off); err != nil {
		return fmt.Errorf("target: write destination at %d+%d: %w", off, len(p), err)
	}
	return nil
}

// copyRegions copies locked regions [r, r+n) from the source and marks them
// hydrated. Nothing is marked if the copy fails. cached keeps the copy in
// the destination's page cache (data about to be used: NBD_CMD_CACHE, a
// copy before a partial write); background copies leave it once written
// back.
func (c *clone) copyRegions(ctx context.Context, r, n uint64, cached bool) error {
	run := c.copier.Copy
	if cached {
		run = c.copier.CopyCached
	}
	if err := run(ctx, c.geom.Start(r), c.geom.RangeLen(r, n)); err != nil {
		c.log.Warn("hydration failed", "regions", fmt.Sprintf("%d+%d", r, n), "err", err)
		return fmt.Errorf("target: hydrating regions %d+%d: %w: %w", r, n, err, ErrIO)
	}
	return c.markHydrated(r, n)
}

// markHydrated records regions [r, r+n) as hydrated and asks for a prompt
// commit when that completes the device.
func (c *clone) markHydrated(r, n uint64) error {
	if _, err := c.md.SetRange(r, n); err != nil {
		return fmt.Errorf("target: marking regions %d+%d hydrated: %w: %w", r, n, err, ErrIO)
	}
	if c.md.Done() {
		c.requestCommit()
	}
	return nil
}

func (c *clone) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if err := c.check(off, n); err != nil {
		return err
	}
	c.enter()
	defer c.exit()
	first, count := c.geom.WholeRegions(off, n)
	err := c.runs(off, n, func(hydrated bool, o, k int64) error {
		if hydrated {
			return c.zeroDest(o, k)
		}
		// Unhydrated: partial regions are copied first, runs of whole
		// regions are zeroed and marked without reading the source.
		return c.geom.Split(o, k, func(r uint64, po, pn int64) error {
			if r >= first && r < first+count {
				return c.zeroWhole(ctx, r)
			}
			return c.zeroPartial(ctx, r, po, pn)
		})
	})
	if err != nil {
		return err
	}
	if fua {
		return c.flush(triggerFUA)
	}
	return nil
}

func (c *clone) zeroDest(off, n int64) error {
	if err := c.dst.WriteZeroes(off, n); err != nil {
		return fmt.Errorf("target: zero destination at %d+%d: %w", off, n, err)
	}
	return nil
}

func (c *clone) zeroWhole(ctx context.Context, r uint64) error {
	if err := c.locks.Lock(ctx, r); err != nil {
		return err
	}
	defer c.locks.Unlock(r)
	if c.md.IsHydrated(r) {
		return c.zeroDest(c.geom.Start(r), c.geom.Len(r))
	}
	if c.md.Mode() != metadata.ModeRW {
		return fmt.Errorf("target: zeroing unhydrated region %d in %s mode: %w", r, c.md.Mode(), ErrIO)
	}
	c.onDemand.Add(1)
	defer c.onDemand.Add(-1)
	if err := c.zeroDest(c.geom.Start(r), c.geom.Len(r)); err != nil {
		return err
	}
	if err := c.markHydrated(r, 1); err != nil {
		return err
	}
	c.stats.zero.Add(c.geom.Len(r))
	return nil
}

func (c *clone) zeroPartial(ctx context.Context, r uint64, off, n int64) error {
	if err := c.locks.Lock(ctx, r); err != nil {
		return err
	}
	if !c.md.IsHydrated(r) {
		if c.md.Mode() != metadata.ModeRW {
			c.locks.Unlock(r)
			return fmt.Errorf("target: zeroing unhydrated region %d in %s mode: %w", r, c.md.Mode(), ErrIO)
		}
		c.onDemand.Add(1)
		err := c.copyRegions(ctx, r, 1, true)
		c.onDemand.Add(-1)
		if err != nil {
			c.locks.Unlock(r)
			return err
		}
		c.stats.write.Add(c.geom.Len(r))
	}
	c.locks.Unlock(r)
	return c.zeroDest(off, n)
}

// Trim is dm-clone's discard: only whole regions count; unhydrated ones are
// marked hydrated without a copy, then the discard is passed down.
func (c *clone) Trim(ctx context.Context, off, n int64) error {
	if err := c.check(off, n); err != nil {
		return err
	}
	c.enter()
	defer c.exit()
	first, count := c.geom.WholeRegions(off, n)
	if count == 0 {
		return nil
	}
	if !c.md.RangeHydrated(first, count) {
		if c.md.Mode() != metadata.ModeRW {
			return nil // dm-clone ignores discards it cannot record
		}
		if err := c.skipRegions(ctx, first, count); err != nil {
			return err
		}
	}
	if !c.passdown.Load() {
		return nil
	}
	err := c.dst.Discard(c.geom.Start(first), c.geom.RangeLen(first, count))
	if errors.Is(err, blockdev.ErrNotSupported) {
		if c.passdown.Swap(false) {
			c.log.Warn("Destination device discard unsupported: Disabling discard passdown.", "destination", c.cfg.destPath)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("target: discard destination: %w", err)
	}
	return nil
}

// skipRegions marks the unhydrated regions of [first, first+count) hydrated
// without copying, then waits for the copies and overwrites already in
// flight on them (they hold region locks): once the discard returns, no
// copy can land over a later write. A region marked while its copy or
// overwrite is in flight is only marked again by it (a no-op). The cost is
// the bitmap words plus the regions locked now, not one lock per region.
func (c *clone) skipRegions(ctx context.Context, first, count uint64) error {
	last := first + count - 1
	lastWasUnhydrated := !c.md.IsHydrated(last)
	changed, err := c.md.SetRange(first, count)
	if err != nil {
		if errors.Is(err, metadata.ErrReadOnly) {
			return nil // dm-clone ignores discards it cannot record
		}
		return fmt.Errorf("target: discard: %w: %w", err, ErrIO)
	}
	bytes := int64(changed) * c.geom.RegionSize()
	if lastWasUnhydrated && changed > 0 {
		bytes -= c.geom.RegionSize() - c.geom.Len(last) // a partial last region
	}
	c.stats.discard.Add(bytes)
	if c.md.Done() {
		c.requestCommit()
	}
	return c.locks.WaitRange(ctx, first, first+count)
}

// Flush: a FLUSH commits metadata when it changed in this transaction
// (commit = destination sync, then the metadata write); otherwise it syncs
// the destination. Concurrent flushes share one commit.
func (c *clone) Flush(ctx context.Context) error {
	if c.md.Mode() == metadata.ModeFail {
		return ErrIO
	}
	c.enter()
	defer c.exit()
	return c.flush(triggerFlush)
}

func (c *clone) flush(why commitTrigger) error {
	return c.group.do(func() error { return c.commit(why) })
}

// commit is one run of the sync group; why is the trigger of the caller
// that runs it (concurrent callers share the run).
func (c *clone) commit(why commitTrigger) error {
	if m := c.md.Mode(); m != metadata.ModeRW {
		// A commit failed: the writes of its aborted transaction may read
		// from the source again or be lost at the next restart. dm-clone
		// still passes later flushes down and they succeed; a flush that
		// succeeds promises those writes, so here none does until the
		// table is reloaded.
		return fmt.Errorf("target: metadata is %s after a failed commit; flushes fail until the table is reloaded: %w", m, ErrIO)
	}
	if !c.md.Changed() {
		if err := c.dst.Sync(); err != nil {
			err = c.md.DestinationFailed(err)
			c.raiseEvent()
			return fmt.Errorf("target: flush destination: %w: %w", err, ErrIO)
		}
		return nil
	}
	before := c.md.Mode()
	start := time.Now()
	err := c.md.Commit(c.dst)
	c.obs.commitLatency.Since(start)
	if err == nil {
		c.obs.commits[why].Add(1)
	}
	if c.md.Mode() != before {
		c.raiseEvent()
	}
	if err != nil {
		return fmt.Errorf("target: %w: %w", err, ErrIO)
	}
	if c.md.Released() && !c.completeRaised.Swap(true) {
		c.log.Info("hydration complete", "regions", c.geom.NrRegions())
		c.raiseEvent()
	}
	return nil
}

// commitIfChanged commits when metadata changed (periodic, status, suspend).
func (c *clone) commitIfChanged(why commitTrigger) error {
	if !c.md.Changed() {
		return nil
	}
	return c.flush(why)
}

// commandCopyKey marks a context of CommandCopy.
type commandCopyKey struct{}

// CommandCopy marks ctx for Cache calls made by an operator command (split,
// redirect) rather than by a client: their copies leave the destination's
// page cache once written back, as background hydration's do, and count as
// HydratedCommandBytes.
func CommandCopy(ctx context.Context) context.Context {
	return context.WithValue(ctx, commandCopyKey{}, true)
}

// Cache hydrates the unhydrated regions of the range before it returns
// (NBD_CMD_CACHE): an explicit request, served even with background
// hydration disabled, with priority (no throttle, not held back by user
// I/O), in batches of contiguous regions with a remote source's window in
// flight.
func (c *clone) Cache(ctx context.Context, off, n int64) error {
	if err := c.check(off, n); err != nil {
		return err
	}
	_, command := ctx.Value(commandCopyKey{}).(bool)
	if n == 0 {
		return nil
	}
	c.enter()
	defer c.exit()
	last := c.geom.Region(off + n - 1)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	failed := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
	}
	slots := make(chan struct{}, c.cacheParallel)
	for r := c.md.NextUnhydratedBefore(c.geom.Region(off), last+1); r <= last && r < c.geom.NrRegions(); r = c.md.NextUnhydratedBefore(r, last+1) {
		mu.Lock()
		stop := firstErr != nil
		mu.Unlock()
		if stop {
			break
		}
		// The first region waits for a copy in flight on it; followers
		// are only taken when free, so no lock is waited for while others
		// are held.
		if err := c.locks.Lock(ctx, r); err != nil {
			failed(err)
			break
		}
		if c.md.IsHydrated(r) {
			c.locks.Unlock(r)
			continue
		}
		if c.md.Mode() != metadata.ModeRW {
			c.locks.Unlock(r)
			break // a hint: nothing to record
		}
		count := uint64(1)
		if r < last && c.cacheBatch > 1 {
			count += c.lockUnhydratedRun(r+1, min(c.cacheBatch-1, last-r))
		}
		acquired := false
		select {
		case slots <- struct{}{}:
			acquired = true
		case <-ctx.Done():
			failed(ctx.Err())
		}
		mu.Lock()
		stop = firstErr != nil
		mu.Unlock()
		if stop {
			c.locks.UnlockRun(r, count)
			if acquired {
				<-slots
			}
			break
		}
		c.onDemand.Add(int64(count))
		start := r
		wg.Go(func() {
			defer func() { <-slots }()
			err := c.copyRegions(ctx, start, count, !command)
			c.onDemand.Add(-int64(count))
			c.locks.UnlockRun(start, count)
			if err != nil {
				failed(err)
				return
			}
			if command {
				c.stats.command.Add(c.geom.RangeLen(start, count))
			} else {
				c.stats.cache.Add(c.geom.RangeLen(start, count))
			}
		})
		r += count
	}
	wg.Wait()
	return firstErr
}

// Planner for the background sweep.

func (c *clone) NrRegions() uint64 { return c.geom.NrRegions() }

func (c *clone) Claim(from, limit, maxCount uint64) (uint64, uint64) {
	n := c.geom.NrRegions()
	end := min(n, limit)
	for r := c.md.NextUnhydratedBefore(from, end); r < end; r = c.md.NextUnhydratedBefore(r+1, end) {
		if count := c.lockUnhydratedRun(r, min(maxCount, n-r)); count > 0 {
			return r, count
		}
	}
	return 0, 0
}

// lockUnhydratedRun locks the unhydrated regions r, r+1, … (at most max)
// that nobody holds or waits for, and returns how many it locked: 0 when
// region r is hydrated or taken. The run is locked in one call (a map
// operation per 64 regions) and checked again once locked: a region may
// have been hydrated by its holder before.
func (c *clone) lockUnhydratedRun(r, max uint64) uint64 {
	run := c.md.NextHydratedBefore(r, r+max) - r
	if run == 0 {
		return 0
	}
	got := c.locks.TryLockRun(r, run)
	if h := c.md.NextHydratedBefore(r, r+got); h < r+got {
		c.locks.UnlockRun(h, r+got-h)
		return h - r
	}
	return got
}

func (c *clone) Hydrate(ctx context.Context, start, count uint64, cause hydrate.Cause) error {
	if err := c.copyRegions(ctx, start, count, false); err != nil {
		return err
	}
	if cause == hydrate.CauseHint {
		c.stats.hint.Add(c.geom.RangeLen(start, count))
	} else {
		c.stats.background.Add(c.geom.RangeLen(start, count))
	}
	return nil
}

// Release unlocks regions Claim locked, after the sweeper recorded their
// copy's outcome.
func (c *clone) Release(start, count uint64) { c.locks.UnlockRun(start, count) }

// busyHoldoff is how long after user I/O the device still counts as busy.
// dm-clone's rule is "no user I/O in flight", which a client at queue
// depth 1 satisfies between every two requests: background copies then
// start in those gaps and compete with every request for the CPU and the
// disk (p99 of 4 KiB reads 19× idle with the copier at full speed). A
// device that was idle for this long is idle; the sweeper rechecks at
// least this often while busy.
const busyHoldoff = 20 * time.Millisecond

func (c *clone) Busy() bool {
	return c.userInFlight.Load() > 0 || time.Since(c.born)-time.Duration(c.lastUserIO.Load()) < busyHoldoff
}

func (c *clone) CanHydrate() bool {
	return c.md.Mode() == metadata.ModeRW && !c.md.Done()
}

// Status is dm-clone's INFO line. Like dm-clone it commits first unless the
// device is suspended.
func (c *clone) Status() string {
	if c.md.Mode() == metadata.ModeFail {
		return "Fail"
	}
	if !c.suspended.Load() {
		if err := c.commitIfChanged(triggerStatus); err != nil {
			c.log.Warn("commit before status failed", "err", err)
		}
		if c.md.Mode() == metadata.ModeFail {
			return "Fail"
		}
	}
	st := c.sweeper.State()
	used, total := c.md.Blocks()
	var b strings.Builder
	fmt.Fprintf(&b, "%d %d/%d %d %d/%d %d ", metadata.BlockSectors, used, total,
		c.cfg.regionSectors, c.md.Hydrated(), c.geom.NrRegions(), st.InFlight+uint64(c.onDemand.Load()))
	var features []string
	if !st.Enabled {
		features = append(features, "no_hydration")
	}
	if !c.passdown.Load() {
		features = append(features, "no_discard_passdown")
	}
	if c.cfg.autoLinear {
		features = append(features, "auto_linear")
	}
	if !c.cfg.readHints {
		features = append(features, "no_read_hints")
	}
	fmt.Fprintf(&b, "%d ", len(features))
	for _, f := range features {
		b.WriteString(f + " ")
	}
	if st.Rate > 0 {
		// Ours, after dm-clone's two, and only when set: the default line
		// stays byte for byte dm-clone's.
		fmt.Fprintf(&b, "6 hydration_threshold %d hydration_batch_size %d hydration_rate %d %s",
			st.Threshold, st.BatchSize, st.Rate, c.md.Mode())
		return b.String()
	}
	fmt.Fprintf(&b, "4 hydration_threshold %d hydration_batch_size %d %s", st.Threshold, st.BatchSize, c.md.Mode())
	return b.String()
}

// Table is the constructor arguments, verbatim.
func (c *clone) Table() string { return strings.Join(c.table.Args, " ") }

// Message handles dm-clone's messages.
func (c *clone) Message(_ context.Context, args []string) error {
	if len(args) == 0 {
		return dmErr("Invalid argument", errors.New("no message given"))
	}
	switch strings.ToLower(args[0]) {
	case "enable_hydration":
		c.sweeper.SetEnabled(true)
		return nil
	case "disable_hydration":
		c.sweeper.SetEnabled(false)
		return nil
	case "hydration_threshold", "hydration_batch_size":
		if len(args) != 2 {
			return dmErr("Invalid argument", fmt.Errorf("%s takes one value", args[0]))
		}
		v, err := strconv.ParseUint(args[1], 10, 32)
		if err != nil {
			return dmErr("Invalid argument", fmt.Errorf("%s: %q is not an unsigned 32-bit number", args[0], args[1]))
		}
		if strings.EqualFold(args[0], "hydration_threshold") {
			c.sweeper.SetThreshold(uint32(v))
		} else {
			c.sweeper.SetBatchSize(uint32(v))
		}
		return nil
	case "hydration_rate": // ours: bytes/s for background and hinted copies, 0 is no limit
		if len(args) != 2 {
			return dmErr("Invalid argument", fmt.Errorf("%s takes one value", args[0]))
		}
		v, err := strconv.ParseUint(args[1], 10, 63)
		if err != nil {
			return dmErr("Invalid argument", fmt.Errorf("%s: %q is not a number of bytes per second", args[0], args[1]))
		}
		c.sweeper.SetRate(int64(v))
		return nil
	case "retry_hydration": // ours: restart a sweep stopped on errors, keep enabled/disabled
		if len(args) != 1 {
			return dmErr("Invalid argument", fmt.Errorf("%s takes no value", args[0]))
		}
		c.sweeper.Retry()
		return nil
	default:
		return dmErr(fmt.Sprintf("Unsupported message `%s'", args[0]), nil)
	}
}

func (c *clone) Info() Info {
	st := c.sweeper.State()
	used, total := c.md.Blocks()
	ms := c.md.Stats()
	info := Info{
		Type: "clone",
		Size: c.geom.TargetSize(),
		Clone: &CloneInfo{
			Metadata:           c.cfg.metadataPath,
			Destination:        c.cfg.destPath,
			Source:             c.cfg.sourceSpec,
			RegionSize:         c.geom.RegionSize(),
			Regions:            c.geom.NrRegions(),
			HydratedRegions:    c.md.Hydrated(),
			HydratingRegions:   st.InFlight + uint64(c.onDemand.Load()),
			Hydrated:           c.md.Released(),
			HydrationEnabled:   st.Enabled,
			DiscardPassdown:    c.passdown.Load(),
			HydrationThreshold: st.Threshold,
			HydrationBatchSize: st.BatchSize,
			HydrationStopped:   st.Stopped,
			AutoLinear:         c.cfg.autoLinear,
			Mode:               c.md.Mode().String(),
			MetadataUsed:       used,
			MetadataTotal:      total,
			Stats: CloneStats{
				HydratedBackgroundBytes: c.stats.background.Load(),
				HydratedWriteBytes:      c.stats.write.Load(),
				HydratedOverwriteBytes:  c.stats.overwrite.Load(),
				HydratedDiscardBytes:    c.stats.discard.Load(),
				HydratedZeroBytes:       c.stats.zero.Load(),
				HydratedCacheBytes:      c.stats.cache.Load(),
				HydratedCommandBytes:    c.stats.command.Load(),
				SourceReadBytes:         c.stats.sourceRead.Load(),
				SourceCopyBytes:         c.copier.CopiedBytes(),
				CopyErrors:              c.copier.Errors(),
				Commits:                 ms.Commits,
				CommitErrors:            ms.CommitErrors,
				CommitNanosTotal:        ms.CommitNanos,
			},
		},
	}
	c.remoteInfo(info.Clone, st)
	return info
}

// remoteInfo fills in what is ours: hints, throttle, a remote source.
func (c *clone) remoteInfo(ci *CloneInfo, st hydrate.State) {
	ci.ReadHints = c.cfg.readHints
	ci.HydrationRate = st.Rate
	ci.EffectiveThreshold, ci.EffectiveBatchSize = st.EffectiveThreshold, st.EffectiveBatch
	ci.QueuedHints = st.QueuedHints
	ci.SourceID = c.sourceID
	ci.Stats.HydratedHintBytes = c.stats.hint.Load()
	ci.Stats.SourceHoleBytes = c.copier.HoleBytes()
	ci.Throttled, ci.BusyPaused, ci.BackingOff = st.Throttled, st.BusyPaused, st.BackingOff
	ci.CopyRetries = st.Retries
	c.obs.fill(&ci.Stats)
	if c.remote != nil {
		rs := c.remote.RemoteStats()
		ci.Remote = &rs
	}
	if sc, ok := c.src.(blockdev.SourceCacheReporter); ok {
		st := sc.SourceCacheStats()
		ci.SourceCache = &st
	}
}

// Suspend stops background hydration (copies in flight finish), stops the
// periodic commit and commits.
func (c *clone) Suspend(ctx context.Context) error {
	c.sweeper.Pause()
	c.stopWaker()
	c.suspended.Store(true)
	if err := c.commitIfChanged(triggerSuspend); err != nil {
		c.log.Warn("commit at suspend failed", "err", err)
	}
	return nil
}

// Resume restarts the periodic commit and background hydration.
func (c *clone) Resume() error {
	c.suspended.Store(false)
	c.startWaker()
	c.sweeper.Resume()
	return nil
}

func (c *clone) startWaker() {
	c.wakerMu.Lock()
	defer c.wakerMu.Unlock()
	if c.wakerCancel != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	c.wakerCancel, c.wakerDone = cancel, done
	go c.waker(ctx, done)
}

func (c *clone) stopWaker() {
	c.wakerMu.Lock()
	cancel, done := c.wakerCancel, c.wakerDone
	c.wakerCancel, c.wakerDone = nil, nil
	c.wakerMu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// waker commits every second when metadata changed, and at once when
// hydration completes (so waiters wake without a second's delay).
func (c *clone) waker(ctx context.Context, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(commitPeriod)
	defer t.Stop()
	for {
		why := triggerPeriodic
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-c.commitReq:
			why = triggerComplete
		}
		if err := c.commitIfChanged(why); err != nil {
			c.log.Warn("periodic commit failed", "err", err)
		}
	}
}

func (c *clone) requestCommit() {
	select {
	case c.commitReq <- struct{}{}:
	default:
	}
}

func (c *clone) Events() <-chan struct{} {
	c.eventsMu.Lock()
	defer c.eventsMu.Unlock()
	return c.events
}

func (c *clone) raiseEvent() {
	c.eventsMu.Lock()
	close(c.events)
	c.events = make(chan struct{})
	c.eventsMu.Unlock()
}

// Close stops everything, commits what changed and releases the devices.
// Idempotent.
func (c *clone) Close() error {
	c.closeOnce.Do(func() {
		c.sweeper.Close()
		c.stopWaker()
		var errs []error
		if c.md.Mode() == metadata.ModeRW {
			if err := c.commitIfChanged(triggerClose); err != nil {
				errs = append(errs, err)
			}
		}
		c.copier.Close()
		errs = append(errs, c.md.Close(), c.dst.Close(), c.src.Close())
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

// SourceRecorder is implemented by clone targets: RecordSource writes a new
// <source dev> into the clone's metadata (a redirect), before a table
// naming it replaces this one.
type SourceRecorder interface {
	RecordSource(spec string) error
}

func (c *clone) RecordSource(spec string) error {
	if err := c.md.SetSource(spec); err != nil {
		return fmt.Errorf("target: %w", err)
	}
	return nil
}
