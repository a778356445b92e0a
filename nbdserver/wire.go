package nbdserver

import "github.com/pojntfx/go-nbd/pkg/protocol"

// Protocol constants, named after doc/proto.md of NetworkBlockDevice/nbd.
// go-nbd's protocol package is used where it has the value; it knows only
// the handful its own server needs, so the rest are spelled out here. All
// of them are sent in network byte order.

// Handshake.
const (
	nbdMagic      = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	optMagic      = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	optReplyMagic = protocol.NEGOTIATION_MAGIC_REPLY

	flagFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	flagNoZeroes      = uint16(1 << 1)

	clientFlagFixedNewstyle = uint32(1 << 0)
	clientFlagNoZeroes      = uint32(1 << 1)
	clientFlagsKnown        = clientFlagFixedNewstyle | clientFlagNoZeroes
)

// Option types (NBD_OPT_*).
const (
	optExportName      = uint32(1)
	optAbort           = protocol.NEGOTIATION_ID_OPTION_ABORT
	optList            = protocol.NEGOTIATION_ID_OPTION_LIST
	optStartTLS        = uint32(5)
	optInfo            = protocol.NEGOTIATION_ID_OPTION_INFO
	optGo              = protocol.NEGOTIATION_ID_OPTION_GO
	optStructuredReply = uint32(8)
	optListMetaContext = uint32(9)
	optSetMetaContext  = uint32(10)
	optExtendedHeaders = uint32(11)
)

// Option reply types (NBD_REP_*). Errors have bit 31 set.
const (
	repAck         = protocol.NEGOTIATION_TYPE_REPLY_ACK
	repServer      = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	repInfo        = protocol.NEGOTIATION_TYPE_REPLY_INFO
	repMetaContext = uint32(4)
	repErrUnsup    = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	repErrPolicy   = uint32(1<<31 | 2)
	repErrInvalid  = uint32(1<<31 | 3)
	repErrTLSReqd  = uint32(1<<31 | 5)
	repErrUnknown  = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	repErrTooBig   = uint32(1<<31 | 9)
)

// Information types in NBD_REP_INFO (NBD_INFO_*).
const (
	infoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	infoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	infoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	infoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE
)

// Transmission flags (NBD_FLAG_*), sent with the export size.
const (
	tflagHasFlags        = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	tflagReadOnly        = uint16(1 << 1)
	tflagSendFlush       = uint16(1 << 2)
	tflagSendFUA         = uint16(1 << 3)
	tflagSendTrim        = uint16(1 << 5)
	tflagSendWriteZeroes = uint16(1 << 6)
	tflagSendDF          = uint16(1 << 7)
	tflagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
	tflagSendCache       = uint16(1 << 10)
	tflagSendFastZero    = uint16(1 << 11)
)

// Requests.
const (
	requestMagic     = protocol.TRANSMISSION_MAGIC_REQUEST
	requestHeaderLen = 28

	cmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	cmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	cmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	cmdFlush       = uint16(3)
	cmdTrim        = uint16(4)
	cmdCache       = uint16(5)
	cmdWriteZeroes = uint16(6)
	cmdBlockStatus = uint16(7)

	cmdFlagFUA      = uint16(1 << 0)
	cmdFlagNoHole   = uint16(1 << 1)
	cmdFlagDF       = uint16(1 << 2)
	cmdFlagReqOne   = uint16(1 << 3)
	cmdFlagFastZero = uint16(1 << 4)
)

// Replies.
const (
	simpleReplyMagic     = protocol.TRANSMISSION_MAGIC_REPLY
	simpleReplyHeaderLen = 16

	structuredReplyMagic     = uint32(0x668e33ef)
	structuredReplyHeaderLen = 20

	replyFlagDone = uint16(1 << 0)

	replyTypeNone        = uint16(0)
	replyTypeOffsetData  = uint16(1)
	replyTypeOffsetHole  = uint16(2)
	replyTypeBlockStatus = uint16(5)
	replyTypeError       = uint16(1<<15 | 1)
	replyTypeErrorOffset = uint16(1<<15 | 2)
)

// Limits.
const (
	// maxStringLen is the spec's hard limit for names and messages.
	maxStringLen = 4096
	// maxOptionLen bounds option data. The largest option this server
	// understands is NBD_OPT_GO: a 4096-byte name plus a short list of
	// information requests. Longer options are refused before anything is
	// allocated for them (the spec lets a server treat such a client as a
	// denial of service and disconnect).
	maxOptionLen = 64 << 10
	// exportNameZeroes is the reserved padding after NBD_OPT_EXPORT_NAME's
	// reply unless the client negotiated NBD_FLAG_C_NO_ZEROES.
	exportNameZeroes = 124
	// maxExtentsPerContext bounds the descriptors of one
	// NBD_REPLY_TYPE_BLOCK_STATUS chunk (8 bytes each): the spec lets a
	// server describe less than asked, and clients ask again for the rest.
	maxExtentsPerContext = 16 << 10
)
