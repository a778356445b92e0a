package target

import (
	"context"
	"fmt"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
)

// Splicer is implemented by targets whose reads can be moved from a file
// into a pipe without copying them (blockdev.Splicer), for a server that
// moves them on into a socket. ErrNoSplice-wrapping failures mean the read
// must go through ReadAt instead; any other failure also leaves the pipe
// undefined, and ReadAt reports the error properly.
type Splicer interface {
	// SpliceTo moves the n bytes at off into the pipe whose write end is
	// pipe, all of them, exactly as ReadAt would read them, or fails.
	// dataOnly: fail rather than move a range with a hole in it.
	SpliceTo(ctx context.Context, pipe int, off int64, n int, dataOnly bool) error
}

var (
	_ Splicer = (*clone)(nil)
	_ Splicer = (*linear)(nil)
)

// SpliceTo splices a read run by run as ReadAt reads it: hydrated runs
// from the destination, unhydrated ones from the source, counted and
// hinted as ReadAt does once they are in the pipe. A read with an
// unhydrated region over a source that cannot splice (a remote one) is
// ErrNoSplice before anything moves. Regions only ever become hydrated,
// so a range found hydrated here stays so.
func (c *clone) SpliceTo(ctx context.Context, pipe int, off int64, n int, dataOnly bool) error {
	if err := c.check(off, int64(n)); err != nil {
		return err
	}
	c.enter()
	defer c.exit()
	if _, ok := c.src.(blockdev.Splicer); !ok {
		first, last := c.geom.Region(off), c.geom.Region(off+int64(n)-1)
		if !c.md.RangeHydrated(first, last-first+1) {
			return blockdev.ErrNoSplice
		}
	}
	return c.runs(off, int64(n), func(hydrated bool, o, k int64) error {
		if hydrated {
			return spliceFrom(ctx, c.dst, pipe, o, int(k), dataOnly, "destination")
		}
		start := time.Now()
		if err := spliceFrom(ctx, c.src, pipe, o, int(k), dataOnly, "source"); err != nil {
			return err
		}
		c.stats.sourceRead.Add(k)
		c.obs.sourceRead.Since(start)
		c.hintRead(o, k)
		return nil
	})
}

func (l *linear) SpliceTo(ctx context.Context, pipe int, off int64, n int, dataOnly bool) error {
	if err := l.check(off, int64(n)); err != nil {
		return err
	}
	return spliceFrom(ctx, l.dev, pipe, l.offset+off, n, dataOnly, "device")
}

// spliceFrom splices from dev if it can (a local file), ErrNoSplice if not.
func spliceFrom(ctx context.Context, dev any, pipe int, off int64, n int, dataOnly bool, what string) error {
	s, ok := dev.(blockdev.Splicer)
	if !ok {
		return blockdev.ErrNoSplice
	}
	if err := s.SpliceTo(ctx, pipe, off, n, dataOnly); err != nil {
		return fmt.Errorf("target: splice %s at %d+%d: %w", what, off, n, err)
	}
	return nil
}

// SpliceWriter is implemented by targets that can write a range from a
// pipe without copying it (blockdev.SpliceWriter), for a server that moved
// a request's payload from its socket into the pipe.
type SpliceWriter interface {
	// SplicesWrite reports whether SpliceFrom would take a write of n bytes
	// at off: a target answers false rather than take part of one. A true
	// answer stays true (regions only ever become hydrated).
	SplicesWrite(off, n int64) bool
	// SpliceFrom writes the n bytes waiting in the pipe whose read end is
	// pipe at off, exactly as WriteAt would write them (fua too), or fails
	// as WriteAt fails; a range SplicesWrite refuses is ErrNoSplice with
	// nothing taken from the pipe.
	SpliceFrom(ctx context.Context, pipe int, off int64, n int, fua bool) error
}

var (
	_ SpliceWriter = (*clone)(nil)
	_ SpliceWriter = (*linear)(nil)
)

// SplicesWrite: a write all of whose regions are hydrated, which WriteAt
// sends to the destination in one write, can come from a pipe; one with an
// unhydrated region needs the region copied and merged first.
func (c *clone) SplicesWrite(off, n int64) bool {
	return c.check(off, n) == nil && c.splicesChecked(off, n)
}

// splicesChecked is SplicesWrite for a range check accepted.
func (c *clone) splicesChecked(off, n int64) bool {
	if _, ok := c.dst.(blockdev.SpliceWriter); !ok {
		return false
	}
	first, last := c.geom.Region(off), c.geom.Region(off+n-1)
	return c.md.RangeHydrated(first, last-first+1)
}

func (c *clone) SpliceFrom(ctx context.Context, pipe int, off int64, n int, fua bool) error {
	if err := c.check(off, int64(n)); err != nil {
		return err
	}
	c.enter()
	defer c.exit()
	if !c.splicesChecked(off, int64(n)) {
		return blockdev.ErrNoSplice
	}
	if err := c.dst.(blockdev.SpliceWriter).SpliceFrom(pipe, off, n); err != nil {
		return fmt.Errorf("target: write destination at %d+%d: %w", off, n, err)
	}
	if fua {
		return c.flush(triggerFUA)
	}
	return nil
}

func (l *linear) SplicesWrite(off, n int64) bool {
	_, ok := l.dev.(blockdev.SpliceWriter)
	return ok && l.check(off, n) == nil
}

func (l *linear) SpliceFrom(_ context.Context, pipe int, off int64, n int, fua bool) error {
	if err := l.check(off, int64(n)); err != nil {
		return err
	}
	s, ok := l.dev.(blockdev.SpliceWriter)
	if !ok {
		return blockdev.ErrNoSplice
	}
	if err := s.SpliceFrom(pipe, l.offset+off, n); err != nil {
		return err
	}
	if fua {
		return l.dev.Sync()
	}
	return nil
}
