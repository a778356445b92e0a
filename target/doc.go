// Package target builds device-mapper style targets from table lines and
// maps a device's I/O onto them: `clone` (dm-clone's I/O mapping,
// dm-clone-target.c) and `linear`. Table and message errors carry
// device-mapper's own text (DMError).
//
// Invariants of the clone target (tested in model_test.go and io_test.go):
//   - Source is never written: it is held as a blockdev.Reader.
//   - Reads never block on hydration: an unhydrated region is read from the
//     source, a hydrated one from the destination.
//   - One writer per unhydrated region: background copies, on-demand copies
//     (partial writes, partial write-zeroes, CACHE), whole-region
//     overwrites and discards of unhydrated regions all take the region's
//     lock, and re-check the bitmap under it; a user write to a region the
//     bitmap says is hydrated goes straight to the destination, so a region
//     is only marked hydrated once no copy of it can still land.
//   - A region is marked hydrated only after its copy or overwrite
//     succeeded; a failed copy fails the user write that needed it (EIO)
//     and leaves the region unhydrated.
//   - Durability: FLUSH and FUA commit metadata when it changed in this
//     transaction (destination sync, then the metadata write), otherwise
//     sync the destination; concurrent flushes share one commit. Metadata is
//     also committed every second while resumed, at suspend, and before a
//     status line (dm-clone's rules).
//   - Discards count whole regions only (the partial last region counts
//     when covered to the end); a discard covering none is a no-op.
//   - Modes: in ro, writes needing new metadata fail with EIO and discards
//     of unhydrated regions are ignored; in Fail every I/O fails with EIO.
//   - Reads as hints (ours): a read served from the source queues its
//     regions for hydration ahead of the background sweep, unless
//     no_read_hints or hydration is off; CACHE hydrates its range before it
//     returns. Neither changes what a read returns.
//   - A read is spliced (Splicer) run by run exactly as ReadAt reads it:
//     hydrated runs from the destination, unhydrated ones from the source
//     (counted and hinted as ReadAt does). A source that cannot splice (a
//     remote one) makes any read with an unhydrated region ErrNoSplice
//     before anything moves, and the caller uses ReadAt.
//   - A write is taken from a pipe (SpliceWriter) only when WriteAt would
//     send all of it to the destination in one write: every region
//     hydrated. Otherwise ErrNoSplice before anything leaves the pipe.
//   - A remote source (blockdev.Remote) gets its window in flight: the
//     sweep's threshold and batch are raised to it, never from a threshold
//     of 0; hydration_rate throttles background and hinted copies. The
//     default status line stays dm-clone's byte for byte: ours appear only
//     when set (no_read_hints, hydration_rate).
//   - A pinned source (blockdev.Identifier) that changed is refused at
//     construction (Failed to load metadata: the source changed).
//   - A clone's <source dev> may be "dev:NAME" (DeviceSourcePrefix), another
//     device of the daemon, which opens it (Env.OpenSource); Resolve leaves
//     it as written. RecordSource rewrites the source in the metadata for
//     a redirect.
//   - A target is built suspended; I/O methods are only called while
//     resumed (the daemon's gate guarantees it).
package target
