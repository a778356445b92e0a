package blockdev

import (
	"bufio"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// fakeNBD is a small fixed-newstyle NBD server for the client's tests: it
// serves data read-only and injects faults a real server rarely shows
// (errors per request, dropped connections, silence, malformed replies).
type fakeNBD struct {
	t    testing.TB
	ln   net.Listener
	sock string

	mu sync.Mutex
	// The fields below are guarded by mu; tests change them between calls.
	data       []byte
	zero       []bool // per 4 KiB block: a hole (reads as zeroes)
	structured bool   // offer structured replies
	meta       bool   // offer base:allocation
	multiConn  bool
	minBlock   uint32 // 0: no INFO_BLOCK_SIZE
	maxBlock   uint32
	// fault, if set, decides per request: errno (0 = serve), and whether
	// to drop the connection, stay silent, or cover a read wrongly.
	fault  func(req fakeReq) fakeFault
	closed bool
	conns  map[net.Conn]bool

	requests   atomic.Int64
	accepted   atomic.Int64
	maxRequest atomic.Int64
	wg         sync.WaitGroup
}

type fakeReq struct {
	n        int64 // 1-based request number, over all connections
	cmd      uint16
	off, len uint64
}

type fakeFault struct {
	errno   uint32
	drop    bool // close the connection instead of replying
	silent  bool // never reply
	badData bool // a structured read reply that misses its last byte
}

func newFakeNBD(t testing.TB, data []byte) *fakeNBD {
	t.Helper()
	s := &fakeNBD{t: t, data: data, structured: true, meta: true, conns: map[net.Conn]bool{}}
	s.zero = make([]bool, (len(data)+4095)/4096)
	s.sock = filepath.Join(testutil.ShortDir(t), "fake.sock")
	ln, err := net.Listen("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	s.ln = ln
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(s.stop)
	return s
}

func (s *fakeNBD) uri() string { return "nbd+unix:///disk?socket=" + s.sock }

func (s *fakeNBD) set(fn func(s *fakeNBD)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(s)
}

// dropAll closes every open connection (a server restart, from the
// client's point of view).
func (s *fakeNBD) dropAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.Close()
	}
}

func (s *fakeNBD) stop() {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.ln.Close()
	s.wg.Wait()
}

func (s *fakeNBD) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = true
		s.mu.Unlock()
		s.accepted.Add(1)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serve(c)
			c.Close()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

func be16(b []byte, v uint16) []byte { return binary.BigEndian.AppendUint16(b, v) }
func be32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
func be64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

func (s *fakeNBD) optReply(w io.Writer, opt, typ uint32, data []byte) error {
	b := be64(nil, nbdwire.OptReplyMagic)
	b = be32(b, opt)
	b = be32(b, typ)
	b = be32(b, uint32(len(data)))
	_, err := w.Write(append(b, data...))
	return err
}

func (s *fakeNBD) serve(c net.Conn) {
	r := bufio.NewReader(c)
	s.mu.Lock()
	structuredOffered, metaOffered, multi := s.structured, s.meta, s.multiConn
	minB, maxB := s.minBlock, s.maxBlock
	size := uint64(len(s.data))
	s.mu.Unlock()
	hello := be64(nil, nbdwire.NBDMagic)
	hello = be64(hello, nbdwire.OptMagic)
	hello = be16(hello, nbdwire.FlagFixedNewstyle|nbdwire.FlagNoZeroes)
	if _, err := c.Write(hello); err != nil {
		return
	}
	var cflags uint32
	if binary.Read(r, binary.BigEndian, &cflags) != nil {
		return
	}
	structured, metaID := false, uint32(0)
	for {
		var hdr [16]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		data := make([]byte, binary.BigEndian.Uint32(hdr[12:]))
		if _, err := io.ReadFull(r, data); err != nil {
			return
		}
		switch opt {
		case nbdwire.OptStructuredReply:
			if structuredOffered {
				structured = true
				s.optReply(c, opt, nbdwire.RepAck, nil)
			} else {
				s.optReply(c, opt, nbdwire.RepErrUnsup, nil)
			}
		case nbdwire.OptSetMetaContext:
			if !metaOffered || !structured {
				s.optReply(c, opt, nbdwire.RepErrUnsup, nil)
				continue
			}
			metaID = 7
			s.optReply(c, opt, nbdwire.RepMetaContext, append(be32(nil, metaID), nbdwire.MetaContextBaseAllocation...))
			s.optReply(c, opt, nbdwire.RepAck, nil)
		case nbdwire.OptGo:
			flags := nbdwire.FlagHasFlags | 2 // read-only
			if multi {
				flags |= nbdwire.FlagCanMultiConn
			}
			info := be16(nil, nbdwire.InfoExport)
			info = be64(info, size)
			info = be16(info, flags)
			s.optReply(c, opt, nbdwire.RepInfo, info)
			if minB != 0 {
				bs := be16(nil, nbdwire.InfoBlockSize)
				bs = be32(bs, minB)
				bs = be32(bs, 4096)
				bs = be32(bs, maxB)
				s.optReply(c, opt, nbdwire.RepInfo, bs)
			}
			s.optReply(c, opt, nbdwire.RepAck, nil)
			s.transmit(c, r, structured, metaID, minB, maxB)
			return
		case nbdwire.OptAbort:
			s.optReply(c, opt, nbdwire.RepAck, nil)
			return
		default:
			s.optReply(c, opt, nbdwire.RepErrUnsup, nil)
		}
	}
}

