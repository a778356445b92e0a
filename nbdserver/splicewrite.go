package nbdserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"

	"golang.org/x/sys/unix"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// ErrNoSplice is what a SpliceWriter returns (wrapped or not) when it will
// not take a write from pipes. Nothing was taken from them: the server
// reads them into a buffer and writes that with WriteAt.
var ErrNoSplice = errors.New("nbdserver: write cannot be spliced")

// SpliceWriter is an optional interface of an Export whose writes can go
// straight into a file. For a large WRITE on a TCP connection (not TLS)
// the reader moves the payload from the socket into pipes (splice(2): the
// pipes take the socket buffers' pages), and the worker has the export
// move it on into its file: one copy (into the page cache) is left of the
// two a buffered write costs (socket to buffer, buffer to page cache).
type SpliceWriter interface {
	// SpliceFrom writes the bytes waiting in the pipes: each piece's N
	// bytes, from the pipe whose read end is Pipe, at Off, the pieces in
	// order and contiguous, exactly as WriteAt would write them (fua for
	// all of them), or fails as WriteAt fails. ErrNoSplice means nothing
	// was taken from any pipe.
	SpliceFrom(ctx context.Context, pieces []SplicePiece, fua bool) error
}

// A WRITE's payload goes into pipes in pieces of writePiece bytes, half a
// pipe: a socket's buffers are spliced one page (slot) at a time, and a
// payload that does not start on a page, or came in segments that do not
// end on one, spans more pages than its length says (1 MiB took 257 slots
// of a 256-slot pipe). As for reads, payloads of spliceMin to 8 MiB.
const (
	writePiece     = pipeSize / 2
	maxWritePieces = maxPiecePipes * pipeSize / writePiece
)

// maxStuckSplices bounds the retries of a splice from a socket that has
// bytes queued but gives none. maxWriteMisses is how many payloads in a
// row a connection may fail to fit in their pipes before it stops
// splicing them: over a network whose segments carry ~1.5 KiB each (a
// pipe slot per segment) none fits, and each miss costs a splice and a
// copy back.
const (
	maxStuckSplices = 16
	maxWriteMisses  = 4
)

// spliceableWrite reports whether a WRITE's payload may go into pipes on
// this connection.
func (c *conn) spliceableWrite(req nbdwire.Request) bool {
	return c.sock != nil && c.spliceWriter != nil && c.writeMisses < maxWriteMisses &&
		req.Length >= spliceMin && (int(req.Length)+writePiece-1)/writePiece <= maxWritePieces
}

// readPayload reads a WRITE's payload of n bytes into a pooled buffer.
func (c *conn) readPayload(n int) (*[]byte, error) {
	bp := c.s.buffers.get(n)
	if _, err := io.ReadFull(c.r, *bp); err != nil {
		c.s.buffers.put(bp)
		return nil, err
	}
	return bp, nil
}

// readPayloadPiped consumes a WRITE's payload of n bytes from the
// connection into pipes, writePiece bytes each, chained in order. When the pool
// has too few pipes, or a pipe runs out of slots before it holds its
// piece (the socket's data came in many small buffers), the payload goes
// into a pooled buffer instead, the pipes' bytes first. An error is a
// read error: the connection is done, and nothing is returned.
func (c *conn) readPayloadPiped(n int) (*pipe, *[]byte, error) {
	head := c.s.pipes.getChain((n + writePiece - 1) / writePiece)
	if head == nil {
		bp, err := c.readPayload(n)
		return nil, bp, err
	}
	left := n
	for pp := head; pp != nil; pp = pp.next {
		m := min(left, writePiece)
		full, err := c.fillPipe(pp, m)
		if err != nil {
			c.s.pipes.dropChain(head)
			return nil, nil, err
		}
		if full {
			c.writeMisses++
			c.log.Debug("nbdserver: a write's payload does not fit its pipes; reading it into a buffer", "length", n, "piece_bytes", pp.n, "misses", c.writeMisses)
			if c.writeMisses == maxWriteMisses {
				c.log.Info("nbdserver: this connection's write payloads come in segments too small for pipes; no longer splicing them", "misses", c.writeMisses)
			}
			bp, err := c.unpipe(head, n)
			return nil, bp, err
		}
		left -= m
	}
	c.writeMisses = 0
	return head, nil, nil
}

