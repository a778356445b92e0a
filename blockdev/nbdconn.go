package blockdev

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// errConnDropped: the connection a request was sent on died before the
// reply came. Retried on another connection.
var errConnDropped = errors.New("blockdev: NBD connection dropped")

// nbdInfo is what a handshake learned about the export.
type nbdInfo struct {
	size                          int64
	flags                         uint16
	minBlock, prefBlock, maxBlock uint32
	structured                    bool
	hasMeta                       bool
	metaID                        uint32 // base:allocation's context id
}

func (i nbdInfo) multiConn() bool { return i.flags&nbdwire.FlagCanMultiConn != 0 }

// nbdConn is one NBD connection in its transmission phase: requests are
// written under wmu, one reader goroutine matches replies to requests by
// handle, so many requests are in flight at once.
type nbdConn struct {
	nc         net.Conn
	info       nbdInfo
	reqTimeout time.Duration

	wmu  sync.Mutex
	wbuf [nbdwire.RequestHeaderLen]byte // guarded by wmu

	mu sync.Mutex
	// The fields below are guarded by mu.
	pending    map[uint64]*nbdReq
	nextHandle uint64
	err        error // why the connection died; nil while it lives

	slots      chan struct{} // one per request in flight
	dead       chan struct{} // closed when err is set
	readerDone chan struct{} // closed when the reader has exited: no buffer is touched after it
	inFlight   atomic.Int64
}

// nbdReq is one request. The reader goroutine is the only writer of buf,
// spans, extents and err until it sends on done (exactly once).
type nbdReq struct {
	cmd    uint16
	off    uint64
	length uint32
	buf    []byte // READ: where the data goes
	spans  [][2]uint64
	exts   []Extent
	err    error
	done   chan error
}

