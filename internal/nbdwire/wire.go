package nbdwire

// Numbers from doc/proto.md of NetworkBlockDevice/nbd; the comments give
// the spec's names where they are not plain from the Go ones.

// Handshake (section "Newstyle negotiation").
const (
	NBDMagic      = uint64(0x4e42444d41474943) // "NBDMAGIC"
	OptMagic      = uint64(0x49484156454f5054) // "IHAVEOPT": also opens every option request
	OptReplyMagic = uint64(0x0003e889045565a9)

	// Handshake flags, sent by the server after the magics.
	FlagFixedNewstyle = uint16(1 << 0)
	FlagNoZeroes      = uint16(1 << 1)

	// Client flags (NBD_FLAG_C_*), the client's answer to them.
	FlagCFixedNewstyle = uint32(1 << 0)
	FlagCNoZeroes      = uint32(1 << 1)

	// ExportNameZeroes is the reserved padding after NBD_OPT_EXPORT_NAME's
	// reply unless the client set NBD_FLAG_C_NO_ZEROES.
	ExportNameZeroes = 124
)

// Option types (NBD_OPT_*).
const (
	OptExportName      = uint32(1)
	OptAbort           = uint32(2)
	OptList            = uint32(3)
	OptStartTLS        = uint32(5)
	OptInfo            = uint32(6)
	OptGo              = uint32(7)
	OptStructuredReply = uint32(8)
	OptListMetaContext = uint32(9)
	OptSetMetaContext  = uint32(10)
	OptExtendedHeaders = uint32(11)
)

// Option reply types (NBD_REP_*). Errors have bit 31 (RepFlagError) set.
const (
	RepAck         = uint32(1)
	RepServer      = uint32(2)
	RepInfo        = uint32(3)
	RepMetaContext = uint32(4)

	RepFlagError        = uint32(1 << 31)
	RepErrUnsup         = RepFlagError | 1
	RepErrPolicy        = RepFlagError | 2
	RepErrInvalid       = RepFlagError | 3
	RepErrTLSReqd       = RepFlagError | 5
	RepErrUnknown       = RepFlagError | 6
	RepErrShutdown      = RepFlagError | 7
	RepErrBlockSizeReqd = RepFlagError | 8
	RepErrTooBig        = RepFlagError | 9
)

// Information types in NBD_REP_INFO replies (NBD_INFO_*), and the length
// of the two fixed-size ones, type included.
const (
	InfoExport      = uint16(0) // size (64 bits), transmission flags (16 bits)
	InfoName        = uint16(1)
	InfoDescription = uint16(2)
	InfoBlockSize   = uint16(3) // minimum, preferred, maximum (32 bits each)

	InfoExportLen    = 12
	InfoBlockSizeLen = 14
)

// Transmission flags (NBD_FLAG_*), sent with the export size.
const (
	FlagHasFlags        = uint16(1 << 0)
	FlagReadOnly        = uint16(1 << 1)
	FlagSendFlush       = uint16(1 << 2)
	FlagSendFUA         = uint16(1 << 3)
	FlagSendTrim        = uint16(1 << 5)
	FlagSendWriteZeroes = uint16(1 << 6)
	FlagSendDF          = uint16(1 << 7)
	FlagCanMultiConn    = uint16(1 << 8)
	FlagSendCache       = uint16(1 << 10)
	FlagSendFastZero    = uint16(1 << 11)
)

// Requests (compact headers).
const (
	RequestMagic     = uint32(0x25609513)
	RequestHeaderLen = 28

	// Commands (NBD_CMD_*).
	CmdRead        = uint16(0)
	CmdWrite       = uint16(1)
	CmdDisc        = uint16(2)
	CmdFlush       = uint16(3)
	CmdTrim        = uint16(4)
	CmdCache       = uint16(5)
	CmdWriteZeroes = uint16(6)
	CmdBlockStatus = uint16(7)

	// Command flags (NBD_CMD_FLAG_*).
	CmdFlagFUA      = uint16(1 << 0)
	CmdFlagNoHole   = uint16(1 << 1)
	CmdFlagDF       = uint16(1 << 2)
	CmdFlagReqOne   = uint16(1 << 3)
	CmdFlagFastZero = uint16(1 << 4)
)

// Replies (simple, and structured chunks).
const (
	SimpleReplyMagic     = uint32(0x67446698)
	SimpleReplyHeaderLen = 16

	StructuredReplyMagic     = uint32(0x668e33ef)
	StructuredReplyHeaderLen = 20

	ReplyFlagDone = uint16(1 << 0)

	// Chunk types (NBD_REPLY_TYPE_*). Errors have bit 15
	// (ReplyTypeFlagError, the spec's NBD_REPLY_TYPE_IS_ERR) set.
	ReplyTypeNone        = uint16(0)
	ReplyTypeOffsetData  = uint16(1)
	ReplyTypeOffsetHole  = uint16(2)
	ReplyTypeBlockStatus = uint16(5)
	ReplyTypeFlagError   = uint16(1 << 15)
	ReplyTypeError       = ReplyTypeFlagError | 1
	ReplyTypeErrorOffset = ReplyTypeFlagError | 2
)

// Error values (section "Error values"): the Linux errno numbers, but only
// these eight may go on the wire.
const (
	EPERM     = uint32(1)
	EIO       = uint32(5)
	ENOMEM    = uint32(12)
	EINVAL    = uint32(22)
	ENOSPC    = uint32(28)
	EOVERFLOW = uint32(75)
	ENOTSUP   = uint32(95)
	ESHUTDOWN = uint32(108)
)

// The base:allocation metadata context and its state bits (NBD_STATE_*).
const (
	MetaContextBaseAllocation = "base:allocation"

	StateHole = uint32(1 << 0)
	StateZero = uint32(1 << 1)
)

// Defaults and limits.
const (
	// DefaultPort is the IANA-assigned NBD port, as a string for
	// net.JoinHostPort.
	DefaultPort = "10809"
	// Block sizes without NBD_INFO_BLOCK_SIZE: the server's default
	// minimum and preferred size, and the largest READ or WRITE a client
	// should send.
	DefaultMinBlockSize       = 1
	DefaultPreferredBlockSize = 4096
	DefaultMaxBlockSize       = 32 << 20
	// MaxStringLen is the spec's hard limit for names, queries and
	// messages.
	MaxStringLen = 4096
)
