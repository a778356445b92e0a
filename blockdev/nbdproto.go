package blockdev

import (
	"fmt"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// NBD protocol numbers the client uses (doc/proto.md of the NBD project).
// go-nbd's protocol package has the baseline ones; the rest are here.
const (
	nbdMagic         = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	nbdOptMagic      = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	nbdOptReplyMagic = protocol.NEGOTIATION_MAGIC_REPLY

	nbdFlagFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	nbdFlagNoZeroes      = uint16(1 << 1)

	nbdOptExportName       = uint32(1)
	nbdOptAbort            = protocol.NEGOTIATION_ID_OPTION_ABORT
	nbdOptStartTLS         = uint32(5)
	nbdOptGo               = protocol.NEGOTIATION_ID_OPTION_GO
	nbdOptStructuredReply  = uint32(8)
	nbdOptSetMetaContext   = uint32(10)
	nbdRepAck              = protocol.NEGOTIATION_TYPE_REPLY_ACK
	nbdRepInfo             = protocol.NEGOTIATION_TYPE_REPLY_INFO
	nbdRepMetaContext      = uint32(4)
	nbdRepFlagError        = uint32(1 << 31)
	nbdRepErrUnsup         = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	nbdRepErrPolicy        = uint32(2 | 1<<31)
	nbdRepErrInvalid       = uint32(3 | 1<<31)
	nbdRepErrTLSReqd       = uint32(5 | 1<<31)
	nbdRepErrUnknown       = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	nbdRepErrShutdown      = uint32(7 | 1<<31)
	nbdRepErrBlockSizeReqd = uint32(8 | 1<<31)
	nbdInfoExport          = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	nbdInfoBlockSize       = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE

	nbdTFlagHasFlags     = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	nbdTFlagCanMultiConn = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN

	nbdRequestMagic     = protocol.TRANSMISSION_MAGIC_REQUEST
	nbdSimpleReplyMagic = protocol.TRANSMISSION_MAGIC_REPLY
	nbdStructReplyMagic = uint32(0x668e33ef)

	nbdCmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	nbdCmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	nbdCmdBlockStatus = uint16(7)

	nbdReplyFlagDone       = uint16(1)
	nbdReplyNone           = uint16(0)
	nbdReplyOffsetData     = uint16(1)
	nbdReplyOffsetHole     = uint16(2)
	nbdReplyBlockStatus    = uint16(5)
	nbdReplyTypeErrorBit   = uint16(1 << 15)
	nbdReplyError          = uint16(1<<15 | 1)
	nbdReplyErrorOffset    = uint16(1<<15 | 2)
	nbdStateHole           = uint32(1)
	nbdStateZero           = uint32(2)
	nbdMetaBaseAllocation  = "base:allocation"
	nbdDefaultPort         = "10809"
	nbdDefaultMaxBlock     = 32 << 20 // the spec's limit when the server states none
	nbdMaxBlockStatusBytes = 1 << 30  // one BLOCK_STATUS asks at most this much
)

// nbdErrno is an error a server reported for one request.
type nbdErrno uint32

func (e nbdErrno) Error() string {
	return fmt.Sprintf("NBD server error %d (%v)", uint32(e), syscall.Errno(e))
}

// Unwrap makes errors.Is(err, syscall.EIO) work.
func (e nbdErrno) Unwrap() error { return syscall.Errno(e) }

// transient reports whether retrying the request may succeed: I/O errors,
// memory pressure and a shutting-down server pass; bad arguments,
// permissions and unsupported requests do not.
func (e nbdErrno) transient() bool {
	switch syscall.Errno(e) {
	case syscall.EIO, syscall.ENOMEM, syscall.ESHUTDOWN, syscall.EAGAIN, syscall.EINTR:
		return true
	}
	return false
}