// dialNBD connects and negotiates; ctx bounds the whole handshake.
func dialNBD(ctx context.Context, a nbdAddress, opts *NBDOptions) (*nbdConn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, a.network, a.address)
	if err != nil {
		return nil, fmt.Errorf("blockdev: connect %s %s: %w", a.network, a.address, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	h := &nbdHandshake{conn: nc, addr: a, opts: opts}
	info, err := h.run(ctx)
	interrupted := !stop()
	if err == nil && interrupted {
		err = ctx.Err()
	}
	if err != nil {
		h.conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("blockdev: NBD handshake with %s: %w: %w", a.address, ErrTimeout, err)
		}
		return nil, err
	}
	h.conn.SetDeadline(time.Time{})
	c := &nbdConn{
		nc:         h.conn,
		info:       info,
		reqTimeout: opts.RequestTimeout,
		pending:    make(map[uint64]*nbdReq),
		slots:      make(chan struct{}, opts.InFlight),
		dead:       make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	go c.reader(bufio.NewReaderSize(h.conn, 128<<10))
	return c, nil
}

// nbdHandshake is the fixed-newstyle negotiation of one connection.
type nbdHandshake struct {
	conn net.Conn
	addr nbdAddress
	opts *NBDOptions
	buf  [nbdwire.OptionReplyHeaderLen]byte
}

func (h *nbdHandshake) run(ctx context.Context) (nbdInfo, error) {
	var info nbdInfo
	hdr := make([]byte, 18) // NBDMAGIC, IHAVEOPT, handshake flags
	if _, err := io.ReadFull(h.conn, hdr); err != nil {
		return info, fmt.Errorf("blockdev: NBD greeting from %s: %w", h.addr.address, err)
	}
	if binary.BigEndian.Uint64(hdr) != nbdwire.NBDMagic {
		return info, permanent(fmt.Errorf("%w: %s is not an NBD server", ErrProtocol, h.addr.address))
	}
	if binary.BigEndian.Uint64(hdr[8:]) != nbdwire.OptMagic {
		return info, permanent(fmt.Errorf("%w: %s speaks oldstyle NBD; fixed newstyle is required", ErrProtocol, h.addr.address))
	}
	sflags := binary.BigEndian.Uint16(hdr[16:])
	if sflags&nbdwire.FlagFixedNewstyle == 0 {
		return info, permanent(fmt.Errorf("%w: %s does not speak fixed newstyle NBD", ErrProtocol, h.addr.address))
	}
	cflags := nbdwire.FlagCFixedNewstyle
	noZeroes := sflags&nbdwire.FlagNoZeroes != 0
	if noZeroes {
		cflags |= nbdwire.FlagCNoZeroes
	}
	if err := binary.Write(h.conn, binary.BigEndian, cflags); err != nil {
		return info, err
	}
	if h.addr.tls {
		if err := h.startTLS(ctx); err != nil {
			return info, err
		}
	}
	// Structured replies: reads may come as several chunks, and
	// BLOCK_STATUS needs them.
	typ, _, err := h.option(nbdwire.OptStructuredReply, nil)
	if err != nil {
		return info, err
	}
	info.structured = typ == nbdwire.RepAck
	if info.structured && !h.opts.NoBlockStatus {
		if err := h.metaContext(&info); err != nil {
			return info, err
		}
	}
	if err := h.goOption(&info, noZeroes); err != nil {
		return info, err
	}
	if info.minBlock == 0 {
		info.minBlock = nbdwire.DefaultMinBlockSize
	}
	if info.prefBlock == 0 {
		info.prefBlock = nbdwire.DefaultPreferredBlockSize
	}
	if info.maxBlock == 0 {
		info.maxBlock = nbdwire.DefaultMaxBlockSize
	}
	if info.minBlock&(info.minBlock-1) != 0 || info.maxBlock < info.minBlock {
		return info, permanent(fmt.Errorf("%w: bad block sizes min %d max %d", ErrProtocol, info.minBlock, info.maxBlock))
	}
	return info, nil
}

func (h *nbdHandshake) startTLS(ctx context.Context) error {
	typ, data, err := h.option(nbdwire.OptStartTLS, nil)
	if err != nil {
		return err
	}
	if typ != nbdwire.RepAck {
		return permanent(fmt.Errorf("blockdev: %s refused STARTTLS: %s", h.addr.address, repErr(typ, data)))
	}
	cfg := &tls.Config{}
	if h.opts.TLSConfig != nil {
		cfg = h.opts.TLSConfig.Clone()
	}
	if cfg.ServerName == "" {
		cfg.ServerName = h.addr.serverName
	}
	if !h.addr.tlsVerify {
		cfg.InsecureSkipVerify = true
	}
	if dir := h.addr.tlsCertDir; dir != "" {
		pem, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
		if err != nil {
			return permanent(fmt.Errorf("blockdev: tls-certificates: %w", err))
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return permanent(fmt.Errorf("blockdev: tls-certificates: no certificate in %s/ca-cert.pem", dir))
		}
		cfg.RootCAs = pool
		if cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client-cert.pem"), filepath.Join(dir, "client-key.pem")); err == nil {
			cfg.Certificates = []tls.Certificate{cert}
		}
	}
	tc := tls.Client(h.conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return permanent(fmt.Errorf("blockdev: TLS handshake with %s: %w", h.addr.address, err))
	}
	h.conn = tc
	return nil
}

// option sends one option and reads its final reply (any INFO or
// META_CONTEXT replies before it are returned by the callers that expect
// them, so this is for options with a single reply).
func (h *nbdHandshake) option(opt uint32, data []byte) (uint32, []byte, error) {
	if err := h.sendOption(opt, data); err != nil {
		return 0, nil, err
	}
	return h.reply(opt)
}

func (h *nbdHandshake) sendOption(opt uint32, data []byte) error {
	b := make([]byte, nbdwire.OptionHeaderLen+len(data))
	nbdwire.PutOptionHeader(b, opt, uint32(len(data)))
	copy(b[nbdwire.OptionHeaderLen:], data)
	_, err := h.conn.Write(b)
	return err
}

