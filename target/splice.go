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

// SpliceTo splices a read that ReadAt would serve from one device: all of
// it hydrated (the destination) or none of it (the source, counted and
// hinted as ReadAt does). A read across both is ErrNoSplice.
func (c *clone) SpliceTo(ctx context.Context, pipe int, off int64, n int, dataOnly bool) error {
	if err := c.check(off, int64(n)); err != nil {
		return err
	}
	c.enter()
	defer c.exit()
	runs := 0
	var hydrated bool
	_ = c.runs(off, int64(n), func(h bool, _, _ int64) error {
		hydrated = h
		runs++
		return nil
	})
	if runs != 1 {
		return blockdev.ErrNoSplice
	}
	if hydrated {
		return spliceFrom(ctx, c.dst, pipe, off, n, dataOnly, "destination")
	}
	start := time.Now()
	if err := spliceFrom(ctx, c.src, pipe, off, n, dataOnly, "source"); err != nil {
		return err
	}
	c.stats.sourceRead.Add(int64(n))
	c.obs.sourceRead.Since(start)
	c.hintRead(off, int64(n))
	return nil
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
