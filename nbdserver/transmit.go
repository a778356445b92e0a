package nbdserver

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// rejection is why the server fails a request without calling the export.
type rejection struct {
	errno uint32 // 0: accepted
	msg   string
}

// endReason says why the reader stopped.
type endReason int

const (
	endDisc     endReason = iota // NBD_CMD_DISC: finish what is in flight, then close
	endStopped                   // Disconnect, Close, cancelled Serve or broken reply stream
	endClosed                    // the client went away (or the read failed)
	endProtocol                  // the client broke the protocol: hard disconnect
)

// transmit runs the transmission phase until the connection ends. When it
// returns the connection is closed and no worker is running.
func (c *conn) transmit() {
	c.work = make(chan workItem)
	if sock := spliceSocket(c.nc, c.tlsWriter != nil); sock != nil {
		c.splicer, _ = c.exp.(Splicer)
		// WRITE payloads only from TCP: a Unix stream socket keeps most of
		// a large send in its buffers' linear part, which splice copies
		// into fresh pages, so splicing there costs what it saves.
		if _, tcp := c.nc.(*net.TCPConn); tcp {
			c.spliceWriter, _ = c.exp.(SpliceWriter)
		}
		if c.splicer != nil || c.spliceWriter != nil {
			c.sock = sock
		}
	}
	end := c.readLoop()
	close(c.work) // idle workers exit; busy ones after their request
	switch end {
	case endDisc:
		c.drain(false)
	case endStopped:
		c.drain(true)
	case endClosed, endProtocol:
		// Nobody will read the replies: cancel the requests right away.
	}
	c.cancel()
	c.nc.Close()
	c.workers.Wait()
}

// readLoop is the connection's only reader. It reads each request with its
// payload and hands it to a worker; when MaxInFlight requests (or
// MaxInFlightBytes of payload) are in flight it stops reading until one
// completes, which is the back-pressure the client sees.
func (c *conn) readLoop() endReason {
	var hdr [nbdwire.RequestHeaderLen]byte
	for {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			return c.readFailed("request header", err)
		}
		if magic := be.Uint32(hdr[0:]); magic != nbdwire.RequestMagic {
			c.log.Info("nbdserver: bad request magic; disconnecting", "magic", fmt.Sprintf("%#x", magic))
			return endProtocol
		}
		req := nbdwire.ParseRequest(hdr[:])
		if req.Type == nbdwire.CmdDisc {
			c.log.Debug("nbdserver: client sent NBD_CMD_DISC")
			return endDisc
		}
		reject := c.check(req)
		var held int64 // payload bytes this request keeps in memory
		if reject.errno == 0 && (req.Type == nbdwire.CmdRead || req.Type == nbdwire.CmdWrite) {
			held = int64(req.Length)
		}
		if !c.adm.acquire(c.stop, held) {
			return endStopped
		}
		var payload *[]byte
		var pipes *pipe
		if req.Type == nbdwire.CmdWrite && req.Length > 0 {
			var err error
			switch {
			case reject.errno != 0:
				// A rejected WRITE's payload is still on the wire: consume
				// it (without buffering it) to find the next request.
				_, err = io.CopyN(io.Discard, c.r, int64(req.Length))
			case c.spliceableWrite(req):
				pipes, payload, err = c.readPayloadPiped(int(req.Length))
			default:
				payload, err = c.readPayload(int(req.Length))
			}
			if err != nil {
				c.adm.release(held)
				return c.readFailed("write payload", err)
			}
		}
		c.dispatch(workItem{req: req, rej: reject, payload: payload, pipes: pipes, held: held})
	}
}

// dispatch hands a request to an idle worker, or starts one. Admission
// bounds the requests in flight, so at most MaxInFlight workers exist.
func (c *conn) dispatch(item workItem) {
	select {
	case c.work <- item:
		return
	default:
	}
	if c.nworkers >= c.s.opts.MaxInFlight {
		c.work <- item // every worker is busy: the first to finish takes it
		return
	}
	c.nworkers++
	c.workers.Go(func() {
		c.serve(item)
		for it := range c.work {
			c.serve(it)
		}
	})
}