func (h *nbdHandshake) reply(opt uint32) (uint32, []byte, error) {
	if _, err := io.ReadFull(h.conn, h.buf[:]); err != nil {
		return 0, nil, fmt.Errorf("blockdev: NBD option reply: %w", err)
	}
	replyTo, typ, n := nbdwire.ParseOptionReplyHeader(h.buf[:])
	if binary.BigEndian.Uint64(h.buf[:]) != nbdwire.OptReplyMagic || replyTo != opt {
		return 0, nil, fmt.Errorf("%w: bad option reply", ErrProtocol)
	}
	if n > 64<<10 {
		return 0, nil, fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(h.conn, data); err != nil {
		return 0, nil, err
	}
	return typ, data, nil
}

func repErr(typ uint32, data []byte) string {
	var what string
	switch typ {
	case nbdwire.RepErrUnsup:
		what = "unsupported"
	case nbdwire.RepErrPolicy:
		what = "forbidden by policy"
	case nbdwire.RepErrInvalid:
		what = "invalid"
	case nbdwire.RepErrTLSReqd:
		what = "TLS required (use an nbds:// URI)"
	case nbdwire.RepErrUnknown:
		what = "unknown export"
	case nbdwire.RepErrShutdown:
		what = "server shutting down"
	case nbdwire.RepErrBlockSizeReqd:
		what = "block size required"
	default:
		what = fmt.Sprintf("reply type %#x", typ)
	}
	if len(data) > 0 {
		return what + ": " + string(data)
	}
	return what
}

func exportData(name string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	return append(b, name...)
}

func (h *nbdHandshake) metaContext(info *nbdInfo) error {
	data := exportData(h.addr.export)
	data = binary.BigEndian.AppendUint32(data, 1)
	data = binary.BigEndian.AppendUint32(data, uint32(len(nbdwire.MetaContextBaseAllocation)))
	data = append(data, nbdwire.MetaContextBaseAllocation...)
	if err := h.sendOption(nbdwire.OptSetMetaContext, data); err != nil {
		return err
	}
	for {
		typ, d, err := h.reply(nbdwire.OptSetMetaContext)
		if err != nil {
			return err
		}
		switch {
		case typ == nbdwire.RepMetaContext && len(d) >= 4:
			if string(d[4:]) == nbdwire.MetaContextBaseAllocation {
				info.hasMeta, info.metaID = true, binary.BigEndian.Uint32(d)
			}
		case typ == nbdwire.RepAck:
			return nil
		case typ&nbdwire.RepFlagError != 0:
			return nil // no block status: every extent is data
		default:
			return fmt.Errorf("%w: SET_META_CONTEXT reply %#x", ErrProtocol, typ)
		}
	}
}

// goOption is NBD_OPT_GO asking for the block-size constraints, with the
// NBD_OPT_EXPORT_NAME fallback for servers without it.
func (h *nbdHandshake) goOption(info *nbdInfo, noZeroes bool) error {
	data := exportData(h.addr.export)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, nbdwire.InfoBlockSize)
	if err := h.sendOption(nbdwire.OptGo, data); err != nil {
		return err
	}
	gotExport := false
	for {
		typ, d, err := h.reply(nbdwire.OptGo)
		if err != nil {
			return err
		}
		switch {
		case typ == nbdwire.RepInfo && len(d) >= 2:
			switch binary.BigEndian.Uint16(d) {
			case nbdwire.InfoExport:
				if len(d) < nbdwire.InfoExportLen {
					return fmt.Errorf("%w: short INFO_EXPORT", ErrProtocol)
				}
				info.size = int64(binary.BigEndian.Uint64(d[2:]))
				info.flags = binary.BigEndian.Uint16(d[10:])
				gotExport = true
			case nbdwire.InfoBlockSize:
				if len(d) < nbdwire.InfoBlockSizeLen {
					return fmt.Errorf("%w: short INFO_BLOCK_SIZE", ErrProtocol)
				}
				info.minBlock = binary.BigEndian.Uint32(d[2:])
				info.prefBlock = binary.BigEndian.Uint32(d[6:])
				info.maxBlock = binary.BigEndian.Uint32(d[10:])
			}
		case typ == nbdwire.RepInfo:
		case typ == nbdwire.RepAck:
			if !gotExport {
				return fmt.Errorf("%w: NBD_OPT_GO without export information", ErrProtocol)
			}
			return h.checkSize(info)
		case typ == nbdwire.RepErrUnsup:
			return h.exportName(info, noZeroes)
		case typ&nbdwire.RepFlagError != 0:
			err := fmt.Errorf("blockdev: NBD export %q on %s: %s", h.addr.export, h.addr.address, repErr(typ, d))
			if typ == nbdwire.RepErrShutdown {
				return err // the server may come back
			}
			return permanent(err)
		default:
			return fmt.Errorf("%w: NBD_OPT_GO reply %#x", ErrProtocol, typ)
		}
	}
}

