// Package faultdev wraps devices and metadata stores for reliability tests:
// a crash device that remembers what was synced and can produce the image a
// power failure would leave (pebble's CrashClone idea), and a fault plan
// that fails a chosen operation (the Nth I/O, every read of a range, every
// sync) with a chosen error.
//
// Invariants:
//   - A crash device's durable image changes only at Sync (and at
//     Discard/WriteZeroes, which this package treats as unsynced writes of
//     zeroes); after Crash every operation fails with ErrCrashed and the
//     durable image is frozen.
//   - A Plan counts every operation it sees, failed or not, so "fail the
//     Nth I/O for N = 0, 1, 2, …" walks every operation of a run.
package faultdev
