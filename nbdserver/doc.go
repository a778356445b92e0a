// Package nbdserver serves Exports over the NBD protocol (fixed newstyle
// handshake, many requests in flight per connection), knowing nothing of
// what is behind an Export.
//
// Protocol (doc/proto.md of NetworkBlockDevice/nbd): options
// NBD_OPT_EXPORT_NAME, ABORT, LIST, INFO, GO (NBD_INFO_EXPORT, NAME,
// DESCRIPTION, BLOCK_SIZE) and STRUCTURED_REPLY; commands READ, WRITE,
// DISC, FLUSH, TRIM, WRITE_ZEROES and CACHE with the FUA, NO_HOLE,
// FAST_ZERO and DF flags. STARTTLS, metadata contexts, BLOCK_STATUS and
// extended headers are answered NBD_REP_ERR_UNSUP / EINVAL for now; the
// session struct in negotiate.go marks where they go.
//
// Invariants:
//
//  1. What is advertised is what is enforced. A connection takes one
//     snapshot of Export.Flags at NBD_OPT_GO / NBD_OPT_EXPORT_NAME; a command
//     or command flag it does not advertise fails with EINVAL and never
//     reaches the Export.
//  2. An Export only sees valid requests: 0 < n, [off, off+n) within Size,
//     and n ≤ MaxPayload for ReadAt and WriteAt; never a write on an export
//     that advertised ReadOnly (EPERM). Out of range is ENOSPC for WRITE and
//     WRITE_ZEROES, EINVAL otherwise, as the spec asks.
//  3. The stream never loses framing. Every request but NBD_CMD_DISC gets
//     exactly one reply (or the connection is closed); a WRITE's payload is
//     always consumed, even when the WRITE is rejected; each reply is written
//     whole under one lock. A protocol violation the server cannot answer
//     (bad magic, unknown client flags, oversized option) closes only that
//     connection.
//  4. Export errors never close the connection. One wrapping a
//     syscall.Errno is sent as that errno when the spec defines it (EDQUOT
//     and EFBIG as ENOSPC, EROFS as EPERM), anything else as EIO.
//  5. Memory per connection is bounded before it is allocated: option data
//     ≤ 64 KiB; at most MaxInFlight requests and MaxInFlightBytes of READ and
//     WRITE payload in flight, beyond which the reader stops reading the
//     socket. A rejected WRITE's payload is skipped, not buffered.
//  6. A slow request does not hold back the ones behind it: each runs in its
//     own worker and replies as soon as it is done, in any order (the spec
//     allows it). Only a connection's full in-flight budget stops reading.
//  7. A reply never carries bytes the request did not read: pooled read
//     buffers are cleared before the Export fills them.
//  8. Lifecycle: every goroutine is tracked and Close waits for all of them.
//     The context given to Export methods is cancelled when its connection
//     closes. An export opened with Exports.Open is released exactly once,
//     after the connection's last request has returned. Shutdown (Close,
//     Disconnect, a cancelled Serve) stops reading at once and gives
//     requests in flight ShutdownGrace to finish before closing; NBD_CMD_DISC
//     waits for them fully.
package nbdserver
