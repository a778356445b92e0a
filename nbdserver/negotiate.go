package nbdserver

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"strings"
	"unicode/utf8"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

var be = binary.BigEndian

// errAbort ends a negotiation the client gave up with NBD_OPT_ABORT.
var errAbort = errors.New("nbdserver: client sent NBD_OPT_ABORT")

// session is the negotiation state of one connection: what the client
// asked for so far.
type session struct {
	fixed    bool // NBD_FLAG_C_FIXED_NEWSTYLE: options get replies
	noZeroes bool // NBD_FLAG_C_NO_ZEROES
	tls      bool // NBD_OPT_STARTTLS acknowledged and the handshake done

	// Option state: NBD_OPT_STARTTLS resets it (the spec: everything
	// negotiated in plaintext is forgotten).
	structured bool // NBD_OPT_STRUCTURED_REPLY acknowledged
	// The last NBD_OPT_SET_META_CONTEXT: the export it named and the
	// contexts it selected (ID i+1 is metaContexts[i]). They apply only if
	// the client enters transmission with that export.
	metaExport   string
	metaContexts []string
}

// opened is the export a client entered the transmission phase with.
type opened struct {
	name    string
	release func() // from Exports.Open: call exactly once, when the connection ends
}

// negotiate runs the fixed newstyle handshake until the client enters the
// transmission phase (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), aborts, or breaks
// the protocol. On success the transmission state is set (enter) and the
// export is open.
func (c *conn) negotiate() (*opened, error) {
	var greeting [18]byte
	be.PutUint64(greeting[0:], nbdwire.NBDMagic)
	be.PutUint64(greeting[8:], nbdwire.OptMagic)
	be.PutUint16(greeting[16:], nbdwire.FlagFixedNewstyle|nbdwire.FlagNoZeroes)
	if _, err := c.nc.Write(greeting[:]); err != nil {
		return nil, fmt.Errorf("nbdserver: send greeting: %w", err)
	}
	var flagBuf [4]byte
	if _, err := io.ReadFull(c.r, flagBuf[:]); err != nil {
		return nil, fmt.Errorf("nbdserver: read client flags: %w", err)
	}
	clientFlags := be.Uint32(flagBuf[:])
	if clientFlags&^clientFlagsKnown != 0 {
		// The spec: the server MUST drop the connection on flags it does not know.
		return nil, fmt.Errorf("nbdserver: unknown client flags %#x", clientFlags)
	}
	sess := session{
		fixed:    clientFlags&nbdwire.FlagCFixedNewstyle != 0,
		noZeroes: clientFlags&nbdwire.FlagCNoZeroes != 0,
	}

	for {
		var hdr [nbdwire.OptionHeaderLen]byte
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			return nil, fmt.Errorf("nbdserver: read option header: %w", err)
		}
		if magic := be.Uint64(hdr[0:]); magic != nbdwire.OptMagic {
			return nil, fmt.Errorf("nbdserver: bad option magic %#x", magic)
		}
		opt, length := nbdwire.ParseOptionHeader(hdr[:])
		if length > maxOptionLen {
			// Refused before allocating or reading: skipping gigabytes of
			// option data would be a denial of service in itself.
			if sess.fixed {
				c.optError(opt, nbdwire.RepErrTooBig, fmt.Sprintf("option data of %d bytes exceeds this server's limit of %d", length, maxOptionLen))
			}
			return nil, fmt.Errorf("nbdserver: option %d carries %d bytes, over the %d-byte limit", opt, length, maxOptionLen)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return nil, fmt.Errorf("nbdserver: read option %d data: %w", opt, err)
		}
		if !sess.fixed && opt != nbdwire.OptExportName {
			// Plain newstyle clients cannot parse option replies.
			return nil, fmt.Errorf("nbdserver: option %d from a client without fixed newstyle", opt)
		}
		if o, err := c.handleOption(&sess, opt, data); err != nil || o != nil {
			return o, err
		}
	}
}