func (c *conn) readFailed(what string, err error) endReason {
	switch {
	case c.stopping():
		return endStopped
	case isClosedConn(err):
		c.log.Debug("nbdserver: client closed the connection", "while_reading", what)
	default:
		c.log.Info("nbdserver: read failed; disconnecting", "while_reading", what, "err", err)
	}
	return endClosed
}

// drain waits until no request is in flight. Once the connection is
// stopping (already, or when it starts during the wait) it waits at most
// ShutdownGrace more.
func (c *conn) drain(stopping bool) {
	var grace <-chan time.Time
	startGrace := func() {
		t := time.NewTimer(c.s.opts.ShutdownGrace)
		grace = t.C // an unstopped timer is collected once unreferenced
	}
	stop := c.stop
	if stopping {
		startGrace()
		stop = nil
	}
	for {
		idle, changed := c.adm.idle()
		if idle {
			return
		}
		select {
		case <-changed:
		case <-stop:
			startGrace()
			stop = nil
		case <-grace:
			c.log.Warn("nbdserver: requests still in flight after the shutdown grace; cancelling them")
			return
		}
	}
}

// check validates a request against the spec and what was advertised, in
// the order: command, support, flags, read-only, length, bounds.
func (c *conn) check(req nbdwire.Request) rejection {
	const knownFlags = nbdwire.CmdFlagFUA | nbdwire.CmdFlagNoHole | nbdwire.CmdFlagDF | nbdwire.CmdFlagReqOne | nbdwire.CmdFlagFastZero
	if req.Flags&^knownFlags != 0 {
		return reject(nbdwire.EINVAL, "unknown command flags %#x", req.Flags&^knownFlags)
	}
	f := c.flags
	var allowed uint16
	if f.FUA {
		// Valid on every command once advertised: some clients set it on
		// reads and flushes, and the spec makes servers accept that.
		allowed |= nbdwire.CmdFlagFUA
	}
	supported := true
	switch req.Type {
	case nbdwire.CmdRead:
		if c.structured {
			allowed |= nbdwire.CmdFlagDF
		}
	case nbdwire.CmdWrite:
	case nbdwire.CmdFlush:
		supported = f.Flush
	case nbdwire.CmdTrim:
		supported = f.Trim
	case nbdwire.CmdCache:
		supported = f.Cache
	case nbdwire.CmdWriteZeroes:
		supported = f.Zeroes
		allowed |= nbdwire.CmdFlagNoHole
		if f.FastZero {
			allowed |= nbdwire.CmdFlagFastZero
		}
	case nbdwire.CmdBlockStatus:
		// The spec answers BLOCK_STATUS without a selected context with
		// EINVAL.
		if len(c.metaContexts) == 0 {
			return reject(nbdwire.EINVAL, "NBD_CMD_BLOCK_STATUS without a negotiated metadata context")
		}
		allowed |= nbdwire.CmdFlagReqOne
	default:
		return reject(nbdwire.EINVAL, "unknown command %d", req.Type)
	}
	if !supported {
		return reject(nbdwire.EINVAL, "%s is not supported by this export", cmdName(req.Type))
	}
	if bad := req.Flags &^ allowed; bad != 0 {
		return reject(nbdwire.EINVAL, "command flags %#x are not valid for %s here", bad, cmdName(req.Type))
	}
	writes := req.Type == nbdwire.CmdWrite || req.Type == nbdwire.CmdTrim || req.Type == nbdwire.CmdWriteZeroes
	if writes && f.ReadOnly {
		return reject(nbdwire.EPERM, "%s on a read-only export", cmdName(req.Type))
	}
	if req.Type == nbdwire.CmdFlush {
		if req.Offset != 0 || req.Length != 0 {
			return reject(nbdwire.EINVAL, "NBD_CMD_FLUSH with nonzero offset or length")
		}
		return rejection{}
	}
	// Only READ and WRITE carry their length as a payload; the other
	// commands are bounded by the export size alone.
	if (req.Type == nbdwire.CmdRead || req.Type == nbdwire.CmdWrite) && int64(req.Length) > int64(c.s.opts.MaxPayload) {
		return reject(nbdwire.EINVAL, "%s of %d bytes exceeds the maximum block size %d", cmdName(req.Type), req.Length, c.s.opts.MaxPayload)
	}
	if req.Offset > c.size || uint64(req.Length) > c.size-req.Offset {
		// The spec: ENOSPC for writes past the end, EINVAL for the rest.
		errno := nbdwire.EINVAL
		if req.Type == nbdwire.CmdWrite || req.Type == nbdwire.CmdWriteZeroes {
			errno = nbdwire.ENOSPC
		}
		return reject(errno, "%s of %d bytes at offset %d is beyond the export size %d", cmdName(req.Type), req.Length, req.Offset, c.size)
	}
	if req.Type == nbdwire.CmdBlockStatus && req.Length == 0 {
		// Every reply must hold at least one descriptor of at least one
		// byte, which an empty range cannot have.
		return reject(nbdwire.EINVAL, "NBD_CMD_BLOCK_STATUS of 0 bytes")
	}
	return rejection{}
}