// fillPipe moves the next m bytes of the connection into an empty pipe:
// what the reader has buffered with write(2), the rest with splice(2)
// straight from the socket (the reader's buffer is empty by then, so no
// byte is read out of order). full reports a pipe without room for all m
// while the socket has bytes waiting; pp.n says what the pipe holds.
func (c *conn) fillPipe(pp *pipe, m int) (full bool, err error) {
	if b := min(c.r.Buffered(), m); b > 0 {
		p, _ := c.r.Peek(b) // cannot fail: b bytes are buffered
		k, err := writeSome(pp.w, p)
		c.r.Discard(k)
		pp.n = k
		if err != nil || k < b {
			return err == nil, err // k < b: the pipe is full
		}
	}
	if pp.n == m {
		return false, nil
	}
	var serr error
	stuck := 0 // EAGAINs in a row with bytes in the socket
	err = c.sock.Read(func(fd uintptr) bool {
		for pp.n < m {
			k, err := unix.Splice(int(fd), nil, pp.w, nil, m-pp.n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				// An empty socket, a full pipe, or (seen on TCP) a socket
				// whose queued bytes splice does not take yet. An empty
				// socket is worth a wait for more bytes; with bytes
				// queued there may be no more to wake a waiter, so the
				// splice is tried again a few times, then given up.
				q, qerr := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
				if qerr != nil || q == 0 {
					stuck = 0
					return false
				}
				if stuck++; stuck > maxStuckSplices {
					full = true
					return true
				}
				runtime.Gosched()
				continue
			case err != nil:
				serr = os.NewSyscallError("splice", err)
				return true
			case k == 0:
				serr = io.ErrUnexpectedEOF // the client closed mid-payload
				return true
			}
			pp.n += int(k)
			stuck = 0
		}
		return true
	})
	if err == nil {
		err = serr
	}
	return full, err
}

// unpipe finishes reading a payload of n bytes some of which are in pipes
// into a pooled buffer: the pipes' bytes in order, then the rest from the
// connection. The pipes, emptied, go back to the pool.
func (c *conn) unpipe(head *pipe, n int) (*[]byte, error) {
	bp := c.s.buffers.get(n)
	got, err := readPipes(head, *bp)
	c.s.pipes.putOrDropChain(head)
	if err == nil {
		_, err = io.ReadFull(c.r, (*bp)[got:])
	}
	if err != nil {
		c.s.buffers.put(bp)
		return nil, err
	}
	return bp, nil
}

// readPipes reads what the chained pipes hold (pp.n bytes each) into p, in
// order, and returns how many bytes that was.
func readPipes(head *pipe, p []byte) (int, error) {
	got := 0
	for pp := head; pp != nil; pp = pp.next {
		for end := got + pp.n; got < end; {
			k, err := unix.Read(pp.r, p[got:end])
			switch {
			case err == unix.EINTR:
				continue
			case err != nil:
				return got, fmt.Errorf("nbdserver: read back from a pipe: %w", err)
			case k == 0:
				return got, fmt.Errorf("nbdserver: read back from a pipe: %w", io.ErrUnexpectedEOF)
			}
			got += k
		}
		pp.n = 0
	}
	return got, nil
}

// serveSplicedWrite writes a WRITE whose payload is in pipes through the
// export's SpliceFrom or, when it will not take them (ErrNoSplice), with
// WriteAt from a buffer the pipes are read into. The pipes go back to the
// pool (or are closed if a failure left bytes in them).
func (c *conn) serveSplicedWrite(req nbdwire.Request, head *pipe) error {
	var cut [maxWritePieces]SplicePiece
	ps := cut[:0]
	off := int64(req.Offset)
	for pp := head; pp != nil; pp = pp.next {
		ps = append(ps, SplicePiece{Pipe: pp.r, Off: off, N: pp.n})
		off += int64(pp.n)
	}
	fua := req.Flags&nbdwire.CmdFlagFUA != 0
	err := c.spliceWriter.SpliceFrom(c.ctx, ps, fua)
	if !errors.Is(err, ErrNoSplice) {
		c.s.pipes.putOrDropChain(head)
		return err
	}
	c.log.Debug("nbdserver: write not spliced; writing it from a buffer", "offset", req.Offset, "length", req.Length, "err", err)
	bp := c.s.buffers.get(int(req.Length))
	defer c.s.buffers.put(bp)
	_, err = readPipes(head, *bp)
	c.s.pipes.putOrDropChain(head)
	if err != nil {
		return err
	}
	return c.exp.WriteAt(c.ctx, *bp, int64(req.Offset), fua)
}

// writeSome writes as much of b to a non-blocking pipe as it has room
// for, and returns how much that was.
func writeSome(fd int, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := unix.Write(fd, b[n:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return n, nil
		case err != nil:
			return n, fmt.Errorf("nbdserver: write to a pipe: %w", err)
		}
		n += k
	}
	return n, nil
}
