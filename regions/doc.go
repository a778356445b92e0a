// Package regions is the pure region math of a clone: geometry (bytes ↔
// regions, the partial last region, ranges of whole regions), a concurrent
// bitmap with find-next-unset and popcount, and per-region locks. No I/O.
//
// Invariants:
//   - Region r covers [r*RegionSize, min((r+1)*RegionSize, TargetSize)); only
//     the last region may be partial.
//   - Bitmap.Count() always equals the number of set bits: it changes only
//     when a bit actually flips (Set on a clear bit, Clear on a set bit).
//   - Bits beyond the last region are never set, so word scans need no
//     masking.
//   - A region lock has at most one holder. Locks are kept per block of 64
//     aligned regions (a mask), so a run is taken or released with one map
//     operation per block; an unlock wakes the block's waiters, who retry,
//     and a region somebody waits for is not taken by TryLock/TryLockRun. A
//     block's entry exists only while one of its regions is held or waited
//     on (memory is bounded by concurrency, not by device size).
package regions