func reject(errno uint32, format string, args ...any) rejection {
	return rejection{errno: errno, msg: fmt.Sprintf(format, args...)}
}

func cmdName(typ uint16) string {
	switch typ {
	case nbdwire.CmdRead:
		return "NBD_CMD_READ"
	case nbdwire.CmdWrite:
		return "NBD_CMD_WRITE"
	case nbdwire.CmdDisc:
		return "NBD_CMD_DISC"
	case nbdwire.CmdFlush:
		return "NBD_CMD_FLUSH"
	case nbdwire.CmdTrim:
		return "NBD_CMD_TRIM"
	case nbdwire.CmdCache:
		return "NBD_CMD_CACHE"
	case nbdwire.CmdWriteZeroes:
		return "NBD_CMD_WRITE_ZEROES"
	case nbdwire.CmdBlockStatus:
		return "NBD_CMD_BLOCK_STATUS"
	default:
		return fmt.Sprintf("command %d", typ)
	}
}

// serve runs one request in its worker and queues its reply. The reply
// takes over the request's admission (held bytes): it is released once the
// reply is written, so a request is in flight until its reply is out.
func (c *conn) serve(item workItem) {
	req, rej, held := item.req, item.rej, item.held
	if rej.errno != 0 {
		c.log.Debug("nbdserver: request rejected", "cmd", cmdName(req.Type), "offset", req.Offset, "length", req.Length, "errno", rej.errno, "why", rej.msg)
		c.replyError(req, held, rej.errno, rej.msg, -1)
		return
	}
	off, n := int64(req.Offset), int64(req.Length)
	fua := req.Flags&nbdwire.CmdFlagFUA != 0
	var err error
	// Zero-length requests are legal but meaningless; the spec leaves their
	// effect to the server, which answers them without bothering the export.
	switch req.Type {
	case nbdwire.CmdRead:
		c.serveRead(req, held)
		return
	case nbdwire.CmdBlockStatus:
		c.serveBlockStatus(req, held)
		return
	case nbdwire.CmdWrite:
		switch {
		case item.pipes != nil:
			err = c.serveSplicedWrite(req, item.pipes)
		case n > 0:
			err = c.exp.WriteAt(c.ctx, *item.payload, off, fua)
			c.s.buffers.put(item.payload)
		}
	case nbdwire.CmdFlush:
		err = c.exp.Flush(c.ctx)
	case nbdwire.CmdTrim:
		if n > 0 {
			err = c.exp.Trim(c.ctx, off, n, fua)
		}
	case nbdwire.CmdWriteZeroes:
		if n > 0 {
			err = c.exp.WriteZeroes(c.ctx, off, n, fua, req.Flags&nbdwire.CmdFlagNoHole != 0, req.Flags&nbdwire.CmdFlagFastZero != 0)
		}
	case nbdwire.CmdCache:
		if n > 0 {
			err = c.exp.Cache(c.ctx, off, n)
		}
	}
	if err == nil {
		c.replyOK(req, held)
		return
	}
	c.log.Debug("nbdserver: request failed", "cmd", cmdName(req.Type), "offset", req.Offset, "length", req.Length, "err", err)
	errOff := int64(-1)
	var oe *OffsetError
	if req.Type != nbdwire.CmdFlush && errors.As(err, &oe) && oe.Offset >= off && oe.Offset < off+n {
		errOff = oe.Offset
	}
	c.replyError(req, held, errnoOf(err), err.Error(), errOff)
}