func (h *nbdHandshake) exportName(info *nbdInfo, noZeroes bool) error {
	if err := h.sendOption(nbdwire.OptExportName, []byte(h.addr.export)); err != nil {
		return err
	}
	n := 10
	if !noZeroes {
		n += nbdwire.ExportNameZeroes
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(h.conn, b); err != nil {
		return fmt.Errorf("blockdev: NBD export %q on %s: %w", h.addr.export, h.addr.address, err)
	}
	info.size = int64(binary.BigEndian.Uint64(b))
	info.flags = binary.BigEndian.Uint16(b[8:])
	return h.checkSize(info)
}

func (h *nbdHandshake) checkSize(info *nbdInfo) error {
	if info.size < 0 {
		return permanent(fmt.Errorf("%w: export size %d", ErrProtocol, info.size))
	}
	return nil
}

// fail kills the connection (first error wins): every request in flight
// fails with a retriable error once the reader has exited.
func (c *nbdConn) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = err
	close(c.dead)
	c.nc.Close()
}

func (c *nbdConn) isDead() bool {
	select {
	case <-c.dead:
		return true
	default:
		return false
	}
}

// close says goodbye (NBD_CMD_DISC) and closes the connection.
func (c *nbdConn) close() {
	c.wmu.Lock()
	if !c.isDead() {
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.putHeader(nbdwire.CmdDisc, 0, 0, 0)
		c.nc.Write(c.wbuf[:])
	}
	c.wmu.Unlock()
	c.fail(ErrClosed)
	<-c.readerDone
}

func (c *nbdConn) putHeader(cmd uint16, handle, off uint64, length uint32) {
	nbdwire.PutRequest(c.wbuf[:], nbdwire.Request{Type: cmd, Handle: handle, Offset: off, Length: length})
}

// do sends req and waits for its reply, at most reqTimeout. A request
// that times out or whose ctx ends kills the connection (an NBD request
// cannot be cancelled), and do returns only once the reader has stopped,
// so no late reply can land in a buffer the caller reuses.
func (c *nbdConn) do(ctx context.Context, req *nbdReq) error {
	select {
	case c.slots <- struct{}{}:
	case <-c.dead:
		return c.deadErr()
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.slots }()
	c.inFlight.Add(1)
	defer c.inFlight.Add(-1)
	req.done = make(chan error, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.deadErr()
	}
	c.nextHandle++
	handle := c.nextHandle
	c.pending[handle] = req
	c.mu.Unlock()

	c.wmu.Lock()
	c.putHeader(req.cmd, handle, req.off, req.length)
	_, err := c.nc.Write(c.wbuf[:])
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("%w: write: %w", errConnDropped, err))
		<-c.readerDone
		<-req.done
		return c.deadErr()
	}
	timer := time.NewTimer(c.reqTimeout)
	defer timer.Stop()
	select {
	case err := <-req.done:
		return err
	case <-c.dead:
		<-c.readerDone
		return <-req.done
	case <-timer.C:
		err := fmt.Errorf("%w: no reply in %v", ErrTimeout, c.reqTimeout)
		c.fail(err)
		<-c.readerDone
		<-req.done
		return err
	case <-ctx.Done():
		c.fail(fmt.Errorf("%w: request abandoned: %w", errConnDropped, ctx.Err()))
		<-c.readerDone
		<-req.done
		return ctx.Err()
	}
}

