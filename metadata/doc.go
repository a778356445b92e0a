// Package metadata is a clone's persistent region bitmap: a superblock and
// 4096-byte bitmap chunks (32768 regions each) in fixed, checksummed slots
// of one file, written through a journal (filekv.go); an in-core bitmap
// with dirty-chunk tracking, transactional commits and dm-clone's metadata
// modes rw → ro → Fail.
//
// Invariants:
//   - Durability order: Commit snapshots the dirty chunks, then syncs the
//     destination, then writes the chunks in a synced journaled Put. A
//     bit therefore reaches the store only after the data that made it true
//     is durable on the destination. A crash at any point leaves every
//     persisted bit backed by durable data.
//   - Commits go in bounded batches (at most CommitBatchChunks chunks and
//     about 1 MiB coded each): snapshot the batch, sync the destination,
//     write the batch; then the next. Memory holds one batch, not every
//     dirty chunk (a random 10% hydration of 1 TiB dirties all 8192 chunks
//     of a 4 KiB-region bitmap). This is safe because each chunk stands
//     alone and bits only go from 0 to 1: every batch written says only
//     what the destination already held at its sync, so a crash or failure
//     after some batches leaves the store claiming less than the
//     destination holds, never more. A failed batch aborts the commit as
//     below; the batches before it stay committed and are counted as such.
//   - Bits only go from 0 to 1 while in rw mode; nothing is written in ro or
//     Fail mode. A failed commit reloads the committed bitmap (bits since the
//     last commit are dropped: those regions read from the source again) and
//     switches to ro; if the reload fails too, to Fail. Fail is sticky; only
//     a new Store (a table reload) returns to rw.
//   - A dirty mark is never lost: a setter flips the bit, then marks its
//     chunk; Commit collects and clears marks atomically per word, then reads
//     the chunk words, so any bit set before its mark is in that read.
//   - Memory: one bit per region in core, never one key per region in the
//     store. A stored chunk is coded (chunk.go: all ones in one byte, sparse
//     or dense bits Rice-coded, raw only when coding would not be smaller);
//     decoding refuses anything malformed with ErrCorrupt, never panics.
//     Version 1 stores (raw chunks only) are read and upgraded at open.
//     Once every region is hydrated and committed the in-core bitmap is
//     released (dm-clone known issue 2).
//   - A store pinned to a source identity (SourceID: an http(s) object's
//     ETag, or Last-Modified and size) is refused with ErrSourceChanged
//     when reopened on a different one: a region hydrated from one version
//     never sits next to regions read from another.
//   - Every Put is atomic and durable when it returns: its entries go to
//     the journal (one write, checksummed, synced), then to their slots
//     (synced). Opening replays a journal that checks out; it always holds
//     the last Put, so a slot torn by a crash is rewritten whole. A slot
//     that fails its checksum outside the journal is ErrCorrupt, never
//     zeroes. Nothing is memory-mapped: a full filesystem is a write error
//     (ErrNoSpace, the store goes ro), and rewriting stored chunks needs
//     no new space.
//   - The badger store of an earlier nbdclone is converted at open, once:
//     its keys are copied, then its MANIFEST removed (a conversion that
//     stops before that starts again), then its other files.
//   - A store is opened by one Store at a time (flock on its file); a
//     store made for another region size or target size is refused, and a
//     non-empty directory that is not a store is never written.
package metadata
