package blockdev

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// File is a local regular file or block device.
type File struct {
	f        *os.File
	path     string
	size     int64
	lbs      int64
	block    bool // a block device: BLKDISCARD/BLKZEROOUT instead of fallocate
	readOnly bool
	closed   atomic.Bool
	// noZeroRange is set once fallocate(ZERO_RANGE) reported EOPNOTSUPP, so
	// WriteZeroes goes straight to its fallback afterwards.
	noZeroRange atomic.Bool
	// ra does the readahead of a read-write file, whose descriptor has the
	// kernel's turned off (readahead.go); nil for a read-only one.
	ra *readahead
}

var (
	_ Device = (*File)(nil)
	_ Reader = (*File)(nil)
)

// OpenFile opens a regular file or block device read-write. The file must
// exist: a destination is never created implicitly.
func OpenFile(path string) (*File, error) { return openFile(path, false) }

// OpenFileReadOnly opens a regular file or block device read-only: every
// write method returns ErrReadOnly and the descriptor itself is O_RDONLY.
func OpenFileReadOnly(path string) (*File, error) { return openFile(path, true) }

func openFile(path string, readOnly bool) (*File, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("blockdev: open %s: %w", path, err)
	}
	d := &File{f: f, path: path, readOnly: readOnly, lbs: 512}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blockdev: stat %s: %w", path, err)
	}
	switch mode := fi.Mode(); {
	case mode.IsRegular():
		d.size = fi.Size()
	case mode&os.ModeDevice != 0 && mode&os.ModeCharDevice == 0:
		d.block = true
		var size uint64
		if err := ioctlPtr(f.Fd(), unix.BLKGETSIZE64, unsafe.Pointer(&size)); err != nil {
			f.Close()
			return nil, fmt.Errorf("blockdev: BLKGETSIZE64 %s: %w", path, err)
		}
		d.size = int64(size)
		lbs, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("blockdev: BLKSSZGET %s: %w", path, err)
		}
		d.lbs = int64(lbs)
	default:
		f.Close()
		return nil, fmt.Errorf("blockdev: %s is neither a regular file nor a block device", path)
	}
	if !readOnly {
		// A destination: pages in 4 KiB folios, readahead done by ReadAt.
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM); err != nil {
			f.Close()
			return nil, fmt.Errorf("blockdev: posix_fadvise(RANDOM) %s: %w", path, err)
		}
		d.ra = &readahead{}
	}
	return d, nil
}

// Path is the path the device was opened with.
func (d *File) Path() string { return d.path }

// Fd is the descriptor, for copy_file_range between local files.
func (d *File) Fd() uintptr { return d.f.Fd() }

func (d *File) Size() int64             { return d.size }
func (d *File) LogicalBlockSize() int64 { return d.lbs }

func (d *File) ReadAt(p []byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, ErrClosed
	}
	n, err := d.f.ReadAt(p, off)
	if err == nil {
		d.readAhead(off, int64(n))
	}
	return n, err
}

// readAhead records a read of n bytes at off that succeeded and prefetches
// what follows it, for a destination (readahead.go). It comes after the
// read, so the read's own pages are asked for first.
func (d *File) readAhead(off, n int64) {
	if d.ra == nil {
		return
	}
	if pfOff, pfLen := d.ra.next(off, n); pfLen > 0 {
		prefetch(d.f.Fd(), pfOff, pfLen)
	}
}

func (d *File) WriteAt(p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, ErrReadOnly
	}
	if d.closed.Load() {
		return 0, ErrClosed
	}
	return d.f.WriteAt(p, off)
}

func (d *File) Sync() error {
	if d.readOnly {
		return ErrReadOnly
	}
	if d.closed.Load() {
		return ErrClosed
	}
	if err := unix.Fdatasync(int(d.f.Fd())); err != nil {
		return fmt.Errorf("blockdev: fdatasync %s: %w", d.path, err)
	}
	return nil
}

func (d *File) Discard(off, n int64) error {
	if d.readOnly {
		return ErrReadOnly
	}
	if d.closed.Load() {
		return ErrClosed
	}
	if n == 0 {
		return nil
	}
	if d.block {
		r := [2]uint64{uint64(off), uint64(n)}
		if err := ioctlRange(d.f.Fd(), unix.BLKDISCARD, &r); err != nil {
			if err == unix.EOPNOTSUPP || err == unix.ENOTTY || err == unix.EINVAL {
				return fmt.Errorf("blockdev: BLKDISCARD %s: %w", d.path, ErrNotSupported)
			}
			return fmt.Errorf("blockdev: BLKDISCARD %s: %w", d.path, err)
		}
		return nil
	}
	err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == unix.EOPNOTSUPP {
		return fmt.Errorf("blockdev: punch hole %s: %w", d.path, ErrNotSupported)
	}
	if err != nil {
		return fmt.Errorf("blockdev: punch hole %s: %w", d.path, err)
	}
	return nil
}

func (d *File) WriteZeroes(off, n int64) error {
	if d.readOnly {
		return ErrReadOnly
	}
	if d.closed.Load() {
		return ErrClosed
	}
	if n == 0 {
		return nil
	}
	if !d.noZeroRange.Load() {
		var err error
		if d.block {
			r := [2]uint64{uint64(off), uint64(n)}
			err = ioctlRange(d.f.Fd(), unix.BLKZEROOUT, &r)
		} else {
			err = unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		}
		switch err {
		case nil:
			return nil
		case unix.EOPNOTSUPP, unix.ENOTTY, unix.EINVAL:
			d.noZeroRange.Store(true)
		default:
			return fmt.Errorf("blockdev: zero range %s: %w", d.path, err)
		}
	}
	return writeZeroBuffers(d, off, n)
}

// Close is idempotent.
func (d *File) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	return d.f.Close()
}