func (c *nbdConn) deadErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if errors.Is(c.err, errConnDropped) || errors.Is(c.err, ErrTimeout) || errors.Is(c.err, ErrClosed) {
		return c.err
	}
	return fmt.Errorf("%w: %w", errConnDropped, c.err)
}

// reader matches replies to requests until the connection dies, then
// fails every request still pending.
func (c *nbdConn) reader(r *bufio.Reader) {
	defer close(c.readerDone)
	err := c.readReplies(r)
	c.fail(fmt.Errorf("%w: %w", errConnDropped, err))
	c.mu.Lock()
	pending := c.pending
	c.pending = nil
	c.mu.Unlock()
	dead := c.deadErr()
	for _, req := range pending {
		req.done <- dead
	}
}

func (c *nbdConn) lookup(handle uint64, remove bool) *nbdReq {
	c.mu.Lock()
	defer c.mu.Unlock()
	req := c.pending[handle]
	if remove && req != nil {
		delete(c.pending, handle)
	}
	return req
}

func (c *nbdConn) readReplies(r *bufio.Reader) error {
	var hdr [max(nbdwire.SimpleReplyHeaderLen, nbdwire.StructuredReplyHeaderLen)]byte
	for {
		if _, err := io.ReadFull(r, hdr[:4]); err != nil {
			return err
		}
		switch binary.BigEndian.Uint32(hdr[:]) {
		case nbdwire.SimpleReplyMagic:
			if _, err := io.ReadFull(r, hdr[4:nbdwire.SimpleReplyHeaderLen]); err != nil {
				return err
			}
			errno, handle := nbdwire.ParseSimpleReply(hdr[:])
			req := c.lookup(handle, true)
			if req == nil {
				return fmt.Errorf("%w: reply to unknown handle", ErrProtocol)
			}
			if errno != 0 {
				req.done <- serverErr(nbdErrno(errno))
				continue
			}
			if req.cmd == nbdwire.CmdRead {
				if _, err := io.ReadFull(r, req.buf); err != nil {
					req.done <- fmt.Errorf("%w: %w", errConnDropped, err)
					return err
				}
				req.done <- nil
				continue
			}
			req.done <- fmt.Errorf("%w: simple reply to BLOCK_STATUS", ErrProtocol)
			return fmt.Errorf("%w: simple reply to BLOCK_STATUS", ErrProtocol)
		case nbdwire.StructuredReplyMagic:
			if _, err := io.ReadFull(r, hdr[4:nbdwire.StructuredReplyHeaderLen]); err != nil {
				return err
			}
			if err := c.chunk(r, hdr[:]); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%w: bad reply magic %#x", ErrProtocol, binary.BigEndian.Uint32(hdr[:]))
		}
	}
}

func serverErr(e nbdErrno) error {
	if e.transient() {
		return e
	}
	return permanent(e)
}

