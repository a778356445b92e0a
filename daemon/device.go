package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/nbdserver"
	"github.com/nbdclone/nbdclone/target"
)

// Preferred NBD block size bounds (NBD_INFO_BLOCK_SIZE).
const (
	minPreferredBlock     = 512
	maxPreferredBlock     = 32 << 20
	defaultPreferredBlock = 4096
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9_.+-]{1,64}$`)

func validName(name string) error {
	if !nameRE.MatchString(name) || name == "." || name == ".." {
		return newErr(ErrInvalid, "invalid device name %q: want 1 to 64 of A-Z a-z 0-9 _ . + - (not . or ..)", name)
	}
	return nil
}

// handle is one built target with the table it was built from. Readers
// (status, info, message) hold it through users, so it is closed only after
// the last of them left (invariant 3).
type handle struct {
	t     target.Target
	table target.Table
	dir   string // Env.Dir it was built with
	users sync.WaitGroup
	// running is true between Resume and Suspend. Only operations holding
	// the device's ops semaphore touch it.
	running bool
}

func (h *handle) release() { h.users.Done() }

// loaded is an inactive table: built at load, or only parsed when its
// build must wait for the live target to release the metadata store.
type loaded struct {
	table target.Table
	dir   string
	t     target.Target // nil: build at resume
}

// device is one named device: an NBD export backed by its live target.
type device struct {
	name    string
	size    int64 // bytes; fixed at create (invariant 2)
	created time.Time
	log     *slog.Logger
	gate    *gate
	// ops serialises control operations (load, suspend, resume, remove).
	// It is a semaphore held for a whole operation, which does I/O; it
	// guards no fields itself, and ctx-aware acquisition keeps a waiting
	// request cancellable.
	ops chan struct{}
	// removed is closed when the device leaves the registry.
	removed chan struct{}
	// io counts NBD requests (iostats.go).
	io *ioStats

	mu sync.Mutex
	// Guarded by mu.
	ready     bool    // create finished; visible to NBD and ls
	gone      bool    // removed from the registry
	live      *handle // nil while failed, or while a swap has no target
	table     target.Table
	dir       string
	inactive  *loaded
	suspended bool
	failure   error         // why live is nil, when it is not a swap
	swapping  chan struct{} // non-nil while a swap has no live target; closed when it ends
	conns     int           // open NBD connections
	// children counts the source handles other devices hold on this one
	// (their tables say dev:NAME), by child name (family.go).
	children map[string]int

	// childRefs is the sum of children: while it is not 0 the device is a
	// parent and refuses writes. writers counts writes past that check.
	childRefs, writers atomic.Int64

	// ioLive mirrors live for the I/O path, which reads it on every
	// request without taking mu; it is stored only under mu, next to live.
	ioLive atomic.Pointer[handle]
}

func newDevice(name string, tbl target.Table, dir string, created time.Time, log *slog.Logger) *device {
	return &device{
		name:    name,
		size:    tbl.Bytes(),
		created: created,
		log:     log.With("device", name),
		gate:    newGate(),
		ops:     make(chan struct{}, 1),
		removed: make(chan struct{}),
		io:      newIOStats(),
		table:   tbl,
		dir:     dir,
	}
}

// lockOps takes the ops semaphore.
func (d *device) lockOps(ctx context.Context) (unlock func(), err error) {
	select {
	case d.ops <- struct{}{}:
		return func() { <-d.ops }, nil
	case <-d.removed:
		return nil, errNotFound(d.name)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// acquire returns the live target for a reader, waiting through a swap.
// Call release on the handle when done.
func (d *device) acquire(ctx context.Context) (*handle, error) {
	for {
		d.mu.Lock()
		if d.gone {
			d.mu.Unlock()
			return nil, errNotFound(d.name)
		}
		if h := d.live; h != nil {
			h.users.Add(1)
			d.mu.Unlock()
			return h, nil
		}
		swapping, failure := d.swapping, d.failure
		d.mu.Unlock()
		if swapping == nil {
			return nil, d.failedErr(failure)
		}
		select {
		case <-swapping:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// tryAcquire is acquire without waiting: nil while there is no live target.
func (d *device) tryAcquire() *handle {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gone || d.live == nil {
		return nil
	}
	d.live.users.Add(1)
	return d.live
}

func (d *device) failedErr(cause error) error {
	if cause == nil {
		return newErr(ErrFailed, "device %s has no live table", d.name)
	}
	return wrapErr(ErrFailed, cause, "device %s failed", d.name)
}

// liveOpsHeld returns the live handle; the caller holds ops, so it cannot
// change underneath.
func (d *device) liveOpsHeld() *handle {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.live
}

// publish makes h the live target and ends a swap.
func (d *device) publish(h *handle) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.live = h
	d.ioLive.Store(h)
	d.table, d.dir = h.table, h.dir
	d.failure = nil
	if d.swapping != nil {
		close(d.swapping)
		d.swapping = nil
	}
}

// unpublish removes the live target; readers wait for the swap to end.
func (d *device) unpublish() *handle {
	d.mu.Lock()
	defer d.mu.Unlock()
	h := d.live
	d.live = nil
	d.ioLive.Store(nil)
	if d.swapping == nil {
		d.swapping = make(chan struct{})
	}
	return h
}

// setFailed records that the device has no live target, ending any swap.
func (d *device) setFailed(cause error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.live = nil
	d.ioLive.Store(nil)
	d.failure = cause
	if d.swapping != nil {
		close(d.swapping)
		d.swapping = nil
	}
}

func (d *device) setSuspended(s bool) {
	d.mu.Lock()
	d.suspended = s
	d.mu.Unlock()
}

func (d *device) isSuspended() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.suspended
}

// ioTarget returns the target for an I/O that entered the gate. The gate
// guarantees no swap is under way (invariant 1); the atomic spares every
// request a lock round trip on mu.
func (d *device) ioTarget() (target.Target, error) {
	h := d.ioLive.Load()
	if h == nil {
		return nil, target.ErrIO
	}
	return h.t, nil
}

// Device implements nbdserver.Export (and Extenter) by forwarding to the
// live target through the gate.
var (
	_ nbdserver.Export   = (*device)(nil)
	_ nbdserver.Extenter = (*device)(nil)
)

// ContextHydrated is nbdclone's own metadata context: one flag per extent,
// StateHydrated when every region of it is hydrated (read from the
// destination), clear when none is (read from the source). A linear device
// is all hydrated.
const (
	ContextHydrated = "nbdclone:hydrated"
	StateHydrated   = uint32(1 << 0)
)

func (d *device) Size() int64 { return d.size }

// Flags: targets implement every command, and a flush syncs the whole
// device, so multi-conn is safe. Fast zeroes are offered when the live
// target's device zeroes natively; each such request is still checked (a
// partly covered unhydrated region needs a copy, which is not fast).
func (d *device) Flags() nbdserver.ExportFlags {
	f := nbdserver.ExportFlags{
		Flush:     true,
		FUA:       true,
		Trim:      true,
		Zeroes:    true,
		Cache:     true,
		MultiConn: true,
		// A parent is read-only: its children read it as their source.
		ReadOnly: d.childRefs.Load() > 0,
	}
	if h := d.tryAcquire(); h != nil {
		if fz, ok := h.t.(target.FastZeroer); ok {
			f.FastZero = fz.ZeroesFast(0, h.t.Size())
		}
		h.release()
	}
	return f
}

// PreferredBlockSize is the clone region size: I/O that covers whole regions
// skips copies.
func (d *device) PreferredBlockSize() uint32 {
	h := d.tryAcquire()
	if h == nil {
		return defaultPreferredBlock
	}
	info := h.t.Info()
	h.release()
	return preferredBlockSize(info)
}

func preferredBlockSize(info target.Info) uint32 {
	if info.Clone == nil || info.Clone.RegionSize <= 0 {
		return defaultPreferredBlock
	}
	return uint32(min(max(info.Clone.RegionSize, minPreferredBlock), maxPreferredBlock))
}

// do runs one I/O through the gate.
func (d *device) do(ctx context.Context, io func(target.Target) error) error {
	if err := d.gate.enter(ctx); err != nil {
		return err
	}
	defer d.gate.leave()
	t, err := d.ioTarget()
	if err != nil {
		return err
	}
	return io(t)
}

func (d *device) ReadAt(ctx context.Context, p []byte, off int64) error {
	return d.do(ctx, func(t target.Target) error { return t.ReadAt(ctx, p, off) })
}

// SpliceTo is ReadAt into pipes (nbdserver.Splicer), a piece per pipe,
// where the live target reads straight from a file: all the pieces of one
// READ in one pass through the gate, so from one target. The pipes hold
// their pages, not the file, so a live swap may close the file once this
// returns.
func (d *device) SpliceTo(ctx context.Context, pieces []nbdserver.SplicePiece, dataOnly bool) error {
	return d.do(ctx, func(t target.Target) error {
		s, ok := t.(target.Splicer)
		if !ok {
			return fmt.Errorf("daemon: %w", blockdev.ErrNoSplice)
		}
		for _, p := range pieces {
			if err := s.SpliceTo(ctx, p.Pipe, p.Off, p.N, dataOnly); err != nil {
				return err
			}
		}
		return nil
	})
}

// SpliceFrom is WriteAt from pipes (nbdserver.SpliceWriter), through the
// same gate and family checks: every piece to one target, or, if the
// target will not take them all, none (nbdserver.ErrNoSplice, the pipes
// untouched). fua goes with the last piece: its flush covers them all.
func (d *device) SpliceFrom(ctx context.Context, pieces []nbdserver.SplicePiece, fua bool) error {
	return d.doWrite(ctx, func(t target.Target) error {
		s, ok := t.(target.SpliceWriter)
		if !ok {
			return nbdserver.ErrNoSplice
		}
		// The pieces are contiguous: one check covers them all.
		last := pieces[len(pieces)-1]
		if !s.SplicesWrite(pieces[0].Off, last.Off+int64(last.N)-pieces[0].Off) {
			return nbdserver.ErrNoSplice
		}
		for i, p := range pieces {
			if err := s.SpliceFrom(ctx, p.Pipe, p.Off, p.N, fua && i == len(pieces)-1); err != nil {
				return err
			}
		}
		return nil
	})
}

func (d *device) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return d.doWrite(ctx, func(t target.Target) error { return t.WriteAt(ctx, p, off, fua) })
}

// WriteZeroes: noHole is always honoured, because a target's WriteZeroes
// is not a discard and never deallocates (FALLOC_FL_ZERO_RANGE keeps
// blocks allocated, BLKZEROOUT does not unmap). A fast zero is done only
// when the target says it is fast now, and fails with ENOTSUP at once
// otherwise, touching nothing, so the client can fall back.
func (d *device) WriteZeroes(ctx context.Context, off, n int64, fua, noHole, fastZero bool) error {
	return d.doWrite(ctx, func(t target.Target) error {
		if fastZero {
			fz, ok := t.(target.FastZeroer)
			if !ok || !fz.ZeroesFast(off, n) {
				return fmt.Errorf("daemon: zeroing %d+%d is not fast here: %w", off, n, nbdserver.ErrNotSupported)
			}
		}
		return t.WriteZeroes(ctx, off, n, fua)
	})
}

// MetaContexts: every target type can describe itself.
func (d *device) MetaContexts() []string {
	return []string{nbdserver.ContextBaseAllocation, ContextHydrated}
}

// Extents asks the live target, through the gate like any I/O (a swap
// never answers half from each table). A target that cannot describe
// itself answers status 0 for the whole range, which is always true.
func (d *device) Extents(ctx context.Context, metaContext string, off, n int64, maxExtents int) ([]nbdserver.Extent, error) {
	var out []nbdserver.Extent
	err := d.do(ctx, func(t target.Target) error {
		te, ok := t.(target.Extenter)
		if !ok {
			out = []nbdserver.Extent{{Length: n}}
			return nil
		}
		switch metaContext {
		case nbdserver.ContextBaseAllocation:
			extents, err := te.Allocation(ctx, off, n, maxExtents)
			if err != nil {
				return err
			}
			out = make([]nbdserver.Extent, len(extents))
			for i, e := range extents {
				out[i].Length = e.Length
				if e.Hole {
					out[i].Flags |= nbdserver.StateHole
				}
				if e.Zero {
					out[i].Flags |= nbdserver.StateZero
				}
			}
		case ContextHydrated:
			extents, err := te.Hydration(ctx, off, n, maxExtents)
			if err != nil {
				return err
			}
			out = make([]nbdserver.Extent, len(extents))
			for i, e := range extents {
				out[i].Length = e.Length
				if e.Hydrated {
					out[i].Flags = StateHydrated
				}
			}
		default:
			return fmt.Errorf("daemon: unknown metadata context %q: %w", metaContext, syscall.EINVAL)
		}
		return nil
	})
	return out, err
}

func (d *device) Trim(ctx context.Context, off, n int64, fua bool) error {
	return d.doWrite(ctx, func(t target.Target) error {
		if err := t.Trim(ctx, off, n); err != nil {
			return err
		}
		if fua {
			return t.Flush(ctx)
		}
		return nil
	})
}

func (d *device) Flush(ctx context.Context) error {
	return d.do(ctx, func(t target.Target) error { return t.Flush(ctx) })
}

func (d *device) Cache(ctx context.Context, off, n int64) error {
	return d.do(ctx, func(t target.Target) error { return t.Cache(ctx, off, n) })
}