// handleOption answers one option. It returns the opened export when the
// client entered the transmission phase, an error when the connection must
// end, and neither when negotiation goes on.
func (c *conn) handleOption(sess *session, opt uint32, data []byte) (*opened, error) {
	if c.tlsMode == TLSRequire && !sess.tls {
		switch opt {
		case nbdwire.OptStartTLS, nbdwire.OptAbort:
		case nbdwire.OptExportName:
			// It cannot be answered with an error: the spec says end the
			// session.
			return nil, errors.New("nbdserver: NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, and TLS is required")
		default:
			return nil, c.optError(opt, nbdwire.RepErrTLSReqd, "TLS is required: send NBD_OPT_STARTTLS first")
		}
	}
	switch opt {
	case nbdwire.OptExportName:
		return c.handleExportName(sess, data)
	case nbdwire.OptAbort:
		// The spec: ignore any data, reply ACK; the client may already be gone.
		c.optReply(opt, nbdwire.RepAck)
		return nil, errAbort
	case nbdwire.OptList:
		return nil, c.list(data)
	case nbdwire.OptInfo, nbdwire.OptGo:
		return c.infoOrGo(sess, opt, data)
	case nbdwire.OptStructuredReply:
		if len(data) != 0 {
			return nil, c.optError(opt, nbdwire.RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		sess.structured = true // a repeat is harmless: acknowledge it again
		return nil, c.optReply(opt, nbdwire.RepAck)
	case nbdwire.OptStartTLS:
		return nil, c.startTLS(sess, data)
	case nbdwire.OptListMetaContext, nbdwire.OptSetMetaContext:
		return nil, c.metaContext(sess, opt, data)
	case nbdwire.OptExtendedHeaders:
		// Not implemented: clients fall back to compact headers.
		return nil, c.optError(opt, nbdwire.RepErrUnsup, "option not supported by this server")
	default:
		return nil, c.optError(opt, nbdwire.RepErrUnsup, fmt.Sprintf("unknown option %d", opt))
	}
}

// handleExportName handles NBD_OPT_EXPORT_NAME, which cannot fail politely: an
// unknown export ends the connection.
func (c *conn) handleExportName(sess *session, data []byte) (*opened, error) {
	if len(data) > nbdwire.MaxStringLen {
		return nil, fmt.Errorf("nbdserver: NBD_OPT_EXPORT_NAME name of %d bytes", len(data))
	}
	name := string(data)
	exp, release, ok := c.open(name)
	if !ok {
		return nil, fmt.Errorf("nbdserver: NBD_OPT_EXPORT_NAME: unknown export %q", name)
	}
	c.s.markTransmitting(c, name)
	flags := exp.Flags()
	reply := make([]byte, 10, 10+nbdwire.ExportNameZeroes)
	be.PutUint64(reply[0:], exportSize(exp))
	be.PutUint16(reply[8:], transmissionFlags(flags, sess.structured))
	if !sess.noZeroes {
		reply = reply[:10+nbdwire.ExportNameZeroes]
	}
	if _, err := c.nc.Write(reply); err != nil {
		release()
		return nil, fmt.Errorf("nbdserver: reply to NBD_OPT_EXPORT_NAME: %w", err)
	}
	c.enter(exp, flags, sess, name)
	return &opened{name: name, release: release}, nil
}

// list handles NBD_OPT_LIST: one NBD_REP_SERVER per export, then ACK.
func (c *conn) list(data []byte) error {
	if len(data) != 0 {
		return c.optError(nbdwire.OptList, nbdwire.RepErrInvalid, "NBD_OPT_LIST takes no data")
	}
	for _, info := range c.s.exports.List() {
		if c.allow != nil && !c.allow(info.Name) {
			continue
		}
		// The description travels after the name, as the spec's
		// "implementation-specific details ... suitable for display".
		reply := make([]byte, 4, 4+len(info.Name)+len(info.Description))
		be.PutUint32(reply, uint32(len(info.Name)))
		reply = append(reply, info.Name...)
		reply = append(reply, info.Description...)
		if err := c.optReply(nbdwire.OptList, nbdwire.RepServer, reply); err != nil {
			return err
		}
	}
	return c.optReply(nbdwire.OptList, nbdwire.RepAck)
}

// infoOrGo handles NBD_OPT_INFO and NBD_OPT_GO, which share their format:
// name length, name, count of information requests, requests.
func (c *conn) infoOrGo(sess *session, opt uint32, data []byte) (*opened, error) {
	if len(data) < 6 {
		return nil, c.optError(opt, nbdwire.RepErrInvalid, "option data too short")
	}
	nameLen := be.Uint32(data)
	if uint64(nameLen) > uint64(len(data)-6) {
		return nil, c.optError(opt, nbdwire.RepErrInvalid, "export name length exceeds the option data")
	}
	if nameLen > nbdwire.MaxStringLen {
		return nil, c.optError(opt, nbdwire.RepErrInvalid, "export name longer than 4096 bytes")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nreq := int(be.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return nil, c.optError(opt, nbdwire.RepErrInvalid, "information request count does not match the option length")
	}
	var wantName, wantDescription bool
	for i := range nreq {
		switch be.Uint16(rest[2+2*i:]) {
		case nbdwire.InfoName:
			wantName = true
		case nbdwire.InfoDescription:
			wantDescription = true
		}
		// NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent; the spec
		// makes servers ignore requests they do not know.
	}

	var (
		exp     Export
		release = func() {}
		ok      bool
	)
	if opt == nbdwire.OptGo {
		exp, release, ok = c.open(name)
	} else {
		exp, ok = c.lookup(name)
	}
	if !ok {
		return nil, c.optError(opt, nbdwire.RepErrUnknown, fmt.Sprintf("unknown export %q", name))
	}
	if opt == nbdwire.OptGo {
		// Before the ACK: a Disconnect racing with this GO must find the
		// connection (it will stop at its first request read).
		c.s.markTransmitting(c, name)
	}

	// One snapshot of the flags: what is advertised is what is enforced.
	flags := exp.Flags()
	err := c.sendInfo(opt, exp, flags, sess, name, wantName, wantDescription)
	if err == nil {
		err = c.optReply(opt, nbdwire.RepAck)
	}
	if err != nil {
		release()
		return nil, err
	}
	if opt != nbdwire.OptGo {
		return nil, nil
	}
	c.enter(exp, flags, sess, name)
	return &opened{name: name, release: release}, nil
}

func (c *conn) sendInfo(opt uint32, exp Export, flags ExportFlags, sess *session, name string, wantName, wantDescription bool) error {
	var export [nbdwire.InfoExportLen]byte
	be.PutUint16(export[0:], nbdwire.InfoExport)
	be.PutUint64(export[2:], exportSize(exp))
	be.PutUint16(export[10:], transmissionFlags(flags, sess.structured))
	if err := c.optReply(opt, nbdwire.RepInfo, export[:]); err != nil {
		return err
	}
	if wantName {
		if err := c.optReply(opt, nbdwire.RepInfo, be.AppendUint16(nil, nbdwire.InfoName), []byte(name)); err != nil {
			return err
		}
	}
	if wantDescription {
		if err := c.optReply(opt, nbdwire.RepInfo, be.AppendUint16(nil, nbdwire.InfoDescription), []byte(c.description(name))); err != nil {
			return err
		}
	}
	// Always sent, requested or not: the maximum (MaxPayload) is not the
	// spec's default, so the server must advertise it.
	var blockSize [nbdwire.InfoBlockSizeLen]byte
	be.PutUint16(blockSize[0:], nbdwire.InfoBlockSize)
	be.PutUint32(blockSize[2:], 1) // any byte offset and length
	be.PutUint32(blockSize[6:], preferredBlockSize(exp.PreferredBlockSize(), c.s.opts.MaxPayload))
	be.PutUint32(blockSize[10:], uint32(c.s.opts.MaxPayload))
	return c.optReply(opt, nbdwire.RepInfo, blockSize[:])
}

func (c *conn) description(name string) string {
	for _, info := range c.s.exports.List() { // name passed c.lookup
		if info.Name == name {
			return info.Description
		}
	}
	return ""
}

// enter fixes the transmission-phase state; called once, before the reader
// starts and before any worker exists. The metadata contexts selected for
// another export name are dropped, as the spec asks.
func (c *conn) enter(exp Export, flags ExportFlags, sess *session, name string) {
	c.exp = exp
	c.size = exportSize(exp)
	c.flags = flags
	c.structured = sess.structured
	if _, ok := exp.(Extenter); ok && sess.structured && sess.metaExport == name {
		c.metaContexts = sess.metaContexts
	}
}

// lookup finds an export this listener serves.
func (c *conn) lookup(name string) (Export, bool) {
	if c.allow != nil && !c.allow(name) {
		return nil, false
	}
	return c.s.exports.Lookup(name)
}

// open is lookup for entering transmission (see Exports.Open).
func (c *conn) open(name string) (Export, func(), bool) {
	if c.allow != nil && !c.allow(name) {
		return nil, nil, false
	}
	return c.s.exports.Open(name)
}

// startTLS handles NBD_OPT_STARTTLS: ACK, then the TLS handshake over the
// socket; every later byte is encrypted. A failed handshake ends the
// connection (the ACK is sent: there is no way back to plaintext).
func (c *conn) startTLS(sess *session, data []byte) error {
	switch {
	case len(data) != 0:
		return c.optError(nbdwire.OptStartTLS, nbdwire.RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case c.tlsMode == TLSOff:
		return c.optError(nbdwire.OptStartTLS, nbdwire.RepErrPolicy, "TLS is not enabled on this server")
	case sess.tls:
		return c.optError(nbdwire.OptStartTLS, nbdwire.RepErrInvalid, "TLS is already active")
	case c.r.Buffered() != 0:
		// The client must wait for our reply before it starts TLS; bytes
		// already here would be plaintext smuggled into the TLS session
		// (the STARTTLS injection attack).
		return fmt.Errorf("nbdserver: %d bytes sent after NBD_OPT_STARTTLS before its reply", c.r.Buffered())
	}
	if err := c.optReply(nbdwire.OptStartTLS, nbdwire.RepAck); err != nil {
		return err
	}
	tc := tls.Server(c.raw, c.s.opts.TLSConfig)
	// Shutdown interrupts the handshake through raw's read deadline, and a
	// closed connection cancels c.ctx.
	if err := tc.HandshakeContext(c.ctx); err != nil {
		tc.Close()
		return fmt.Errorf("nbdserver: TLS handshake: %w", err)
	}
	c.nc = tc
	c.r.Reset(tc)
	c.tlsWriter = bufio.NewWriterSize(tc, 64<<10)
	c.log = c.log.With("tls", tls.VersionName(tc.ConnectionState().Version))
	*sess = session{fixed: sess.fixed, noZeroes: sess.noZeroes, tls: true}
	return nil
}

// metaContext handles NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT: export name length, name, number of queries,
// then each query as length and string.
//
// Queries: an exact context name selects it; for LIST, "namespace:" also
// lists every context in that namespace, and no query lists all. Unknown
// names select nothing, which is not an error. SET replaces the selection
// even when it fails, as the spec says.
func (c *conn) metaContext(sess *session, opt uint32, data []byte) error {
	set := opt == nbdwire.OptSetMetaContext
	if set {
		sess.metaExport, sess.metaContexts = "", nil
	}
	if !sess.structured {
		return c.optError(opt, nbdwire.RepErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts")
	}
	if len(data) < 8 {
		return c.optError(opt, nbdwire.RepErrInvalid, "option data too short")
	}
	nameLen := be.Uint32(data)
	if uint64(nameLen) > uint64(len(data)-8) {
		return c.optError(opt, nbdwire.RepErrInvalid, "export name length exceeds the option data")
	}
	if nameLen > nbdwire.MaxStringLen {
		return c.optError(opt, nbdwire.RepErrInvalid, "export name longer than 4096 bytes")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nq := be.Uint32(rest)
	rest = rest[4:]
	// Each query takes at least its 4-byte length: a count the data cannot
	// hold is refused before anything is allocated for it.
	if uint64(nq) > uint64(len(rest)/4) {
		return c.optError(opt, nbdwire.RepErrInvalid, "query count exceeds the option data")
	}
	queries := make([]string, 0, nq)
	for range nq {
		if len(rest) < 4 {
			return c.optError(opt, nbdwire.RepErrInvalid, "query count exceeds the option data")
		}
		ql := be.Uint32(rest)
		if uint64(ql) > uint64(len(rest)-4) {
			return c.optError(opt, nbdwire.RepErrInvalid, "query length exceeds the option data")
		}
		if ql > nbdwire.MaxStringLen {
			return c.optError(opt, nbdwire.RepErrTooBig, "query longer than 4096 bytes")
		}
		q := string(rest[4 : 4+ql])
		rest = rest[4+ql:]
		if !utf8.ValidString(q) || strings.IndexByte(q, 0) >= 0 || strings.IndexByte(q, ':') <= 0 {
			return c.optError(opt, nbdwire.RepErrInvalid, fmt.Sprintf("query %q is not namespace:name", errorMessage(q)))
		}
		queries = append(queries, q)
	}
	if len(rest) != 0 {
		return c.optError(opt, nbdwire.RepErrInvalid, "trailing bytes after the queries")
	}
	exp, ok := c.lookup(name)
	if !ok {
		return c.optError(opt, nbdwire.RepErrUnknown, fmt.Sprintf("unknown export %q", name))
	}
	var offered []string
	if ext, ok := exp.(Extenter); ok {
		offered = ext.MetaContexts()
	}
	var matched []string
	seen := map[string]bool{}
	match := func(ctx string) {
		if !seen[ctx] {
			seen[ctx] = true
			matched = append(matched, ctx)
		}
	}
	for _, ctx := range offered {
		if !set && len(queries) == 0 {
			match(ctx)
		}
	}
	for _, q := range queries {
		for _, ctx := range offered {
			if ctx == q || (!set && strings.HasSuffix(q, ":") && strings.HasPrefix(ctx, q)) {
				match(ctx)
			}
		}
	}
	for i, ctx := range matched {
		// LIST replies carry ID 0, which the spec reserves for them.
		id := uint32(0)
		if set {
			id = uint32(i + 1)
		}
		if err := c.optReply(opt, nbdwire.RepMetaContext, be.AppendUint32(nil, id), []byte(ctx)); err != nil {
			return err
		}
	}
	if set {
		sess.metaExport, sess.metaContexts = name, matched
	}
	return c.optReply(opt, nbdwire.RepAck)
}

func exportSize(exp Export) uint64 {
	return uint64(max(exp.Size(), 0))
}

// transmissionFlags is what the client is told the export can do. The
// server rejects every command and flag it does not advertise.
func transmissionFlags(f ExportFlags, structured bool) uint16 {
	flags := nbdwire.FlagHasFlags
	set := func(cond bool, flag uint16) {
		if cond {
			flags |= flag
		}
	}
	set(f.ReadOnly, nbdwire.FlagReadOnly)
	set(f.Flush, nbdwire.FlagSendFlush)
	set(f.FUA, nbdwire.FlagSendFUA)
	set(f.Trim, nbdwire.FlagSendTrim)
	set(f.Zeroes, nbdwire.FlagSendWriteZeroes)
	set(f.Zeroes && f.FastZero, nbdwire.FlagSendFastZero) // the spec: never FAST_ZERO without WRITE_ZEROES
	set(f.Cache, nbdwire.FlagSendCache)
	set(f.MultiConn, nbdwire.FlagCanMultiConn)
	// Reads are never fragmented, so DF costs nothing to honour; the spec
	// allows it only with structured replies.
	set(structured, nbdwire.FlagSendDF)
	return flags
}

// preferredBlockSize makes the export's preference a legal advertisement: a
// power of two, at least 512, at most the maximum block size.
func preferredBlockSize(preferred uint32, maxPayload int) uint32 {
	if preferred == 0 {
		preferred = nbdwire.DefaultPreferredBlockSize
	}
	p := uint32(1) << (bits.Len32(preferred) - 1) // round down to a power of two
	p = max(p, 512)
	for int(p) > maxPayload {
		p >>= 1
	}
	return p
}

// optReply sends one option reply; parts are concatenated as its data.
func (c *conn) optReply(opt, typ uint32, parts ...[]byte) error {
	var hdr [nbdwire.OptionReplyHeaderLen]byte
	length := 0
	for _, p := range parts {
		length += len(p)
	}
	nbdwire.PutOptionReplyHeader(hdr[:], opt, typ, uint32(length))
	bufs := append(net.Buffers{hdr[:]}, parts...)
	if _, err := bufs.WriteTo(c.nc); err != nil {
		return fmt.Errorf("nbdserver: reply to option %d: %w", opt, err)
	}
	return nil
}

// optError sends an error reply with a message for the user. It returns
// only the write error: the option failing does not end the negotiation.
func (c *conn) optError(opt, typ uint32, msg string) error {
	return c.optReply(opt, typ, []byte(errorMessage(msg)))
}