// serveRead reads into a pooled buffer and queues it after the reply
// header; the reply gives the buffer back to the pool once it is written.
func (c *conn) serveRead(req nbdwire.Request, held int64) {
	n := int(req.Length)
	if n == 0 {
		c.replyOK(req, held)
		return
	}
	if c.spliceable(req) && c.serveSpliced(req, held) {
		return
	}
	off := int64(req.Offset)
	bp := c.s.buffers.get(n)
	buf := *bp
	o := owed{pooled: bp, held: held}
	// A pooled buffer holds another request's data, possibly another
	// export's. It is not cleared (that cost a fifth of the CPU of 1 MiB
	// reads): Export.ReadAt fills all of p or fails, and on failure only
	// the bytes before an OffsetError's offset are sent.
	err := c.exp.ReadAt(c.ctx, buf, off)
	if err == nil {
		if !c.structured {
			var hdr [nbdwire.SimpleReplyHeaderLen]byte
			nbdwire.PutSimpleReply(hdr[:], 0, req.Handle)
			c.send(o, hdr[:], buf)
			return
		}
		if req.Flags&nbdwire.CmdFlagDF == 0 && n >= minHoleRun {
			if bufs := sparseReadChunks(req, buf); bufs != nil {
				c.send(o, nil, bufs...)
				return
			}
		}
		// One content chunk, final: the data is all in memory, so no error
		// can arise while it is sent (the spec's condition for DONE on
		// data), and DF is honoured by construction.
		var hdr [nbdwire.StructuredReplyHeaderLen + 8]byte
		nbdwire.PutChunkHeader(hdr[:], nbdwire.ReplyFlagDone, nbdwire.ReplyTypeOffsetData, req.Handle, uint32(8+n))
		be.PutUint64(hdr[nbdwire.StructuredReplyHeaderLen:], req.Offset)
		c.send(o, hdr[:], buf)
		return
	}
	c.log.Debug("nbdserver: read failed", "offset", req.Offset, "length", req.Length, "err", err)
	errno := errnoOf(err)
	var oe *OffsetError
	if !c.structured || !errors.As(err, &oe) || oe.Offset < off || oe.Offset >= off+int64(n) {
		c.s.buffers.put(bp)
		c.replyError(req, held, errno, err.Error(), -1)
		return
	}
	// Partial success: the bytes before the failed offset, then the error
	// at that offset, in one write so nothing interleaves mid-reply.
	var bufs net.Buffers
	if good := int(oe.Offset - off); good > 0 {
		var hdr [nbdwire.StructuredReplyHeaderLen + 8]byte
		nbdwire.PutChunkHeader(hdr[:], 0, nbdwire.ReplyTypeOffsetData, req.Handle, uint32(8+good))
		be.PutUint64(hdr[nbdwire.StructuredReplyHeaderLen:], req.Offset)
		bufs = append(bufs, hdr[:], buf[:good])
	}
	bufs = append(bufs, errorChunk(req.Handle, errno, err.Error(), oe.Offset))
	c.send(o, nil, bufs...)
}

// serveBlockStatus answers NBD_CMD_BLOCK_STATUS: one
// NBD_REPLY_TYPE_BLOCK_STATUS chunk per selected context, in one write, the
// last one final. Whatever the export returns, each chunk describes at
// least one byte and at most the request (lengths fit 32 bits because the
// request's does), with no empty descriptor, neighbours of equal status
// merged, and one descriptor only under NBD_CMD_FLAG_REQ_ONE. An export
// error fails the whole request with one error chunk.
func (c *conn) serveBlockStatus(req nbdwire.Request, held int64) {
	off, n := int64(req.Offset), int64(req.Length)
	maxExtents := maxExtentsPerContext
	if req.Flags&nbdwire.CmdFlagReqOne != 0 {
		maxExtents = 1
	}
	ext := c.exp.(Extenter) // enter selects contexts only for an Extenter
	var b []byte
	for i, name := range c.metaContexts {
		extents, err := ext.Extents(c.ctx, name, off, n, maxExtents)
		if err != nil {
			c.log.Debug("nbdserver: block status failed", "context", name, "offset", req.Offset, "length", req.Length, "err", err)
			c.replyError(req, held, errnoOf(err), err.Error(), -1)
			return
		}
		b = appendBlockStatus(b, req.Handle, uint32(i+1), extents, n, maxExtents, i == len(c.metaContexts)-1)
	}
	c.send(owed{held: held}, nil, b)
}

