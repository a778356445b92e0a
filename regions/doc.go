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
//   - A region lock has at most one holder; waiters are served in turn and a
//     lock entry exists only while held or waited on (memory is bounded by
//     concurrency, not by device size).
package regions
