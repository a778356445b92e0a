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

// A SpliceWriter writes a range from a pipe without the bytes passing
// through the caller's memory (splice(2) from the pipe into the file), so
// that a server can move a request's payload from its socket into a pipe
// and from there into the file.
type SpliceWriter interface {
	// SpliceFrom writes the n bytes waiting in the pipe whose read end is
	// pipe at off, all of them, or fails; after a failure the range's
	// contents, and what is left in the pipe, are undefined.
	SpliceFrom(pipe int, off int64, n int) error
}

var _ SpliceWriter = (*File)(nil)

// SpliceFrom writes [off, off+n) of the file from the pipe. The bytes must
// all be in the pipe already: a pipe that runs dry is an error, never a
// wait.
func (d *File) SpliceFrom(pipe int, off int64, n int) error {
	if d.readOnly {
		return ErrReadOnly
	}
	if d.closed.Load() {
		return ErrClosed
	}
	if off < 0 || n <= 0 || off+int64(n) > d.size {
		return fmt.Errorf("blockdev: splice into %s at %d+%d: beyond its %d bytes", d.path, off, n, d.size)
	}
	fd := int(d.f.Fd())
	pos, left := off, n
	for left > 0 {
		m, err := unix.Splice(pipe, nil, fd, &pos, left, unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN || err == nil && m == 0:
			return fmt.Errorf("blockdev: splice into %s at %d: the pipe holds %d bytes too few", d.path, pos, left)
		case err != nil:
			return fmt.Errorf("blockdev: splice into %s at %d+%d: %w", d.path, pos, left, err)
		}
		left -= int(m)
	}
	return nil
}