// appendBlockStatus appends one NBD_REPLY_TYPE_BLOCK_STATUS chunk for
// context id describing at most n bytes with at most maxExtents
// descriptors. With no usable extent it describes all n bytes as status 0,
// which the spec makes always safe.
func appendBlockStatus(b []byte, handle uint64, id uint32, extents []Extent, n int64, maxExtents int, final bool) []byte {
	start := len(b)
	b = append(b, make([]byte, nbdwire.StructuredReplyHeaderLen)...)
	b = be.AppendUint32(b, id)
	var covered int64
	count := 0
	var lastFlags uint32
	for _, e := range extents {
		if covered >= n {
			break
		}
		if e.Length <= 0 {
			continue
		}
		length := min(e.Length, n-covered)
		if count > 0 && e.Flags == lastFlags {
			// Merged: the sum stays ≤ n < 2^32.
			at := len(b) - 8
			be.PutUint32(b[at:], be.Uint32(b[at:])+uint32(length))
			covered += length
			continue
		}
		if count == maxExtents {
			break
		}
		b = be.AppendUint32(b, uint32(length))
		b = be.AppendUint32(b, e.Flags)
		lastFlags = e.Flags
		covered += length
		count++
	}
	if count == 0 {
		b = be.AppendUint32(b, uint32(n))
		b = be.AppendUint32(b, 0)
	}
	var flags uint16
	if final {
		flags = nbdwire.ReplyFlagDone
	}
	nbdwire.PutChunkHeader(b[start:], flags, nbdwire.ReplyTypeBlockStatus, handle, uint32(len(b)-start-nbdwire.StructuredReplyHeaderLen))
	return b
}

// Hole chunks in READ replies: runs of at least minHoleRun bytes of zeroes,
// in whole holeBlock-aligned blocks, are sent as NBD_REPLY_TYPE_OFFSET_HOLE
// instead of data. Shorter runs are not worth the extra chunks; a read
// shorter than minHoleRun is never scanned, so 4 KiB random reads pay
// nothing, and a block of data is found non-zero at its first differing
// byte.
const (
	holeBlock  = 4096
	minHoleRun = 64 << 10
)

var zeroBlock [holeBlock]byte // read-only

