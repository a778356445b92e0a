package nbdwire

import "encoding/binary"

var be = binary.BigEndian

// Option requests and replies.
const (
	OptionHeaderLen      = 16 // magic, option, data length
	OptionReplyHeaderLen = 20 // magic, option, reply type, data length
)

// PutOptionHeader writes an option request's header for length bytes of
// data into b[:OptionHeaderLen].
func PutOptionHeader(b []byte, opt, length uint32) {
	be.PutUint64(b[0:], OptMagic)
	be.PutUint32(b[8:], opt)
	be.PutUint32(b[12:], length)
}

// ParseOptionHeader decodes b[:OptionHeaderLen] but its magic.
func ParseOptionHeader(b []byte) (opt, length uint32) {
	return be.Uint32(b[8:]), be.Uint32(b[12:])
}

// PutOptionReplyHeader writes the header of a reply to opt carrying length
// bytes of data into b[:OptionReplyHeaderLen].
func PutOptionReplyHeader(b []byte, opt, typ, length uint32) {
	be.PutUint64(b[0:], OptReplyMagic)
	be.PutUint32(b[8:], opt)
	be.PutUint32(b[12:], typ)
	be.PutUint32(b[16:], length)
}

// ParseOptionReplyHeader decodes b[:OptionReplyHeaderLen] but its magic.
func ParseOptionReplyHeader(b []byte) (opt, typ, length uint32) {
	return be.Uint32(b[8:]), be.Uint32(b[12:]), be.Uint32(b[16:])
}

// Request is a transmission-phase request header.
type Request struct {
	Flags  uint16 // NBD_CMD_FLAG_*
	Type   uint16 // NBD_CMD_*
	Handle uint64 // the client's cookie, echoed in the reply
	Offset uint64
	Length uint32
}

// PutRequest writes r into b[:RequestHeaderLen].
func PutRequest(b []byte, r Request) {
	be.PutUint32(b[0:], RequestMagic)
	be.PutUint16(b[4:], r.Flags)
	be.PutUint16(b[6:], r.Type)
	be.PutUint64(b[8:], r.Handle)
	be.PutUint64(b[16:], r.Offset)
	be.PutUint32(b[24:], r.Length)
}

// ParseRequest decodes b[:RequestHeaderLen] but its magic.
func ParseRequest(b []byte) Request {
	return Request{
		Flags:  be.Uint16(b[4:]),
		Type:   be.Uint16(b[6:]),
		Handle: be.Uint64(b[8:]),
		Offset: be.Uint64(b[16:]),
		Length: be.Uint32(b[24:]),
	}
}

// PutSimpleReply writes a simple reply's header into
// b[:SimpleReplyHeaderLen].
func PutSimpleReply(b []byte, errno uint32, handle uint64) {
	be.PutUint32(b[0:], SimpleReplyMagic)
	be.PutUint32(b[4:], errno)
	be.PutUint64(b[8:], handle)
}

// ParseSimpleReply decodes b[:SimpleReplyHeaderLen] but its magic.
func ParseSimpleReply(b []byte) (errno uint32, handle uint64) {
	return be.Uint32(b[4:]), be.Uint64(b[8:])
}

// PutChunkHeader writes a structured reply chunk's header for length
// bytes of payload into b[:StructuredReplyHeaderLen].
func PutChunkHeader(b []byte, flags, typ uint16, handle uint64, length uint32) {
	be.PutUint32(b[0:], StructuredReplyMagic)
	be.PutUint16(b[4:], flags)
	be.PutUint16(b[6:], typ)
	be.PutUint64(b[8:], handle)
	be.PutUint32(b[16:], length)
}

// ParseChunkHeader decodes b[:StructuredReplyHeaderLen] but its magic.
func ParseChunkHeader(b []byte) (flags, typ uint16, handle uint64, length uint32) {
	return be.Uint16(b[4:]), be.Uint16(b[6:]), be.Uint64(b[8:]), be.Uint32(b[16:])
}
