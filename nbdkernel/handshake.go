package nbdkernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

var be = binary.BigEndian

// maxReplyLen bounds one option reply's data.
const maxReplyLen = 64 << 10

// Transmission flags the kernel acts on (doc/proto.md of
// NetworkBlockDevice/nbd).
const (
	FlagHasFlags     = nbdwire.FlagHasFlags
	FlagReadOnly     = nbdwire.FlagReadOnly
	FlagSendFlush    = nbdwire.FlagSendFlush
	FlagSendFUA      = nbdwire.FlagSendFUA
	FlagSendTrim     = nbdwire.FlagSendTrim
	FlagCanMultiConn = nbdwire.FlagCanMultiConn
)

// Export is what the server said about an export in its NBD_OPT_GO reply.
type Export struct {
	Size  uint64
	Flags uint16 // transmission flags
	// Block size constraints (NBD_INFO_BLOCK_SIZE); zero when not sent.
	MinBlock, PreferredBlock, MaxBlock uint32
}

// ErrHandshake wraps every handshake failure.
var ErrHandshake = errors.New("nbdkernel: NBD handshake failed")

// Handshake runs the fixed newstyle handshake for export on conn, up to
// the ACK of NBD_OPT_GO, and returns what the server said. It never asks
// for structured replies: the kernel reads simple replies only. timeout
// bounds the whole handshake (0: none).
func Handshake(conn net.Conn, export string, timeout time.Duration) (Export, error) {
	if timeout > 0 {
		conn.SetDeadline(time.Now().Add(timeout))
		defer conn.SetDeadline(time.Time{})
	}
	exp, err := handshake(conn, export)
	if err != nil {
		return Export{}, fmt.Errorf("%w: export %q: %w", ErrHandshake, export, err)
	}
	return exp, nil
}

func handshake(rw io.ReadWriter, export string) (Export, error) {
	var greeting [18]byte
	if _, err := io.ReadFull(rw, greeting[:]); err != nil {
		return Export{}, fmt.Errorf("reading the greeting: %w", err)
	}
	if be.Uint64(greeting[0:]) != nbdwire.NBDMagic || be.Uint64(greeting[8:]) != nbdwire.OptMagic {
		return Export{}, errors.New("not a newstyle NBD server")
	}
	hflags := be.Uint16(greeting[16:])
	if hflags&nbdwire.FlagFixedNewstyle == 0 {
		return Export{}, errors.New("the server does not speak fixed newstyle")
	}
	cflags := nbdwire.FlagCFixedNewstyle
	if hflags&nbdwire.FlagNoZeroes != 0 {
		cflags |= nbdwire.FlagCNoZeroes
	}
	// NBD_OPT_GO: name, one information request (NBD_INFO_BLOCK_SIZE).
	name := []byte(export)
	opt := make([]byte, 0, 4+16+4+len(name)+4)
	opt = be.AppendUint32(opt, cflags)
	opt = be.AppendUint64(opt, nbdwire.OptMagic)
	opt = be.AppendUint32(opt, nbdwire.OptGo)
	opt = be.AppendUint32(opt, uint32(4+len(name)+2+2))
	opt = be.AppendUint32(opt, uint32(len(name)))
	opt = append(opt, name...)
	opt = be.AppendUint16(opt, 1)
	opt = be.AppendUint16(opt, nbdwire.InfoBlockSize)
	if _, err := rw.Write(opt); err != nil {
		return Export{}, fmt.Errorf("sending NBD_OPT_GO: %w", err)
	}

	var exp Export
	gotExport := false
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(rw, hdr[:]); err != nil {
			return Export{}, fmt.Errorf("reading an option reply: %w", err)
		}
		if be.Uint64(hdr[0:]) != nbdwire.OptReplyMagic {
			return Export{}, errors.New("bad option reply magic")
		}
		if be.Uint32(hdr[8:]) != nbdwire.OptGo {
			return Export{}, fmt.Errorf("reply to option %d, not to NBD_OPT_GO", be.Uint32(hdr[8:]))
		}
		typ, n := be.Uint32(hdr[12:]), be.Uint32(hdr[16:])
		if n > maxReplyLen {
			return Export{}, fmt.Errorf("option reply of %d bytes", n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(rw, data); err != nil {
			return Export{}, fmt.Errorf("reading an option reply: %w", err)
		}
		switch {
		case typ == nbdwire.RepAck:
			if !gotExport {
				return Export{}, errors.New("the server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
			}
			return exp, nil
		case typ == nbdwire.RepInfo:
			if len(data) < 2 {
				return Export{}, errors.New("short NBD_REP_INFO")
			}
			switch be.Uint16(data) {
			case nbdwire.InfoExport:
				if len(data) != nbdwire.InfoExportLen {
					return Export{}, errors.New("bad NBD_INFO_EXPORT length")
				}
				exp.Size, exp.Flags = be.Uint64(data[2:]), be.Uint16(data[10:])
				gotExport = true
			case nbdwire.InfoBlockSize:
				if len(data) != nbdwire.InfoBlockSizeLen {
					return Export{}, errors.New("bad NBD_INFO_BLOCK_SIZE length")
				}
				exp.MinBlock, exp.PreferredBlock, exp.MaxBlock = be.Uint32(data[2:]), be.Uint32(data[6:]), be.Uint32(data[10:])
			}
			// Other information (name, description) is not needed.
		case typ&nbdwire.RepFlagError != 0:
			msg := string(data)
			if typ == nbdwire.RepErrUnknown {
				return Export{}, fmt.Errorf("no such export (%s)", msg)
			}
			return Export{}, fmt.Errorf("the server refused NBD_OPT_GO (error %#x): %s", typ, msg)
		default:
			return Export{}, fmt.Errorf("unexpected option reply type %d", typ)
		}
	}
}

// BlockSize picks the kernel's logical block size for exp: want if not
// zero, else the server's preferred size; clamped to what the kernel
// accepts (512 to 4096, a power of two) and to the server's minimum, and
// a divisor of the size so no tail is lost.
func BlockSize(exp Export, want uint32) (uint32, error) {
	if want != 0 {
		if want < 512 || want > 4096 || want&(want-1) != 0 {
			return 0, fmt.Errorf("nbdkernel: block size %d: the kernel takes a power of two from 512 to 4096", want)
		}
		if exp.MinBlock > want || (exp.MaxBlock != 0 && exp.MaxBlock < want) {
			return 0, fmt.Errorf("nbdkernel: block size %d is outside the server's %d..%d", want, exp.MinBlock, exp.MaxBlock)
		}
		if exp.Size%uint64(want) != 0 {
			return 0, fmt.Errorf("nbdkernel: block size %d does not divide the export size %d", want, exp.Size)
		}
		return want, nil
	}
	bs := uint32(4096)
	if p := exp.PreferredBlock; p >= 512 && p < bs && p&(p-1) == 0 {
		bs = p
	}
	for bs > 512 && exp.Size%uint64(bs) != 0 {
		bs >>= 1
	}
	if bs < exp.MinBlock {
		return 0, fmt.Errorf("nbdkernel: the server's minimum block size %d is over what the kernel takes (4096)", exp.MinBlock)
	}
	if exp.Size%uint64(bs) != 0 {
		return 0, fmt.Errorf("nbdkernel: the export size %d is not a multiple of 512", exp.Size)
	}
	return bs, nil
}
