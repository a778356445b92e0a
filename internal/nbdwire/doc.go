// Package nbdwire is the NBD protocol's numbers and header layouts
// (doc/proto.md of NetworkBlockDevice/nbd), written once for both ends:
// the client in blockdev and the server in nbdserver.
//
// Invariants:
//
//  1. Every value is the spec's, named after it in Go style
//     (NBD_REP_ERR_UNSUP is RepErrUnsup); policy (limits a side chooses)
//     lives with that side, not here.
//  2. Everything is sent in network byte order (big endian).
//  3. The Put functions write a whole header, magic included, into a
//     buffer at least the header's length; the Parse functions decode the
//     fields after the magic and leave checking it to the caller, which
//     reads it first (to tell simple from structured replies, or to
//     report a bad one).
//  4. No I/O, no allocation, no state.
package nbdwire
