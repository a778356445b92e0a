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
