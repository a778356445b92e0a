// Package daemon is nbdclone's long-running process, its device-mapper: a
// registry of named devices (each a live table and an optional loaded one),
// dm's create/load/suspend/resume/message/remove operations, the control API
// (HTTP+JSON on a unix socket) with its typed Client, metrics, and restart
// recovery from the state directory.
//
// Invariants:
//
//  1. NBD clients never see a table swap. Every I/O enters the device's gate;
//     suspend closes the gate and waits for the I/O in flight to drain before
//     the target is suspended, and new I/O waits (it is not failed) until
//     resume reopens the gate. A target is only ever swapped, suspended or
//     closed while the gate is closed and drained.
//  2. A device's size never changes: a table of another length is refused at
//     load, because NBD clients learn the size once, at handshake.
//  3. Control operations on one device are serialised (load, suspend, resume,
//     remove); status, table, message and info read the live target through a
//     counted handle, and a target is closed only after its last reader left.
//  4. A failed resume leaves the device running its old table: when the new
//     table cannot be built, the old one is rebuilt and resumed.
//  5. The state directory holds exactly the live table of every device,
//     written atomically (temp file, fsync, rename, fsync of the directory)
//     after the table is live; a restart rebuilds every device from it, and a
//     device that fails to rebuild is kept and reported, never fatal.
//  6. JSON status and metrics read Info snapshots and never force a metadata
//     commit; only the dm status line does (as dm-clone's status does).
//  7. Shutdown drains and suspends every device (committing metadata) before
//     targets are closed, and waits for every goroutine it started.
//  8. Raising an event never blocks: every subscriber (an events stream,
//     the --on-event runner) has a bounded buffer; what does not fit is
//     dropped for that subscriber alone, and a stream is told how many at
//     the gap (events.go).
//  9. Metering an NBD request costs atomic adds only: no lock, no
//     allocation (iostats.go, internal/histogram); metrics are assembled at
//     scrape time.
//  10. Clone families (family.go): a clone whose <source dev> is dev:NAME reads
//     device NAME in process, through NAME's gate. While any table holds
//     NAME open, NAME is a parent: its writes, write-zeroes and trims fail
//     with EPERM (existing connections) and new connections are told
//     READ_ONLY; writes in flight when a child opens it finish first; remove
//     is refused, naming the children; no device reads itself through a
//     chain (cycles are refused). Restart restores parents before children;
//     shutdown stops children first. A redirect copies every region the
//     parent holds into the child before the child's metadata records the
//     new source, and the state file gets the new table last.
//  11. Clones naming the same path or URI share one source reader and one
//     bounded cache (sources.go); the reader closes with its last user.
//  12. While Run runs, the runtime's soft memory limit is derived from the
//     built clone tables (memlimit.go: 96 MiB + Σ(bitmap + 8 MiB +
//     2 × a remote source's copy window), at least 96 MiB) and recomputed
//     at every device event; a GOMEMLIMIT in
//     the environment wins. Run gives the previous limit back when it ends.
package daemon