// chunk handles one structured reply chunk.
func (c *nbdConn) chunk(r *bufio.Reader, hdr []byte) error {
	flags, typ, handle, length := nbdwire.ParseChunkHeader(hdr)
	done := flags&nbdwire.ReplyFlagDone != 0
	// The request stays pending until its last chunk is read whole: if
	// the connection dies mid-chunk, the reader's exit fails it.
	req := c.lookup(handle, false)
	if req == nil {
		return fmt.Errorf("%w: chunk for unknown handle", ErrProtocol)
	}
	bad := func(format string, args ...any) error {
		err := fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
		c.lookup(handle, true)
		req.done <- err
		return err
	}
	var small [16]byte
	switch typ {
	case nbdwire.ReplyTypeNone:
		if length != 0 || !done {
			return bad("NONE chunk of %d bytes", length)
		}
	case nbdwire.ReplyTypeOffsetData:
		if req.cmd != nbdwire.CmdRead || length < 8 {
			return bad("OFFSET_DATA chunk")
		}
		if _, err := io.ReadFull(r, small[:8]); err != nil {
			return err
		}
		off, n := binary.BigEndian.Uint64(small[:]), uint64(length-8)
		if off < req.off || off+n > req.off+uint64(req.length) {
			return bad("OFFSET_DATA %d+%d outside the request %d+%d", off, n, req.off, req.length)
		}
		if _, err := io.ReadFull(r, req.buf[off-req.off:off-req.off+n]); err != nil {
			return err
		}
		req.spans = append(req.spans, [2]uint64{off, n})
	case nbdwire.ReplyTypeOffsetHole:
		if req.cmd != nbdwire.CmdRead || length != 12 {
			return bad("OFFSET_HOLE chunk")
		}
		if _, err := io.ReadFull(r, small[:12]); err != nil {
			return err
		}
		off, n := binary.BigEndian.Uint64(small[:]), uint64(binary.BigEndian.Uint32(small[8:]))
		if off < req.off || off+n > req.off+uint64(req.length) {
			return bad("OFFSET_HOLE %d+%d outside the request", off, n)
		}
		clear(req.buf[off-req.off : off-req.off+n])
		req.spans = append(req.spans, [2]uint64{off, n})
	case nbdwire.ReplyTypeBlockStatus:
		if req.cmd != nbdwire.CmdBlockStatus || length < 4 || (length-4)%8 != 0 || length > 4+8*(1<<20) {
			return bad("BLOCK_STATUS chunk of %d bytes", length)
		}
		b := make([]byte, length)
		if _, err := io.ReadFull(r, b); err != nil {
			return err
		}
		if binary.BigEndian.Uint32(b) == c.info.metaID {
			for d := b[4:]; len(d) >= 8; d = d[8:] {
				n := binary.BigEndian.Uint32(d)
				fl := binary.BigEndian.Uint32(d[4:])
				if n == 0 {
					return bad("empty extent")
				}
				req.exts = append(req.exts, Extent{Length: int64(n), Hole: fl&nbdwire.StateHole != 0, Zero: fl&nbdwire.StateZero != 0})
			}
		}
	case nbdwire.ReplyTypeError, nbdwire.ReplyTypeErrorOffset:
		if length < 6 || length > 64<<10 {
			return bad("error chunk of %d bytes", length)
		}
		b := make([]byte, length)
		if _, err := io.ReadFull(r, b); err != nil {
			return err
		}
		errno := nbdErrno(binary.BigEndian.Uint32(b))
		msgLen := int(binary.BigEndian.Uint16(b[4:]))
		var err error = serverErr(errno)
		if msgLen > 0 && 6+msgLen <= len(b) {
			err = fmt.Errorf("%s: %w", b[6:6+msgLen], err)
		}
		if errno == 0 {
			err = fmt.Errorf("%w: error chunk with errno 0", ErrProtocol)
		}
		if req.err == nil {
			req.err = err
		}
	default:
		if typ&nbdwire.ReplyTypeFlagError == 0 {
			// An unknown informational chunk: skip it.
			if _, err := r.Discard(int(length)); err != nil {
				return err
			}
		} else {
			if _, err := r.Discard(int(length)); err != nil {
				return err
			}
			if req.err == nil {
				req.err = fmt.Errorf("%w: unknown error chunk type %#x", ErrProtocol, typ)
			}
		}
	}
	if done {
		c.lookup(handle, true)
		req.done <- req.finish()
	}
	return nil
}

// finish checks a completed structured reply: a read must be covered
// exactly once, byte for byte, or it fails (never wrong data).
func (req *nbdReq) finish() error {
	if req.err != nil {
		return req.err
	}
	switch req.cmd {
	case nbdwire.CmdRead:
		slices.SortFunc(req.spans, func(a, b [2]uint64) int { return cmp.Compare(a[0], b[0]) })
		next := req.off
		for _, s := range req.spans {
			if s[0] != next {
				return fmt.Errorf("%w: read reply does not cover %d..%d exactly", ErrProtocol, next, s[0])
			}
			next += s[1]
		}
		if next != req.off+uint64(req.length) {
			return fmt.Errorf("%w: read reply covers %d of %d bytes", ErrProtocol, next-req.off, req.length)
		}
	case nbdwire.CmdBlockStatus:
		if len(req.exts) == 0 {
			return fmt.Errorf("%w: BLOCK_STATUS reply without extents", ErrProtocol)
		}
	}
	return nil
}
