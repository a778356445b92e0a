package blockdev

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// maxMapExtents bounds the extents one Map call returns: each costs a
// syscall or two, and callers ask again for the rest.
const maxMapExtents = 1024

var _ Mapper = (*File)(nil)

// Map describes [off, off+n) of a regular file with SEEK_DATA/SEEK_HOLE:
// holes read as zeroes, so they are Hole and Zero; everything else is data.
// A block device, or a filesystem without SEEK_DATA, is all data. It
// describes at most maxMapExtents extents, and never beyond off+n or the
// device size.
//
// The file may change while it is mapped (SEEK_DATA runs concurrently with
// writes): each extent is what the file held at some moment during the
// call, which is all an NBD client can ask of a map.
func (d *File) Map(off, n int64) ([]Extent, error) {
	if d.closed.Load() {
		return nil, ErrClosed
	}
	if off < 0 || n <= 0 || off >= d.size {
		return nil, fmt.Errorf("blockdev: map %s: range %d+%d outside the device (size %d)", d.path, off, n, d.size)
	}
	end := min(off+n, d.size)
	if d.block {
		return []Extent{{Length: end - off}}, nil
	}
	fd := int(d.f.Fd())
	var extents []Extent
	add := func(length int64, hole bool) {
		if k := len(extents); k > 0 && extents[k-1].Hole == hole {
			extents[k-1].Length += length
			return
		}
		extents = append(extents, Extent{Length: length, Hole: hole, Zero: hole})
	}
	for off < end && len(extents) < maxMapExtents {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO):
			// No data at or after off: a hole up to the end of the file,
			// if the file still ends where it did. Past a truncation there
			// is nothing, not zeroes: map what is left and fail after it,
			// so a reader reads (and fails) instead of trusting a hole.
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				return nil, fmt.Errorf("blockdev: stat %s: %w", d.path, err)
			}
			if st.Size >= end {
				add(end-off, true)
				return extents, nil
			}
			if st.Size > off {
				add(st.Size-off, true)
			}
			if len(extents) > 0 {
				return extents, nil
			}
			return nil, fmt.Errorf("blockdev: map %s at %d: %w (now %d bytes, %d when opened)",
				d.path, off, ErrShrunk, st.Size, d.size)
		case err != nil:
			if len(extents) == 0 && (errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)) {
				// No SEEK_DATA on this filesystem: all data.
				return []Extent{{Length: end - off}}, nil
			}
			if len(extents) > 0 {
				return extents, nil // what was mapped so far is right
			}
			return nil, fmt.Errorf("blockdev: SEEK_DATA %s at %d: %w", d.path, off, err)
		case data > off:
			next := min(data, end)
			add(next-off, true)
			off = next
			continue
		case data < off:
			// Not what lseek promises; say data rather than guess a hole.
			add(end-off, false)
			return extents, nil
		}
		hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
		if err != nil || hole <= off {
			// Every file has a hole at its end, so this is a failure or a
			// race with truncation: the rest is data, the safe answer.
			add(end-off, false)
			return extents, nil
		}
		next := min(hole, end)
		add(next-off, false)
		off = next
	}
	return extents, nil
}

// Filesystem magic numbers (statfs f_type) whose fallocate implements
// FALLOC_FL_ZERO_RANGE as a metadata operation.
const (
	ext4Magic = 0xEF53
	xfsMagic  = 0x58465342
)

// ZeroesFast reports whether WriteZeroes is done natively here, without
// writing zero buffers, so an NBD fast-zero request can be honoured:
// FALLOC_FL_ZERO_RANGE on ext4 or XFS (other filesystems are not assumed to
// have it: tmpfs has not), BLKZEROOUT on a block device whose queue offloads
// write-zeroes (otherwise the kernel writes zero pages itself). Once a
// native zero failed as unsupported, never.
func (d *File) ZeroesFast() bool {
	if d.readOnly || d.closed.Load() || d.noZeroRange.Load() {
		return false
	}
	if d.block {
		return blockWriteZeroesOffloaded(d.f)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(d.f.Fd()), &st); err != nil {
		return false
	}
	switch uint32(st.Type) {
	case ext4Magic, xfsMagic:
		return true
	default:
		return false
	}
}

// blockWriteZeroesOffloaded reads the queue's write_zeroes_max_bytes in
// sysfs (a partition's queue is its disk's).
func blockWriteZeroesOffloaded(f *os.File) bool {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	dir := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	for _, p := range []string{dir + "/queue/write_zeroes_max_bytes", dir + "/../queue/write_zeroes_max_bytes"} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		return err == nil && v > 0
	}
	return false
}
