package nbdkernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The nbd generic-netlink family (include/uapi/linux/nbd-netlink.h).
const (
	nbdFamilyName = "nbd"
	nbdVersion    = 1

	cmdConnect     = 1
	cmdDisconnect  = 2
	cmdReconfigure = 3
	cmdStatus      = 5

	attrIndex           = 1  // u32
	attrSizeBytes       = 2  // u64
	attrBlockSizeBytes  = 3  // u64
	attrTimeout         = 4  // u64, seconds
	attrServerFlags     = 5  // u64
	attrClientFlags     = 6  // u64
	attrSockets         = 7  // nested
	attrDeadConnTimeout = 8  // u64, seconds
	attrDeviceList      = 9  // nested
	attrBackendID       = 10 // string

	sockItem   = 1
	sockFD     = 1 // u32
	deviceItem = 1
	deviceIdx  = 1 // u32
	deviceConn = 2 // u8
)

var ne = binary.NativeEndian

// sizeofGenlmsghdr is struct genlmsghdr: cmd, version, reserved u16.
const sizeofGenlmsghdr = 4

// attrs builds a netlink attribute stream.
type attrs []byte

func (a attrs) add(typ uint16, payload []byte) attrs {
	n := unix.SizeofNlAttr + len(payload)
	a = ne.AppendUint16(a, uint16(n))
	a = ne.AppendUint16(a, typ)
	a = append(a, payload...)
	for len(a)%4 != 0 {
		a = append(a, 0)
	}
	return a
}

func (a attrs) u32(typ uint16, v uint32) attrs { return a.add(typ, ne.AppendUint32(nil, v)) }
func (a attrs) u64(typ uint16, v uint64) attrs { return a.add(typ, ne.AppendUint64(nil, v)) }
func (a attrs) str(typ uint16, s string) attrs { return a.add(typ, append([]byte(s), 0)) }

// parseAttrs splits an attribute stream into type → payload (the last of
// each type wins; nested flags are masked off).
func parseAttrs(b []byte) map[uint16][]byte {
	out := map[uint16][]byte{}
	for len(b) >= unix.SizeofNlAttr {
		n := int(ne.Uint16(b))
		typ := ne.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if n < unix.SizeofNlAttr || n > len(b) {
			break
		}
		out[typ] = b[unix.SizeofNlAttr:n]
		adv := (n + 3) &^ 3
		if adv > len(b) {
			break
		}
		b = b[adv:]
	}
	return out
}

// genl is one NETLINK_GENERIC socket.
type genl struct {
	fd  int
	seq uint32
}

func dialGenl() (*genl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("nbdkernel: netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nbdkernel: netlink bind: %w", err)
	}
	// A kernel that never answers must not hang the daemon.
	tv := unix.Timeval{Sec: 30}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return &genl{fd: fd}, nil
}

func (g *genl) close() { unix.Close(g.fd) }

// request sends one generic-netlink command with an ACK request and
// returns the attribute streams of the replies before the ACK; a negative
// ACK is returned as its errno.
func (g *genl) request(family uint16, cmd, version uint8, a attrs) ([][]byte, error) {
	g.seq++
	msg := make([]byte, 0, unix.NLMSG_HDRLEN+sizeofGenlmsghdr+len(a))
	msg = ne.AppendUint32(msg, uint32(unix.NLMSG_HDRLEN+sizeofGenlmsghdr+len(a)))
	msg = ne.AppendUint16(msg, family)
	msg = ne.AppendUint16(msg, unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	msg = ne.AppendUint32(msg, g.seq)
	msg = ne.AppendUint32(msg, 0)
	msg = append(msg, cmd, version, 0, 0)
	msg = append(msg, a...)
	if err := unix.Sendto(g.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("nbdkernel: netlink send: %w", err)
	}
	var replies [][]byte
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(g.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return nil, fmt.Errorf("nbdkernel: netlink receive: %w", err)
		}
		b := buf[:n]
		for len(b) >= unix.NLMSG_HDRLEN {
			l := int(ne.Uint32(b))
			typ := ne.Uint16(b[4:])
			seq := ne.Uint32(b[8:])
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return nil, errors.New("nbdkernel: malformed netlink reply")
			}
			body := b[unix.NLMSG_HDRLEN:l]
			b = b[min((l+3)&^3, len(b)):]
			if seq != g.seq {
				continue
			}
			switch typ {
			case unix.NLMSG_ERROR:
				if len(body) < 4 {
					return nil, errors.New("nbdkernel: short netlink error")
				}
				if errno := int32(ne.Uint32(body)); errno != 0 {
					return replies, syscall.Errno(-errno)
				}
				return replies, nil
			case unix.NLMSG_DONE:
				return replies, nil
			case family:
				if len(body) >= sizeofGenlmsghdr {
					replies = append(replies, append([]byte(nil), body[sizeofGenlmsghdr:]...))
				}
			}
		}
	}
}

// family resolves the nbd family's id; ENOENT means the module is not
// loaded.
func (g *genl) family() (uint16, error) {
	replies, err := g.request(unix.GENL_ID_CTRL, unix.CTRL_CMD_GETFAMILY, 1, attrs(nil).str(unix.CTRL_ATTR_FAMILY_NAME, nbdFamilyName))
	if errors.Is(err, unix.ENOENT) {
		return 0, ErrNoModule
	}
	if err != nil {
		return 0, err
	}
	for _, r := range replies {
		if id, ok := parseAttrs(r)[unix.CTRL_ATTR_FAMILY_ID]; ok && len(id) >= 2 {
			return ne.Uint16(id), nil
		}
	}
	return 0, errors.New("nbdkernel: the kernel named no id for the nbd netlink family")
}

// socketsAttr nests one NBD_SOCK_ITEM per socket. Like nbd-client (libnl),
// nests are not flagged NLA_F_NESTED.
func socketsAttr(a attrs, socks []*os.File) attrs {
	var items attrs
	for _, s := range socks {
		items = items.add(sockItem, attrs(nil).u32(sockFD, uint32(s.Fd())))
	}
	return a.add(attrSockets, items)
}
