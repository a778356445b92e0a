// Package blockdev opens the devices a table names: local regular files and
// block devices, behind one small interface (ReadAt, WriteAt, Size, Sync,
// Discard, WriteZeroes), so they can be wrapped by fault injectors and
// counters in tests.
//
// Invariants:
//   - A device opened read-only (every clone source) has an O_RDONLY
//     descriptor, and its write methods return ErrReadOnly without a
//     syscall; a clone holds its source as a Reader, which has none.
//   - Size is fixed at open (BLKGETSIZE64 for block devices, stat for
//     files).
//   - Discard punches holes in files (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE) and
//     issues BLKDISCARD on block devices; ErrNotSupported where neither
//     works. WriteZeroes always leaves zeroes that read back, natively where
//     it can, with zero buffers where it can't.
//   - Sync is fdatasync: everything written before it is durable after it.
//   - Close is idempotent; calls after Close return ErrClosed.
package blockdev
