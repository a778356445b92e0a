// Package nbdserver serves Exports over the NBD protocol (fixed newstyle
// handshake, many requests in flight per connection), knowing nothing of
// what is behind an Export.
//
// Protocol (doc/proto.md of NetworkBlockDevice/nbd): options
// NBD_OPT_EXPORT_NAME, ABORT, LIST, INFO, GO (NBD_INFO_EXPORT, NAME,
// DESCRIPTION, BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT,
// SET_META_CONTEXT and STARTTLS; commands READ, WRITE, DISC, FLUSH, TRIM,
// WRITE_ZEROES, CACHE and BLOCK_STATUS with the FUA, NO_HOLE, FAST_ZERO, DF
// and REQ_ONE flags. Extended headers are answered NBD_REP_ERR_UNSUP.
//
// READ replies, when structured, send zero runs of at least 64 KiB (in
// 4 KiB blocks aligned on the export) as NBD_REPLY_TYPE_OFFSET_HOLE chunks,
// unless the client set DF; shorter reads are sent as one data chunk.
//
// READ replies of 128 KiB to about 8 MiB on a plain socket (not TLS), from
// an Export that is also a Splicer, are spliced: the export moves the bytes
// from its file into pipes of 1 MiB, one per piece of the read (page
// references, no copy), the writer sends the reply header and moves them
// on into the socket. A range the export will not splice (a hole while
// holes could be described, bytes not in a file, no pipe to be had)
// is read into a buffer as any other.
//
// WRITE payloads of 128 KiB to 8 MiB on a TCP connection (not TLS), to an
// Export that is also a SpliceWriter, are spliced the other way: the
// reader moves the payload from the socket into pipes (512 KiB each: a
// socket's buffers take a pipe slot per page or segment), the worker has
// the export move it into its file. An export that will not take it
// (ErrNoSplice) gets it with WriteAt from the pipes' bytes; a payload that
// does not fit its pipes is read into a buffer, and after four such in a
// row a connection stops splicing writes. Unix sockets are not spliced: their
// buffers' linear part would be copied into the pipe anyway.
//
// Metadata contexts come from an Export that is also an Extenter: the
// server offers exactly the contexts it names. LIST_META_CONTEXT with no
// query lists them all and "namespace:" lists a namespace; SET selects
// exact names only. Unknown names select nothing (not an error).
//
// TLS (Options.TLS): off (STARTTLS gets NBD_REP_ERR_POLICY), on (offered),
// or require (the spec's FORCEDTLS: before STARTTLS every option but ABORT
// gets NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME ends the connection).
// ServeListener may restrict a listener to an allowlist of exports.
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
//     always consumed, even when the WRITE is rejected; each reply is queued
//     whole and written by one writer at a time, in queue order (replies
//     queued while requests are in flight share a writev, cut where a
//     reply's data is spliced from its pipe; the writer yields once to let
//     them). A worker does not wait for its reply to be
//     written: the writer gives back the reply's read buffer and the
//     request's admission once it is. A protocol violation the server
//     cannot answer (bad magic, unknown client flags, oversized option)
//     closes only that connection.
//  4. Export errors never close the connection. One wrapping a
//     syscall.Errno is sent as that errno when the spec defines it (EDQUOT
//     and EFBIG as ENOSPC, EROFS as EPERM), anything else as EIO.
//  5. Memory per connection is bounded before it is allocated: option data
//     ≤ 64 KiB; at most MaxInFlight requests and MaxInFlightBytes of READ and
//     WRITE payload in flight (a request is in flight until its reply is
//     written), beyond which the reader stops reading the socket. A rejected WRITE's payload is skipped, not buffered. A
//     BLOCK_STATUS reply is at most 128 KiB per selected context.
//  6. A slow request does not hold back the ones behind it: each runs in its
//     own worker and replies as soon as it is done, in any order (the spec
//     allows it). Only a connection's full in-flight budget stops reading.
//  7. A reply never carries bytes the request did not read: Export.ReadAt
//     fills all of p or fails, and after a failure only the bytes before an
//     OffsetError's offset are sent (pooled read buffers are not cleared).
//     A spliced reply is queued only after SpliceTo moved all of the bytes
//     of each of its pieces; a pipe a failed splice left bytes in is
//     closed, never reused, and the read is done again with ReadAt, whose
//     errors are the ones sent.
//  8. BLOCK_STATUS needs structured replies and a context selected with
//     NBD_OPT_SET_META_CONTEXT for the very export entered (EINVAL
//     otherwise), 0 < length, and the range within the export. The reply
//     has exactly one chunk per selected context; each describes at least
//     one byte and at most the request, with non-empty descriptors,
//     neighbours of equal status merged, at most 16384 descriptors (one
//     under REQ_ONE).
//  9. TLS: STARTTLS resets everything negotiated before it (structured
//     replies, contexts), as the spec requires; a client that sends bytes
//     after STARTTLS before its reply is disconnected (they would be
//     plaintext injected into the TLS session); a failed handshake closes
//     the connection. TLS is at least version 1.2.
//  10. Lifecycle: every goroutine is tracked and Close waits for all of them.
//     The context given to Export methods is cancelled when its connection
//     closes. An export opened with Exports.Open is released exactly once,
//     after the connection's last request has returned. Shutdown (Close,
//     Disconnect, a cancelled Serve) stops reading at once and gives
//     requests in flight ShutdownGrace to finish before closing; NBD_CMD_DISC
//     waits for them fully.
package nbdserver
