package nbdserver

import (
	"context"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// Export is one NBD export as the server sees it. Implementations must be
// safe for concurrent use: the server issues many requests at once, from many
// connections. An error that wraps a syscall.Errno is sent as that errno's
// NBD code (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP,
// ESHUTDOWN); any other error is sent as EIO. The connection stays up.
//
// The server only calls the I/O methods with 0 < n and [off, off+n) within
// Size, with ReadAt and WriteAt at most Options.MaxPayload bytes, never
// with a write-side call on a ReadOnly export, and never with a flag the
// export did not advertise. ctx is cancelled when the client's connection
// closes (after the shutdown grace on Disconnect or Close).
type Export interface {
	// Size in bytes; fixed while any connection is open.
	Size() int64
	// Flags the export supports; the server advertises exactly these.
	Flags() ExportFlags
	// PreferredBlockSize in bytes (a power of two, 512..32 MiB), advertised
	// in NBD_INFO_BLOCK_SIZE.
	PreferredBlockSize() uint32

	// ReadAt fills all of p or fails. p is a reused buffer that holds an
	// earlier request's data, possibly another export's, and all of it is
	// sent on success: an export must write every byte, zeroes included.
	// An *OffsetError tells the server which leading bytes of p are valid,
	// so a client with structured replies keeps them.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes all of p; fua: durable before returning. p belongs to
	// the server again once WriteAt returns.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// WriteZeroes: the range must read back as zeroes. noHole forbids
	// deallocation; fastZero asks to fail with ErrNotSupported (ENOTSUP)
	// rather than fall back to slow writes.
	WriteZeroes(ctx context.Context, off, n int64, fua, noHole, fastZero bool) error
	Trim(ctx context.Context, off, n int64, fua bool) error
	Flush(ctx context.Context) error
	// Cache is a hint that [off, off+n) will be read soon (NBD_CMD_CACHE).
	Cache(ctx context.Context, off, n int64) error
}

// ExportFlags are what an export can do.
type ExportFlags struct {
	ReadOnly  bool
	Flush     bool // NBD_FLAG_SEND_FLUSH
	FUA       bool // NBD_FLAG_SEND_FUA
	Trim      bool // NBD_FLAG_SEND_TRIM
	Zeroes    bool // NBD_FLAG_SEND_WRITE_ZEROES
	FastZero  bool // NBD_FLAG_SEND_FAST_ZERO
	Cache     bool // NBD_FLAG_SEND_CACHE
	MultiConn bool // NBD_FLAG_CAN_MULTI_CONN: a flush on one connection covers writes completed on all
}

// Exports resolves export names. The daemon's device registry implements it.
type Exports interface {
	// Lookup returns the named export, or false (NBD_OPT_INFO).
	Lookup(name string) (Export, bool)
	// Open is Lookup for a connection entering transmission (NBD_OPT_GO,
	// NBD_OPT_EXPORT_NAME). The server calls release exactly once when that
	// connection ends, so the registry can count connections per export.
	Open(name string) (exp Export, release func(), ok bool)
	// List returns export names and descriptions for NBD_OPT_LIST.
	List() []ExportInfo
}

// ExportInfo describes one export for NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
type ExportInfo struct {
	Name        string
	Description string
}

// Metadata contexts (NBD_OPT_SET_META_CONTEXT, NBD_CMD_BLOCK_STATUS).
const (
	// ContextBaseAllocation is the spec's base:allocation: StateHole and
	// StateZero per extent.
	ContextBaseAllocation = nbdwire.MetaContextBaseAllocation

	// StateHole (base:allocation): the extent is not allocated.
	StateHole = nbdwire.StateHole
	// StateZero (base:allocation): the extent reads as zeroes.
	StateZero = nbdwire.StateZero
)

// Extenter is an optional interface of an Export that can describe its
// contents in metadata contexts, for NBD_CMD_BLOCK_STATUS. An export
// without it offers no context, and clients cannot send BLOCK_STATUS.
type Extenter interface {
	// MetaContexts names the contexts the export offers, each
	// "namespace:name" (ContextBaseAllocation, or the export's own). The
	// server offers exactly these; Extents is only called with one of them.
	MetaContexts() []string
	// Extents describes [off, off+n) in the named context as consecutive
	// extents starting at off, at most maxExtents of them (≥ 1). The server
	// only calls it with 0 < n < 2^32 and [off, off+n) within Size. It may
	// describe less than n bytes but must describe at least one; the server
	// drops empty extents and cuts the list at off+n. Flags are the
	// context's (for base:allocation, StateHole and StateZero; 0 is always
	// a safe answer).
	Extents(ctx context.Context, metaContext string, off, n int64, maxExtents int) ([]Extent, error)
}

// Extent is a run of an export with one status in one metadata context.
type Extent struct {
	Length int64
	Flags  uint32
}
