// Package hydrate copies regions from a clone's source to its destination:
// a kcopyd-like Copier with pooled buffers, and the Sweeper that runs
// background hydration the way dm-clone does (linear sweep from a remembered
// offset, contiguous batches of up to hydration_batch_size regions, at most
// hydration_threshold regions in flight, no new batch while user I/O is in
// flight) plus what dm-clone lacks: a bound on consecutive copy failures
// (known issue 3), hinted regions copied ahead of the sweep (known issue 1),
// a floor on progress under constant user I/O, a byte-rate throttle, and
// enough bytes in flight to hide a remote source's round trip.
//
// Invariants:
//   - The Sweeper never has more regions in flight than its effective
//     threshold: hydration_threshold, raised for a remote source to its
//     window (WindowBytes/RegionSize, capped by a quarter second of the
//     rate). A threshold of 0 stops it, remote or not.
//   - Hinted regions are claimed before the sweep's next batch and are not
//     held back by user I/O; without hydration enabled (no_hydration,
//     stopped on errors, threshold 0) hints are dropped: nothing is copied.
//   - With a rate, the bytes of the batches started over any period exceed
//     rate × period by at most a quarter second's burst and one batch.
//   - Pause waits for copies in flight (never cancels them) and guarantees
//     that no copy starts until Resume.
//   - A failed copy never marks anything hydrated (the Planner only marks
//     on success); failed regions are retried on a later pass, after a
//     backoff. MaxErrors consecutive failed batches (batches that were in
//     flight together count once), or MaxRegionErrors consecutive failures
//     of one region, stop the sweep and report why.
//   - The Copier writes only to the destination and only at the offset it
//     read from; a source extent it zeroes instead of copying is one the
//     source reported as reading zeroes; a copy with any failed chunk fails
//     as a whole; its chunks in flight never exceed InFlightBytes over all
//     copies together (one chunk per copy without it).
//   - Copy (background, hints, split, redirect) leaves at most EvictBehind
//     copied bytes in the destination's page cache: older chunks are waited
//     for and dropped through a descriptor of the copier's own, so a
//     writeback error still reaches the destination's fdatasync. CopyCached
//     (NBD_CMD_CACHE, the copy before a partial write) keeps its chunks.
//   - Between two regular files, chunks are copied with copy_file_range; a
//     source that ends early fails the copy (never zeroes), and the kernel's
//     refusal before anything was copied falls back to read and write.
//   - A regular file destination has one write in flight at a time.
package hydrate
