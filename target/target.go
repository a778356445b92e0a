package target

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors.
var (
	// ErrIO is returned for I/O that cannot be served (dm's EIO): a failed
	// copy, a write to an unhydrated region in ro/Fail mode. It wraps
	// syscall.EIO so the NBD server sends EIO.
	ErrIO = fmt.Errorf("target: I/O error: %w", syscall.EIO)
	// ErrRange is returned for I/O past the end of the target (ENOSPC on
	// writes in NBD terms, EINVAL on reads; the server checks bounds first).
	ErrRange = fmt.Errorf("target: I/O beyond the end of the device: %w", syscall.EINVAL)
	// ErrSuspended is returned by I/O on a suspended target; the daemon's
	// gate never lets that happen, so seeing it is a bug.
	ErrSuspended = errors.New("target: device is suspended")
	// ErrClosed is returned by any call after Close.
	ErrClosed = errors.New("target: closed")
)

// Target is what one table line builds: the I/O mapping of a device. The
// daemon calls it from many goroutines at once; every method is safe for
// concurrent use. I/O methods are never called while the target is
// suspended (the daemon drains and gates I/O first).
type Target interface {
	// Size is the target length in bytes (sectors × 512).
	Size() int64
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// WriteZeroes makes the range read back as zeroes. Not a discard.
	WriteZeroes(ctx context.Context, off, n int64, fua bool) error
	// Trim discards the range (NBD_CMD_TRIM / a discard bio).
	Trim(ctx context.Context, off, n int64) error
	// Flush makes every write acknowledged before it durable, data and
	// metadata (a FLUSH bio).
	Flush(ctx context.Context) error
	// Cache hints that the range will be read soon (NBD_CMD_CACHE).
	Cache(ctx context.Context, off, n int64) error

	// Status is the dm INFO status line after "<start> <len> <type> ",
	// exactly as dmsetup prints it for this target type.
	Status() string
	// Table is the dm TABLE status: the constructor arguments as loaded,
	// after "<start> <len> <type> ".
	Table() string
	// Message handles `dmsetup message <dev> 0 <args...>`.
	Message(ctx context.Context, args []string) error
	// Info is a structured snapshot for JSON status, metrics and progress.
	Info() Info

	// Suspend stops background work (waits for copies in flight, does not
	// cancel them) and commits metadata. I/O is already drained.
	Suspend(ctx context.Context) error
	// Resume restarts background work.
	Resume() error
	// Events is closed and replaced each time the target raises a dm event
	// (hydration complete, mode change, hydration stopped on errors); read it
	// again after each wake-up.
	Events() <-chan struct{}
	// Close releases every resource; idempotent; waits for goroutines.
	Close() error
}
