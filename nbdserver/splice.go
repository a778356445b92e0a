package nbdserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// Splicer is an optional interface of an Export whose reads can come
// straight from a file. For a large READ on a plain (not TLS) socket the
// server then has the export move the bytes into pipes (splice(2): a pipe
// takes references to page-cache pages), writes the reply header and
// moves them on from the pipes into the socket: the data is never copied
// through the server's memory, which halves the copies of a 1 MiB read.
type Splicer interface {
	// SpliceTo moves the bytes of a READ into pipes: each piece's N bytes
	// at Off into its Pipe, all of them, exactly the bytes ReadAt would
	// read, or fails. The pieces are the READ's range cut in order, each
	// fitting its pipe; one READ is one call. With dataOnly it fails
	// rather than move a range with a hole in it (the reply could describe
	// the hole instead). After any failure the server drops what the pipes
	// hold and reads the range with ReadAt, which reports errors as ReadAt
	// does: a failure here is never sent.
	SpliceTo(ctx context.Context, pieces []SplicePiece, dataOnly bool) error
}

// SplicePiece is one pipe's part of a spliced READ.
type SplicePiece struct {
	Pipe int // the pipe's write end
	Off  int64
	N    int
}

// Spliced READ replies: only reads of at least spliceMin bytes (below it, a
// copy costs less than the pipe's two system calls and the writev the
// reply no longer shares), spanning at most maxPiecePipes pipes' capacity
// (one pipe slot per page spanned), through at most maxPipes pipes per
// server, kept open between reads. A read spanning more than one pipe's
// pages is cut into pieces, one pipe each: the first ends where its pipe's
// 256 pages end, the others start on a page and fill a pipe. So one large
// read holds at most an eighth of the pool.
const (
	spliceMin     = 128 << 10
	pipeSize      = 1 << 20 // the default /proc/sys/fs/pipe-max-size: no privilege needed
	maxPipes      = 64
	maxPiecePipes = 8
	pageSize      = 4096
)

// pipe is a pipe for one piece of a spliced reply: empty, with n zero and
// no next, whenever it is in the pool. A reply's pieces are chained in
// order through next; n is the bytes its piece put in the pipe.
type pipe struct {
	r, w int
	n    int
	next *pipe
}

// pipePool keeps empty pipes of pipeSize for spliced replies.
type pipePool struct {
	log    *slog.Logger
	size   int // of each pipe: pipeSize (tests make it smaller)
	warned sync.Once

	mu sync.Mutex
	// Guarded by mu.
	free   []*pipe
	open   int  // pipes made and not closed
	denied bool // the kernel refused pipeSize (EPERM): no more tries
	closed bool
}

// get returns an empty pipe, or nil when none can be had: maxPipes are in
// use, or making one failed. Nil means the read is served from a buffer.
func (p *pipePool) get() *pipe {
	p.mu.Lock()
	if k := len(p.free); k > 0 {
		pp := p.free[k-1]
		p.free = p.free[:k-1]
		p.mu.Unlock()
		return pp
	}
	if p.denied || p.closed || p.open >= maxPipes {
		p.mu.Unlock()
		return nil
	}
	p.open++
	p.mu.Unlock()
	pp, err := newPipe(p.size)
	if err != nil {
		p.mu.Lock()
		p.open--
		p.denied = p.denied || errors.Is(err, unix.EPERM)
		p.mu.Unlock()
		p.warned.Do(func() { p.log.Warn("nbdserver: cannot make a pipe; large reads are copied, not spliced", "err", err) })
		return nil
	}
	return pp
}

// put returns an empty pipe to the pool.
func (p *pipePool) put(pp *pipe) {
	pp.n, pp.next = 0, nil
	p.mu.Lock()
	if !p.closed {
		p.free = append(p.free, pp)
		p.mu.Unlock()
		return
	}
	p.open--
	p.mu.Unlock()
	pp.close()
}

// putOrDrop returns a pipe that may still hold bytes: an empty one is
// kept, one with bytes in it is closed (reading them out would cost the
// copy the pipe was meant to save).
func (p *pipePool) putOrDrop(pp *pipe) {
	// TIOCINQ is FIONREAD: the bytes in the pipe.
	if queued, err := unix.IoctlGetInt(pp.r, unix.TIOCINQ); err == nil && queued == 0 {
		p.put(pp)
		return
	}
	p.drop(pp)
}

// drop closes a pipe whose contents are not wanted.
func (p *pipePool) drop(pp *pipe) {
	p.mu.Lock()
	p.open--
	p.mu.Unlock()
	pp.close()
}

// getChain returns k empty pipes chained through next, or nil, having
// taken none, when the pool cannot give k.
func (p *pipePool) getChain(k int) *pipe {
	var head *pipe
	for range k {
		pp := p.get()
		if pp == nil {
			p.putOrDropChain(head) // all empty: kept
			return nil
		}
		pp.next, head = head, pp
	}
	return head
}

// dropChain drops a reply's chained pipes, whatever they hold.
func (p *pipePool) dropChain(pp *pipe) {
	for pp != nil {
		next := pp.next
		p.drop(pp)
		pp = next
	}
}

