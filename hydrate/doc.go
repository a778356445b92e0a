// Package hydrate copies regions from a clone's source to its destination:
// a kcopyd-like Copier with pooled buffers, and the Sweeper that runs
// background hydration the way dm-clone does (linear sweep from a remembered
// offset, contiguous batches of up to hydration_batch_size regions, at most
// hydration_threshold regions in flight, no new batch while user I/O is in
// flight) plus what dm-clone lacks: a bound on consecutive copy failures
// (known issue 3) and a floor on progress under constant user I/O.
//
// Invariants:
//   - The Sweeper never has more than Threshold regions in flight; a
//     threshold of 0 stops it.
//   - Pause waits for copies in flight (never cancels them) and guarantees
//     that no copy starts until Resume.
//   - A failed copy never marks anything hydrated (the Planner only marks
//     on success); failed regions are retried on a later pass, after a
//     backoff, and MaxErrors consecutive failures stop the sweep and report.
//   - The Copier writes only to the destination and only at the offset it
//     read from; buffers come from a pool, one per copy in flight.
package hydrate