// sparseReadChunks splits a successful READ into data and hole chunks, the
// last one final (everything is in memory, so no error can follow). It
// returns nil when buf has no zero run worth a hole chunk.
func sparseReadChunks(req nbdwire.Request, buf []byte) net.Buffers {
	type segment struct {
		start, end int // in buf
		hole       bool
	}
	var room [8]segment // most reads have few runs: no allocation for them
	segs := room[:0]
	addData := func(start, end int) {
		if start >= end {
			return
		}
		if k := len(segs); k > 0 && !segs[k-1].hole {
			segs[k-1].end = end
			return
		}
		segs = append(segs, segment{start, end, false})
	}
	// Block boundaries are aligned on the export, not on the request.
	first := int((holeBlock - req.Offset%holeBlock) % holeBlock)
	addData(0, min(first, len(buf)))
	runStart := -1 // start of the current zero run, or -1
	for b := first; b < len(buf); b += holeBlock {
		end := min(b+holeBlock, len(buf))
		zero := end-b == holeBlock && bytes.Equal(buf[b:end], zeroBlock[:])
		switch {
		case zero && runStart < 0:
			runStart = b
		case !zero && runStart >= 0:
			if b-runStart >= minHoleRun {
				segs = append(segs, segment{runStart, b, true})
			} else {
				addData(runStart, b)
			}
			runStart = -1
		}
		if !zero {
			addData(b, end)
		}
	}
	if runStart >= 0 {
		if len(buf)-runStart >= minHoleRun {
			segs = append(segs, segment{runStart, len(buf), true})
		} else {
			addData(runStart, len(buf))
		}
	}
	if len(segs) == 1 && !segs[0].hole {
		return nil
	}
	headers := make([]byte, 0, len(segs)*(nbdwire.StructuredReplyHeaderLen+12))
	bufs := make(net.Buffers, 0, 2*len(segs))
	for i, sg := range segs {
		var flags uint16
		if i == len(segs)-1 {
			flags = nbdwire.ReplyFlagDone
		}
		at := len(headers)
		off := req.Offset + uint64(sg.start)
		if sg.hole {
			headers = headers[:at+nbdwire.StructuredReplyHeaderLen+12]
			nbdwire.PutChunkHeader(headers[at:], flags, nbdwire.ReplyTypeOffsetHole, req.Handle, 12)
			be.PutUint64(headers[at+nbdwire.StructuredReplyHeaderLen:], off)
			be.PutUint32(headers[at+nbdwire.StructuredReplyHeaderLen+8:], uint32(sg.end-sg.start))
			bufs = append(bufs, headers[at:len(headers):len(headers)])
			continue
		}
		headers = headers[:at+nbdwire.StructuredReplyHeaderLen+8]
		nbdwire.PutChunkHeader(headers[at:], flags, nbdwire.ReplyTypeOffsetData, req.Handle, uint32(8+sg.end-sg.start))
		be.PutUint64(headers[at+nbdwire.StructuredReplyHeaderLen:], off)
		bufs = append(bufs, headers[at:len(headers):len(headers)], buf[sg.start:sg.end])
	}
	return bufs
}

// replyOK sends a successful reply without payload: a simple reply, which
// the spec allows even with structured replies, except for READ.
func (c *conn) replyOK(req nbdwire.Request, held int64) {
	if c.structured && req.Type == nbdwire.CmdRead {
		var hdr [nbdwire.StructuredReplyHeaderLen]byte
		nbdwire.PutChunkHeader(hdr[:], nbdwire.ReplyFlagDone, nbdwire.ReplyTypeNone, req.Handle, 0)
		c.send(owed{held: held}, hdr[:])
		return
	}
	var hdr [nbdwire.SimpleReplyHeaderLen]byte
	nbdwire.PutSimpleReply(hdr[:], 0, req.Handle)
	c.send(owed{held: held}, hdr[:])
}

// replyError fails a request. With structured replies the error carries its
// message, and its offset when errOff ≥ 0.
func (c *conn) replyError(req nbdwire.Request, held int64, errno uint32, msg string, errOff int64) {
	if !c.structured {
		// A simple reply cannot carry a message; for READ it also carries
		// no data once the error field is set.
		var hdr [nbdwire.SimpleReplyHeaderLen]byte
		nbdwire.PutSimpleReply(hdr[:], errno, req.Handle)
		c.send(owed{held: held}, hdr[:])
		return
	}
	c.send(owed{held: held}, nil, errorChunk(req.Handle, errno, msg, errOff))
}

// errorChunk builds a final NBD_REPLY_TYPE_ERROR chunk, or
// NBD_REPLY_TYPE_ERROR_OFFSET when errOff ≥ 0.
func errorChunk(handle uint64, errno uint32, msg string, errOff int64) []byte {
	msg = errorMessage(msg)
	typ := nbdwire.ReplyTypeError
	length := 6 + len(msg)
	if errOff >= 0 {
		typ = nbdwire.ReplyTypeErrorOffset
		length += 8
	}
	b := make([]byte, nbdwire.StructuredReplyHeaderLen, nbdwire.StructuredReplyHeaderLen+length)
	nbdwire.PutChunkHeader(b, nbdwire.ReplyFlagDone, typ, handle, uint32(length))
	b = be.AppendUint32(b, errno)
	b = be.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if errOff >= 0 {
		b = be.AppendUint64(b, uint64(errOff))
	}
	return b
}

