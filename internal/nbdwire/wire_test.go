package nbdwire

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// The values below are copied from doc/proto.md, not derived from the
// constants, so a typo in either place fails.
func TestValuesMatchTheSpec(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"NBDMAGIC", NBDMagic, binary.BigEndian.Uint64([]byte("NBDMAGIC"))},
		{"IHAVEOPT", OptMagic, binary.BigEndian.Uint64([]byte("IHAVEOPT"))},
		{"option reply magic", OptReplyMagic, 0x3e889045565a9},
		{"NBD_REQUEST_MAGIC", uint64(RequestMagic), 0x25609513},
		{"NBD_SIMPLE_REPLY_MAGIC", uint64(SimpleReplyMagic), 0x67446698},
		{"NBD_STRUCTURED_REPLY_MAGIC", uint64(StructuredReplyMagic), 0x668e33ef},
		{"NBD_OPT_GO", uint64(OptGo), 7},
		{"NBD_OPT_SET_META_CONTEXT", uint64(OptSetMetaContext), 10},
		{"NBD_REP_ERR_UNSUP", uint64(RepErrUnsup), 2147483649},
		{"NBD_REP_ERR_POLICY", uint64(RepErrPolicy), 2147483650},
		{"NBD_REP_ERR_UNKNOWN", uint64(RepErrUnknown), 2147483654},
		{"NBD_REP_ERR_TOO_BIG", uint64(RepErrTooBig), 2147483657},
		{"NBD_FLAG_CAN_MULTI_CONN", uint64(FlagCanMultiConn), 256},
		{"NBD_FLAG_SEND_FAST_ZERO", uint64(FlagSendFastZero), 2048},
		{"NBD_CMD_BLOCK_STATUS", uint64(CmdBlockStatus), 7},
		{"NBD_CMD_FLAG_FAST_ZERO", uint64(CmdFlagFastZero), 16},
		{"NBD_REPLY_TYPE_BLOCK_STATUS", uint64(ReplyTypeBlockStatus), 5},
		{"NBD_REPLY_TYPE_ERROR", uint64(ReplyTypeError), 32769},
		{"NBD_REPLY_TYPE_ERROR_OFFSET", uint64(ReplyTypeErrorOffset), 32770},
		{"NBD_ESHUTDOWN", uint64(ESHUTDOWN), 108},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, the spec says %#x", c.name, c.got, c.want)
		}
	}
}

// Headers are laid out as the spec draws them, field by field.
func TestHeaderLayouts(t *testing.T) {
	b := make([]byte, RequestHeaderLen)
	r := Request{Flags: CmdFlagFUA, Type: CmdWrite, Handle: 0x0102030405060708, Offset: 0x1000, Length: 512}
	PutRequest(b, r)
	want := []byte{0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0}
	if !bytes.Equal(b, want) {
		t.Errorf("request header % x, want % x", b, want)
	}
	if got := ParseRequest(b); got != r {
		t.Errorf("ParseRequest = %+v, want %+v", got, r)
	}

	b = make([]byte, StructuredReplyHeaderLen)
	PutChunkHeader(b, ReplyFlagDone, ReplyTypeOffsetHole, 9, 12)
	want = []byte{0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 12}
	if !bytes.Equal(b, want) {
		t.Errorf("chunk header % x, want % x", b, want)
	}
	if f, ty, h, n := ParseChunkHeader(b); f != ReplyFlagDone || ty != ReplyTypeOffsetHole || h != 9 || n != 12 {
		t.Errorf("ParseChunkHeader = %d %d %d %d", f, ty, h, n)
	}

	b = make([]byte, SimpleReplyHeaderLen)
	PutSimpleReply(b, EIO, 3)
	want = []byte{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 3}
	if !bytes.Equal(b, want) {
		t.Errorf("simple reply % x, want % x", b, want)
	}
	if errno, h := ParseSimpleReply(b); errno != EIO || h != 3 {
		t.Errorf("ParseSimpleReply = %d %d", errno, h)
	}

	b = make([]byte, OptionHeaderLen)
	PutOptionHeader(b, OptGo, 6)
	want = append([]byte("IHAVEOPT"), 0, 0, 0, 7, 0, 0, 0, 6)
	if !bytes.Equal(b, want) {
		t.Errorf("option header % x, want % x", b, want)
	}
	if opt, n := ParseOptionHeader(b); opt != OptGo || n != 6 {
		t.Errorf("ParseOptionHeader = %d %d", opt, n)
	}

	b = make([]byte, OptionReplyHeaderLen)
	PutOptionReplyHeader(b, OptGo, RepErrUnknown, 4)
	want = []byte{0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 4}
	if !bytes.Equal(b, want) {
		t.Errorf("option reply header % x, want % x", b, want)
	}
	if opt, typ, n := ParseOptionReplyHeader(b); opt != OptGo || typ != RepErrUnknown || n != 4 {
		t.Errorf("ParseOptionReplyHeader = %d %#x %d", opt, typ, n)
	}
}
