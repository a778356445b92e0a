package blockdev

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrNoSplice: the range cannot be moved into the pipe (it holds a hole
// and dataOnly was asked, the pipe has no room, the device has no file
// behind it). Nothing is lost: the caller reads the range into a buffer
// instead. The pipe's contents are undefined afterwards.
var ErrNoSplice = errors.New("blockdev: range cannot be spliced")

// A Splicer moves a range of its bytes into a pipe without copying them
// (splice(2): the pipe takes references to page-cache pages), so that a
// server can move them on into a socket the same way.
type Splicer interface {
	// SpliceTo moves the n bytes at off into the pipe whose write end is
	// pipe, all of them, or fails; after a failure the pipe's contents are
	// undefined and the caller must drop it. With dataOnly it fails with
	// ErrNoSplice rather than move a range that has a hole in it, so a
	// caller that describes holes (NBD structured replies) can read that
	// range into a buffer instead. ctx bounds waits that are not I/O (a
	// source device's suspension).
	SpliceTo(ctx context.Context, pipe int, off int64, n int, dataOnly bool) error
}

var _ Splicer = (*File)(nil)

// SpliceTo moves [off, off+n) of the file into the pipe, with the same
// readahead as ReadAt. The pipe's end is used non-blocking: a full pipe is
// ErrNoSplice, not a wait.
func (d *File) SpliceTo(_ context.Context, pipe int, off int64, n int, dataOnly bool) error {
	if d.closed.Load() {
		return ErrClosed
	}
	if off < 0 || n <= 0 || off+int64(n) > d.size {
		return fmt.Errorf("blockdev: splice %s at %d+%d: beyond its %d bytes", d.path, off, n, d.size)
	}
	if dataOnly {
		// Map counts unwritten extents without data in the page cache as
		// holes, as SEEK_DATA does on ext4 and XFS.
		ext, err := d.Map(off, int64(n))
		if err != nil {
			return err
		}
		if len(ext) != 1 || ext[0].Hole || ext[0].Length != int64(n) {
			return ErrNoSplice
		}
	}
	fd := int(d.f.Fd())
	pos, left := off, n
	for left > 0 {
		m, err := unix.Splice(fd, &pos, pipe, nil, left, unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return ErrNoSplice // the pipe is full
		case err != nil:
			return fmt.Errorf("blockdev: splice %s at %d+%d: %w", d.path, pos, left, err)
		case m == 0:
			return fmt.Errorf("blockdev: splice %s at %d: %w", d.path, pos, ErrShrunk)
		}
		left -= int(m)
	}
	d.readAhead(off, int64(n))
	return nil
}
