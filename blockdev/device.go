package blockdev

import (
	"errors"
	"io"
)

// Sentinel errors. Test with errors.Is.
var (
	// ErrReadOnly is returned by WriteAt, Discard and WriteZeroes on a device
	// opened read-only (every source).
	ErrReadOnly = errors.New("blockdev: device is read-only")
	// ErrNotSupported is returned by Discard or WriteZeroes where the device
	// cannot do it natively; callers fall back or turn the feature off.
	ErrNotSupported = errors.New("blockdev: operation not supported")
	// ErrClosed is returned by any call after Close.
	ErrClosed = errors.New("blockdev: device is closed")
	// ErrShrunk: the file is shorter than when it was opened (truncated
	// under us); the missing part is not zeroes.
	ErrShrunk = errors.New("blockdev: the file shrank since it was opened")
)

// Reader is the read-only view of a device. A clone's source is held as a
// Reader so nothing in the clone's code path can write it (invariant 2).
type Reader interface {
	io.ReaderAt
	// Size is the device size in bytes, fixed for the life of the handle.
	Size() int64
	// LogicalBlockSize is the smallest addressable unit in bytes (512 for
	// files, BLKSSZGET for block devices).
	LogicalBlockSize() int64
	Close() error
}

// Device is a read-write device (a clone's destination, a linear target).
type Device interface {
	Reader
	io.WriterAt
	// Sync makes every completed write durable (fdatasync, BLKFLSBUF-free
	// fsync of a block device, NBD flush).
	Sync() error
	// Discard deallocates [off, off+n). Afterwards the range reads as zeroes
	// on files and as whatever the device returns on block devices.
	// ErrNotSupported where the device can't.
	Discard(off, n int64) error
	// WriteZeroes makes [off, off+n) read back as zeroes, efficiently where
	// the device can (FALLOC_FL_ZERO_RANGE, BLKZEROOUT), by writing zero
	// buffers otherwise. It never returns ErrNotSupported.
	WriteZeroes(off, n int64) error
}