// putOrDropChain is putOrDrop for each of a reply's chained pipes.
func (p *pipePool) putOrDropChain(pp *pipe) {
	for pp != nil {
		next := pp.next
		p.putOrDrop(pp)
		pp = next
	}
}

// close closes the idle pipes; pipes still in use are closed when they
// come back.
func (p *pipePool) close() {
	p.mu.Lock()
	p.closed = true
	free := p.free
	p.free = nil
	p.open -= len(free)
	p.mu.Unlock()
	for _, pp := range free {
		pp.close()
	}
}

func newPipe(size int) (*pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, os.NewSyscallError("pipe2", err)
	}
	pp := &pipe{r: fds[0], w: fds[1]}
	if _, err := unix.FcntlInt(uintptr(pp.w), unix.F_SETPIPE_SZ, size); err != nil {
		pp.close()
		return nil, fmt.Errorf("fcntl(F_SETPIPE_SZ, %d): %w", size, err)
	}
	return pp, nil
}

func (pp *pipe) close() {
	unix.Close(pp.r)
	unix.Close(pp.w)
}

// spliceable reports whether a READ may be spliced on this connection.
func (c *conn) spliceable(req nbdwire.Request) bool {
	if c.sock == nil || c.splicer == nil || req.Length < spliceMin {
		return false
	}
	return pieces(req.Offset, req.Length) <= maxPiecePipes
}

// pieces is how many pipes a spliced read of n bytes at off takes; the
// first piece ends where a pipe's worth of pages from off's page ends.
func pieces(off uint64, n uint32) int {
	base := off / pageSize * pageSize
	return int((off + uint64(n) - base + pipeSize - 1) / pipeSize)
}

// serveSpliced answers a successful READ with its data in pipes, or
// reports false having sent nothing, so that the caller reads into a
// buffer instead. Every pipe is had before any byte moves, so a pool that
// runs dry costs no splice; a piece that fails fails the whole read.
func (c *conn) serveSpliced(req nbdwire.Request, held int64) bool {
	head := c.s.pipes.getChain(pieces(req.Offset, req.Length))
	if head == nil {
		return false
	}
	var cut [maxPiecePipes]SplicePiece
	ps := cut[:0]
	off, end := int64(req.Offset), int64(req.Offset)+int64(req.Length)
	pieceEnd := off/pageSize*pageSize + pipeSize
	for pp := head; pp != nil; pp = pp.next {
		pp.n = int(min(pieceEnd, end) - off)
		ps = append(ps, SplicePiece{Pipe: pp.w, Off: off, N: pp.n})
		off, pieceEnd = off+int64(pp.n), pieceEnd+pipeSize
	}
	dataOnly := c.structured && req.Flags&nbdwire.CmdFlagDF == 0
	if err := c.splicer.SpliceTo(c.ctx, ps, dataOnly); err != nil {
		c.s.pipes.putOrDropChain(head)
		c.log.Debug("nbdserver: read not spliced; reading it into a buffer", "offset", req.Offset, "length", req.Length, "err", err)
		return false
	}
	o := owed{held: held, pipe: head}
	n := int(req.Length)
	if !c.structured {
		var hdr [nbdwire.SimpleReplyHeaderLen]byte
		nbdwire.PutSimpleReply(hdr[:], 0, req.Handle)
		c.send(o, hdr[:])
		return true
	}
	// One final data chunk: the bytes are in the pipes already, so no error
	// can arise while they are sent (the spec's condition for DONE on
	// data). dataOnly made sure there was no hole to describe.
	var hdr [nbdwire.StructuredReplyHeaderLen + 8]byte
	nbdwire.PutChunkHeader(hdr[:], nbdwire.ReplyFlagDone, nbdwire.ReplyTypeOffsetData, req.Handle, uint32(8+n))
	be.PutUint64(hdr[nbdwire.StructuredReplyHeaderLen:], req.Offset)
	c.send(o, hdr[:])
	return true
}

// spliceSocket finds the socket under a plain connection, for splicing
// into it; nil over TLS or on anything but a Unix or TCP socket.
func spliceSocket(nc net.Conn, tls bool) syscall.RawConn {
	if tls {
		return nil
	}
	switch nc.(type) {
	case *net.UnixConn, *net.TCPConn:
	default:
		return nil
	}
	rc, err := nc.(syscall.Conn).SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// writeSpliced moves n bytes from a pipe into the socket, waiting for room
// in the socket as a write does.
func (c *conn) writeSpliced(pp *pipe, n int) error {
	var serr error
	err := c.sock.Write(func(fd uintptr) bool {
		for n > 0 {
			m, err := unix.Splice(pp.r, nil, int(fd), nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return false // the socket is full: wait until it is writable
			case err != nil:
				serr = os.NewSyscallError("splice", err)
				return true
			case m == 0:
				serr = io.ErrUnexpectedEOF // the pipe ran dry: cannot happen
				return true
			}
			n -= int(m)
		}
		return true
	})
	if err != nil {
		return err
	}
	return serr
}