func (s *fakeNBD) transmit(c net.Conn, r *bufio.Reader, structured bool, metaID, minB, maxB uint32) {
	var wmu sync.Mutex
	write := func(b []byte) { wmu.Lock(); c.Write(b); wmu.Unlock() }
	var replies sync.WaitGroup
	defer replies.Wait()
	for {
		var hdr [28]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		req := fakeReq{
			n:   s.requests.Add(1),
			cmd: binary.BigEndian.Uint16(hdr[6:]),
			off: binary.BigEndian.Uint64(hdr[16:]),
			len: uint64(binary.BigEndian.Uint32(hdr[24:])),
		}
		handle := binary.BigEndian.Uint64(hdr[8:])
		if req.cmd == nbdwire.CmdDisc {
			return
		}
		if req.cmd == nbdwire.CmdRead {
			for old := s.maxRequest.Load(); int64(req.len) > old && !s.maxRequest.CompareAndSwap(old, int64(req.len)); old = s.maxRequest.Load() {
			}
		}
		s.mu.Lock()
		var f fakeFault
		if s.fault != nil {
			f = s.fault(req)
		}
		size := uint64(len(s.data))
		s.mu.Unlock()
		switch {
		case req.off+req.len > size:
			f.errno = uint32(syscall.EINVAL)
		case minB > 1 && (req.off%uint64(minB) != 0 || req.len%uint64(minB) != 0 && req.off+req.len != size):
			f.errno = uint32(syscall.EINVAL)
		case maxB > 0 && req.cmd == nbdwire.CmdRead && req.len > uint64(maxB):
			f.errno = uint32(syscall.EINVAL)
		}
		if f.drop {
			c.Close()
			return
		}
		if f.silent {
			continue
		}
		replies.Add(1)
		go func() {
			defer replies.Done()
			write(s.reply(req, handle, f, structured, metaID))
		}()
	}
}

// reply builds the whole reply to one request.
func (s *fakeNBD) reply(req fakeReq, handle uint64, f fakeFault, structured bool, metaID uint32) []byte {
	chunk := func(b []byte, flags, typ uint16, payload []byte) []byte {
		b = be32(b, nbdwire.StructuredReplyMagic)
		b = be16(b, flags)
		b = be16(b, typ)
		b = be64(b, handle)
		b = be32(b, uint32(len(payload)))
		return append(b, payload...)
	}
	if f.errno != 0 {
		if !structured {
			return be64(be32(be32(nil, nbdwire.SimpleReplyMagic), f.errno), handle)
		}
		p := be32(nil, f.errno)
		p = be16(p, 4)
		p = append(p, "boom"...)
		return chunk(nil, nbdwire.ReplyFlagDone, nbdwire.ReplyTypeError, p)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch req.cmd {
	case nbdwire.CmdRead:
		data := s.data[req.off : req.off+req.len]
		if !structured {
			b := be64(be32(be32(nil, nbdwire.SimpleReplyMagic), 0), handle)
			return append(b, data...)
		}
		// Random chunks, out of order, holes as OFFSET_HOLE.
		var b []byte
		type piece struct{ off, n uint64 }
		var pieces []piece
		for o := uint64(0); o < req.len; {
			n := min(req.len-o, 1+rand.Uint64N(req.len))
			pieces = append(pieces, piece{o, n})
			o += n
		}
		if f.badData {
			pieces[len(pieces)-1].n--
		}
		rand.Shuffle(len(pieces), func(i, j int) { pieces[i], pieces[j] = pieces[j], pieces[i] })
		for i, p := range pieces {
			var flags uint16
			if i == len(pieces)-1 {
				flags = nbdwire.ReplyFlagDone
			}
			if p.n == 0 {
				b = chunk(b, flags, nbdwire.ReplyTypeNone, nil)
				continue
			}
			if allZero(data[p.off : p.off+p.n]) {
				pl := be64(nil, req.off+p.off)
				pl = be32(pl, uint32(p.n))
				b = chunk(b, flags, nbdwire.ReplyTypeOffsetHole, pl)
				continue
			}
			b = chunk(b, flags, nbdwire.ReplyTypeOffsetData, append(be64(nil, req.off+p.off), data[p.off:p.off+p.n]...))
		}
		return b
	case nbdwire.CmdBlockStatus:
		p := be32(nil, metaID)
		end := min(req.off+req.len, uint64(len(s.data)))
		for o := req.off; o < end; {
			z := s.zero[o/4096]
			e := o
			for e < end && s.zero[e/4096] == z {
				e = (e/4096 + 1) * 4096
			}
			var fl uint32
			if z {
				fl = nbdwire.StateHole | nbdwire.StateZero
			}
			p = be32(be32(p, uint32(e-o)), fl)
			o = e
		}
		return chunk(nil, nbdwire.ReplyFlagDone, nbdwire.ReplyTypeBlockStatus, p)
	}
	return chunk(nil, nbdwire.ReplyFlagDone, nbdwire.ReplyTypeError, be16(be32(nil, uint32(syscall.EINVAL)), 0))
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