// writeBatch writes queued reply buffers: one writev on a plain socket,
// cut where a reply's data is spliced from its pipes (due says where); over
// TLS, through a buffer, so small replies share TLS records. A pipe emptied
// into the socket goes back to the pool and leaves due.
func (c *conn) writeBatch(batch net.Buffers, due []owed) error {
	if c.tlsWriter == nil {
		from := 0
		for i := range due {
			o := &due[i]
			if o.pipe == nil {
				continue
			}
			if err := c.writev(batch[from:o.at]); err != nil {
				return err
			}
			for o.pipe != nil {
				pp := o.pipe
				if err := c.writeSpliced(pp, pp.n); err != nil {
					return err
				}
				o.pipe = pp.next
				c.s.pipes.put(pp)
			}
			from = o.at
		}
		return c.writev(batch[from:])
	}
	for _, b := range batch {
		if _, err := c.tlsWriter.Write(b); err != nil {
			return err
		}
	}
	return c.tlsWriter.Flush()
}

// writev writes buffers in one system call (or as few as the socket
// takes).
func (c *conn) writev(bufs net.Buffers) error {
	if len(bufs) == 0 {
		return nil
	}
	// WriteTo consumes the slice it is called on; a field of the
	// connection, unlike a local, costs no allocation per batch.
	c.unsent = bufs
	_, err := c.unsent.WriteTo(c.nc)
	c.unsent = nil
	return err
}

// send queues one whole reply and returns; it does not wait for the reply
// to be written. hdr is copied (it may live on the caller's stack); data
// must stay unchanged until the reply is written, which is why a read
// buffer travels with the reply in o and is given back, with the request's
// admission, only then. Whoever finds no write in progress becomes the
// writer: it sends everything queued in one writev, then whatever was
// queued meanwhile, so replies go out whole, in queue order, and never
// interleave on the wire.
func (c *conn) send(o owed, hdr []byte, data ...[]byte) {
	c.wmu.Lock()
	if c.werr != nil {
		c.wmu.Unlock()
		c.giveBack(o)
		return
	}
	if len(hdr) > 0 {
		at := len(c.arena)
		c.arena = append(c.arena, hdr...)
		c.pending = append(c.pending, c.arena[at:len(c.arena):len(c.arena)])
	}
	c.pending = append(c.pending, data...)
	o.at = len(c.pending) // where spliced data, if any, goes
	c.owed = append(c.owed, o)
	if c.writing {
		c.wmu.Unlock() // the writer sends it with its next batch
		return
	}
	c.writing = true
	if int(c.adm.inFlight.Load()) > len(c.owed) {
		// Other requests are being served: let their workers run first,
		// so that replies finished meanwhile go out in this writev. Under
		// load that is several replies per system call instead of one;
		// with nothing else being served nobody waits.
		c.wmu.Unlock()
		runtime.Gosched()
		c.wmu.Lock()
	}
	for len(c.owed) > 0 {
		batch, arena, due := c.pending, c.arena, c.owed
		c.pending, c.arena, c.owed = c.spare[:0], c.spareArena[:0], c.spareOwed[:0]
		c.wmu.Unlock()
		err := c.writeBatch(batch, due)
		clear(batch) // drop references to reply buffers
		for _, o := range due {
			c.giveBack(o)
		}
		clear(due)
		c.wmu.Lock()
		// The arena is reused only now: the batch's headers are written.
		c.spare, c.spareArena, c.spareOwed = batch[:0], arena[:0], due[:0]
		if err != nil {
			// A partial reply misframes the stream and a failed one means
			// the client is gone: no later reply can be delivered, so
			// everything queued is abandoned.
			c.werr = err
			for _, o := range c.owed {
				c.giveBack(o)
			}
			c.pending, c.arena, c.owed = nil, nil, nil
			c.cancel()
			c.beginShutdown()
			c.log.Debug("nbdserver: reply write failed; disconnecting", "err", err)
		}
	}
	c.writing = false
	c.wmu.Unlock()
}

// giveBack returns what a reply held once it is written or abandoned.
// Pipes still here were not emptied: their bytes are dropped with them.
func (c *conn) giveBack(o owed) {
	c.s.buffers.put(o.pooled)
	c.s.pipes.dropChain(o.pipe)
	c.adm.release(o.held)
}
