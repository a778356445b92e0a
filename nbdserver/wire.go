package nbdserver

import "github.com/nbdclone/nbdclone/internal/nbdwire"

// The protocol's numbers are in internal/nbdwire; these are this server's
// choices within it.
const (
	// clientFlagsKnown are the client flags this server understands; any
	// other ends the connection, as the spec asks.
	clientFlagsKnown = nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes
	// maxOptionLen bounds option data. The largest option this server
	// understands is NBD_OPT_GO: a 4096-byte name plus a short list of
	// information requests. Longer options are refused before anything is
	// allocated for them (the spec lets a server treat such a client as a
	// denial of service and disconnect).
	maxOptionLen = 64 << 10
	// maxExtentsPerContext bounds the descriptors of one
	// NBD_REPLY_TYPE_BLOCK_STATUS chunk (8 bytes each): the spec lets a
	// server describe less than asked, and clients ask again for the rest.
	maxExtentsPerContext = 16 << 10
)
