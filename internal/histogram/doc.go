// Package histogram is a latency histogram cheap enough for every I/O:
// fixed bucket bounds, one atomic counter per bucket, no lock and no
// allocation on Observe. A reader takes a Snapshot (allocates) and turns
// it into whatever it exports (the daemon: Prometheus histograms).
//
// Invariants:
//
//  1. Observe never blocks, locks or allocates.
//  2. A Snapshot's buckets are cumulative and non-decreasing, and its last
//     bucket (+Inf) equals its Count; counts never go down between
//     snapshots of one Histogram.
//  3. Bounds are fixed at construction; the zero Histogram is not usable
//     (New makes one).
package histogram
