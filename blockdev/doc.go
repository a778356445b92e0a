// Package blockdev opens the devices a table names: local regular files and
// block devices, NBD exports (nbd://, nbds://, nbd+unix://, nbds+unix://)
// and http(s) objects read with Range requests (clone sources), behind one
// small interface (ReadAt, WriteAt, Size, Sync,
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
//   - A read-write File (a destination) has the kernel's readahead off
//     (POSIX_FADV_RANDOM), so its page cache holds 4 KiB pages, never the
//     large folios into which 4 KiB writes are slow; ReadAt reads ahead of
//     one sequential stream itself with POSIX_FADV_WILLNEED (readahead.go).
//   - SpliceTo (a File, a local source's handle) moves a range into a pipe
//     whole or fails; with dataOnly a range with a hole is ErrNoSplice
//     before anything is moved. A full pipe is ErrNoSplice, never a wait.
//     SpliceFrom (a File) writes what a pipe holds at an offset, all of it
//     or an error; a pipe holding too few bytes is an error, never a wait.
//   - Close is idempotent; calls after Close return ErrClosed.
//   - Remote sources (NBD, http) never write and only read: NBD is used
//     read-only (no write command is ever sent), http only with HEAD and
//     GET. A read either fills its buffer with the source's bytes or
//     fails: structured NBD replies must cover the request exactly once, a
//     Range reply must be exactly the range asked, of the pinned object.
//   - No remote call outlives its bounds: each attempt has its timeout
//     (connect, request), each call its RetryPolicy.Timeout; transient
//     failures are retried with exponential backoff and jitter, permanent
//     ones (bad requests, a changed object) fail at once. A request that
//     times out or is abandoned drops its NBD connection, and the call
//     returns only once no late reply can land in the caller's buffer.
//   - An http(s) source is pinned at open (ETag, or Last-Modified and
//     size): every read asks for that version and checks the reply's
//     validators; a changed object is ErrSourceChanged, never its bytes.
//   - A SharedSource (cache.go) serves several readers from one source: a
//     block is read from the source once while cached, concurrent misses
//     on it share one read, cached bytes never exceed the capacity and are
//     never modified, and a failed read is never cached.
package blockdev
