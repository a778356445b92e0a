package nbdserver

// Fuzz targets for the two parsers a client controls: the option haggling
// (FuzzNegotiate) and the transmission-phase request stream
// (FuzzRequests). `make fuzz` runs each for a bounded time; without -fuzz,
// `go test` runs their seeds (below and in testdata/fuzz) as regression
// tests.

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// streamConn is a net.Conn whose peer is a byte string: reads return it,
// then EOF; writes are collected.
type streamConn struct {
	r *bytes.Reader
	// chunk bounds each Read, so the server's buffered reader sees the
	// stream arrive in pieces as it would from a socket.
	chunk int

	mu     sync.Mutex
	out    bytes.Buffer // guarded by mu
	closed bool         // guarded by mu
}

func newStreamConn(in []byte, chunk int) *streamConn {
	return &streamConn{r: bytes.NewReader(in), chunk: chunk}
}

func (c *streamConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return 0, net.ErrClosed
	}
	return c.r.Read(p[:min(len(p), c.chunk)])
}

func (c *streamConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	return c.out.Write(p)
}

func (c *streamConn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	return nil
}

func (c *streamConn) written() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.out.Bytes())
}

func (c *streamConn) LocalAddr() net.Addr              { return &net.UnixAddr{Net: "unix"} }
func (c *streamConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Net: "unix"} }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

// fuzzTLS is one server TLS config for every iteration: key generation is
// far slower than a fuzz iteration.
var fuzzTLS = sync.OnceValue(func() *tls.Config {
	p, err := makeTestPKI()
	if err != nil {
		panic(err)
	}
	return p.serverConfig(false)
})

// Seed builders.

func optionBytes(opt uint32, data []byte) []byte {
	b := be.AppendUint64(nil, nbdwire.OptMagic)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func requestBytes(typ, flags uint16, handle, off uint64, length uint32, payload []byte) []byte {
	b := be.AppendUint32(nil, nbdwire.RequestMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, handle)
	b = be.AppendUint64(b, off)
	b = be.AppendUint32(b, length)
	return append(b, payload...)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

var fixedFlags = be.AppendUint32(nil, nbdwire.FlagCFixedNewstyle|nbdwire.FlagCNoZeroes)

// negotiateSeeds are client streams after the greeting; the first byte
// picks the TLS mode and the read size (see FuzzNegotiate).
var negotiateSeeds = map[string][]byte{
	"go": cat([]byte{0}, fixedFlags,
		optionBytes(nbdwire.OptStructuredReply, nil),
		optionBytes(nbdwire.OptGo, infoRequest("disk", nbdwire.InfoName, nbdwire.InfoDescription, nbdwire.InfoBlockSize))),
	"list-info-abort": cat([]byte{0}, fixedFlags,
		optionBytes(nbdwire.OptList, nil),
		optionBytes(nbdwire.OptInfo, infoRequest("ro", nbdwire.InfoBlockSize)),
		optionBytes(nbdwire.OptInfo, infoRequest("nope")),
		optionBytes(nbdwire.OptAbort, nil)),
	"meta-contexts": cat([]byte{0}, fixedFlags,
		optionBytes(nbdwire.OptStructuredReply, nil),
		optionBytes(nbdwire.OptListMetaContext, metaRequest("disk")),
		optionBytes(nbdwire.OptListMetaContext, metaRequest("disk", "base:", "x-test:")),
		optionBytes(nbdwire.OptSetMetaContext, metaRequest("disk", ContextBaseAllocation, testHydrated)),
		optionBytes(nbdwire.OptGo, infoRequest("disk"))),
	"export-name": cat([]byte{0}, be.AppendUint32(nil, nbdwire.FlagCFixedNewstyle),
		optionBytes(nbdwire.OptExportName, []byte("disk"))),
	"oldstyle-client": cat([]byte{0}, be.AppendUint32(nil, 0),
		optionBytes(nbdwire.OptExportName, []byte("ro"))),
	"malformed": cat([]byte{0}, fixedFlags,
		optionBytes(nbdwire.OptGo, []byte{0, 0, 0, 9, 'd'}),
		optionBytes(nbdwire.OptSetMetaContext, metaRequest("disk", "noColon")),
		optionBytes(nbdwire.OptStructuredReply, []byte{1}),
		optionBytes(99, []byte("unknown")),
		optionBytes(nbdwire.OptList, []byte{1})),
	"tls-required": cat([]byte{2 | 4<<2}, fixedFlags,
		optionBytes(nbdwire.OptList, nil),
		optionBytes(nbdwire.OptGo, infoRequest("disk")),
		optionBytes(nbdwire.OptStartTLS, nil),
		[]byte("\x16\x03\x01 not really a ClientHello")),
	"tls-off": cat([]byte{0}, fixedFlags,
		optionBytes(nbdwire.OptStartTLS, nil),
		optionBytes(nbdwire.OptGo, infoRequest("disk"))),
	"giant-option": cat([]byte{0}, fixedFlags, be.AppendUint64(nil, nbdwire.OptMagic),
		be.AppendUint32(nil, nbdwire.OptGo), be.AppendUint32(nil, 1<<31)),
}

func fuzzExports(t testing.TB) *memExports {
	e := newMemExports(t)
	disk := e.add("disk", "a disk", newMemExport(1<<20, allFlags))
	disk.contexts = []string{ContextBaseAllocation, testHydrated}
	e.add("ro", "", newMemExport(64<<10, ExportFlags{ReadOnly: true, Flush: true}))
	return e
}

// FuzzNegotiate feeds a client's side of the handshake to negotiate. The
// first byte picks TLS off, on or require (bits 0-1) and the largest read
// the stream returns, 2^(bits 2-4) bytes. Whatever the bytes, the server
// must end (the stream ends), must not panic, must release what it opens,
// and everything it wrote must be a greeting then well-formed option
// replies, up to an NBD_OPT_EXPORT_NAME reply or the start of TLS.
func FuzzNegotiate(f *testing.F) {
	for _, seed := range negotiateSeeds {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		mode := TLSMode(min(in[0]&3, 2))
		opts := Options{TLS: mode}
		if mode != TLSOff {
			opts.TLSConfig = fuzzTLS()
		}
		e := fuzzExports(t)
		s, err := NewServer(e, opts)
		if err != nil {
			t.Fatal(err)
		}
		nc := newStreamConn(in[1:], 1<<(in[0]>>2&7))
		c := newConn(s, context.Background(), nc, nil, 1)
		o, err := c.negotiate()
		if o != nil {
			o.release()
		}
		c.cancel()
		if o == nil && err == nil {
			t.Fatal("negotiate returned neither an export nor an error")
		}
		if e.opens.Load() != e.releases.Load() {
			t.Fatalf("opened %d, released %d", e.opens.Load(), e.releases.Load())
		}
		checkOptionReplies(t, nc.written(), o != nil)
	})
}

func checkOptionReplies(t *testing.T, out []byte, entered bool) {
	if len(out) < 18 || be.Uint64(out) != nbdwire.NBDMagic || be.Uint64(out[8:]) != nbdwire.OptMagic {
		t.Fatalf("greeting % x", out[:min(len(out), 18)])
	}
	out = out[18:]
	for len(out) >= 20 && be.Uint64(out) == nbdwire.OptReplyMagic {
		opt, typ, n := be.Uint32(out[8:]), be.Uint32(out[12:]), be.Uint32(out[16:])
		if uint64(n) > uint64(len(out)-20) {
			t.Fatalf("option %d reply of %d bytes, %d written", opt, n, len(out)-20)
		}
		data := out[20 : 20+n]
		out = out[20+n:]
		switch {
		case typ&(1<<31) != 0:
			if !utf8.Valid(data) || bytes.IndexByte(data, 0) >= 0 || len(data) > nbdwire.MaxStringLen {
				t.Fatalf("option %d error %#x: bad message %q", opt, typ, data)
			}
		case typ == nbdwire.RepAck && opt == nbdwire.OptStartTLS:
			return // TLS records follow
		case typ == nbdwire.RepAck:
		case typ == nbdwire.RepServer && opt == nbdwire.OptList:
			if len(data) < 4 || uint64(be.Uint32(data)) > uint64(len(data)-4) {
				t.Fatalf("NBD_REP_SERVER % x", data)
			}
		case typ == nbdwire.RepInfo && (opt == nbdwire.OptInfo || opt == nbdwire.OptGo):
			if len(data) < 2 {
				t.Fatalf("NBD_REP_INFO % x", data)
			}
		case typ == nbdwire.RepMetaContext && (opt == nbdwire.OptListMetaContext || opt == nbdwire.OptSetMetaContext):
			if len(data) < 5 || !utf8.Valid(data[4:]) {
				t.Fatalf("NBD_REP_META_CONTEXT % x", data)
			}
		default:
			t.Fatalf("option %d: unexpected reply type %#x", opt, typ)
		}
	}
	if entered {
		// NBD_OPT_EXPORT_NAME's reply (size, flags, maybe zeroes), or
		// nothing more after NBD_OPT_GO's ACK.
		if len(out) != 0 && len(out) != 10 && len(out) != 10+nbdwire.ExportNameZeroes {
			t.Fatalf("%d bytes after the option replies", len(out))
		}
		return
	}
	if len(out) != 0 {
		t.Fatalf("%d stray bytes after the option replies: % x", len(out), out[:min(len(out), 32)])
	}
}

// requestSeeds are transmission-phase streams; FuzzRequests appends
// NBD_CMD_DISC so that every reply is written before the check.
var requestSeeds = map[string][]byte{
	"every-command": cat(
		requestBytes(nbdwire.CmdWrite, nbdwire.CmdFlagFUA, 1, 4096, 8, []byte("abcdefgh")),
		requestBytes(nbdwire.CmdRead, 0, 2, 4090, 20, nil),
		requestBytes(nbdwire.CmdRead, 0, 11, 64<<10, 64<<10, nil), // zeroes: a hole chunk
		requestBytes(nbdwire.CmdRead, nbdwire.CmdFlagDF, 3, 0, 512, nil),
		requestBytes(nbdwire.CmdTrim, 0, 4, 0, 8192, nil),
		requestBytes(nbdwire.CmdWriteZeroes, nbdwire.CmdFlagNoHole, 5, 100, 1000, nil),
		requestBytes(nbdwire.CmdWriteZeroes, nbdwire.CmdFlagFastZero, 6, 100, 1000, nil),
		requestBytes(nbdwire.CmdCache, 0, 7, 0, 65536, nil),
		requestBytes(nbdwire.CmdFlush, 0, 8, 0, 0, nil),
		requestBytes(nbdwire.CmdBlockStatus, 0, 9, 0, 1<<20, nil),
		requestBytes(nbdwire.CmdBlockStatus, nbdwire.CmdFlagReqOne, 10, 4096, 4096, nil)),
	"errors": cat(
		requestBytes(nbdwire.CmdRead, 0, 1, 1<<20, 1, nil),
		requestBytes(nbdwire.CmdWrite, 0, 2, 1<<20-4, 8, []byte("overflow")),
		requestBytes(nbdwire.CmdRead, 0, 3, 0, 1<<30, nil),
		requestBytes(nbdwire.CmdFlush, 0, 4, 1, 0, nil),
		requestBytes(nbdwire.CmdBlockStatus, 0, 5, 0, 0, nil),
		requestBytes(42, 0, 6, 0, 0, nil),
		requestBytes(nbdwire.CmdRead, 1<<12, 7, 0, 512, nil)),
	"truncated-write": requestBytes(nbdwire.CmdWrite, 0, 1, 0, 4096, []byte("short")),
	"bad-magic":       cat(requestBytes(nbdwire.CmdRead, 0, 1, 0, 512, nil), []byte("GARBAGE GARBAGE GARBAGE GARBAGE")),
}

// FuzzRequests feeds a transmission-phase request stream to a connection
// that negotiated the flags in mode (bit 0: structured replies, bit 1:
// metadata contexts, bit 2: read-only export). Whatever the bytes: the
// export sees only valid calls; the replies are well framed, each for a
// request that was sent; and when the stream reaches NBD_CMD_DISC, every
// request before it got exactly one reply.
func FuzzRequests(f *testing.F) {
	for _, seed := range requestSeeds {
		for mode := range byte(8) {
			f.Add(mode, seed)
		}
	}
	f.Fuzz(func(t *testing.T, mode byte, in []byte) {
		structured, contexts, readOnly := mode&1 != 0, mode&2 != 0, mode&4 != 0
		e := newMemExports(t)
		flags := allFlags
		flags.ReadOnly = readOnly
		disk := e.add("disk", "", newMemExport(1<<20, flags))
		disk.contexts = []string{ContextBaseAllocation, testHydrated}
		s, err := NewServer(e, Options{MaxInFlight: 4, MaxPayload: 64 << 10})
		if err != nil {
			t.Fatal(err)
		}
		stream := cat(in, requestBytes(nbdwire.CmdDisc, 0, 0, 0, 0, nil))
		nc := newStreamConn(stream, 1<<10)
		c := newConn(s, context.Background(), nc, nil, 1)
		sess := session{structured: structured, metaExport: "disk"}
		if contexts {
			sess.metaContexts = disk.contexts
		}
		c.enter(disk, disk.Flags(), &sess, "disk")
		c.transmit()
		if v := disk.violations.Load(); v != 0 {
			t.Fatalf("the export saw %d invalid calls", v)
		}
		reqs, disc := parseRequests(stream)
		checkReplies(t, nc.written(), reqs, disc, structured)
	})
}

// sentRequest is what the reply check needs of a request.
type sentRequest struct {
	typ    uint16
	length uint32
}

// parseRequests frames a request stream as the server must: it returns
// the requests by handle (nil if a handle repeats: replies are then
// ambiguous) and whether the stream reached NBD_CMD_DISC.
func parseRequests(in []byte) (map[uint64]sentRequest, bool) {
	reqs := map[uint64]sentRequest{}
	unique := true
	for len(in) >= nbdwire.RequestHeaderLen && be.Uint32(in) == nbdwire.RequestMagic {
		typ, handle, length := be.Uint16(in[6:]), be.Uint64(in[8:]), be.Uint32(in[24:])
		in = in[nbdwire.RequestHeaderLen:]
		if typ == nbdwire.CmdDisc {
			if !unique {
				return nil, true
			}
			return reqs, true
		}
		if typ == nbdwire.CmdWrite {
			if uint64(length) > uint64(len(in)) {
				break
			}
			in = in[length:]
		}
		if _, dup := reqs[handle]; dup {
			unique = false
		}
		reqs[handle] = sentRequest{typ: typ, length: length}
	}
	if !unique {
		return nil, false
	}
	return reqs, false
}

func checkReplies(t *testing.T, out []byte, reqs map[uint64]sentRequest, disc, structured bool) {
	if reqs == nil {
		// A handle was reused: a successful read reply's payload length
		// depends on which request it answers, so the stream cannot be
		// framed. Only its first reply can be checked.
		if len(out) >= 4 && be.Uint32(out) != nbdwire.SimpleReplyMagic && be.Uint32(out) != nbdwire.StructuredReplyMagic {
			t.Fatalf("reply magic %#x", be.Uint32(out))
		}
		return
	}
	done := map[uint64]int{}
	if !disc {
		// The connection was dropped (bad magic, truncated payload):
		// replies still being written may be cut short, the last one only.
		out = completeReplies(out, reqs, structured)
	}
	for len(out) > 0 {
		if len(out) < 4 {
			t.Fatalf("%d stray bytes", len(out))
		}
		switch be.Uint32(out) {
		case nbdwire.SimpleReplyMagic:
			if len(out) < nbdwire.SimpleReplyHeaderLen {
				t.Fatalf("a partial simple reply")
			}
			errno, handle := be.Uint32(out[4:]), be.Uint64(out[8:])
			out = out[nbdwire.SimpleReplyHeaderLen:]
			if reqs == nil {
				continue // ambiguous handles: framing of reads unknown
			}
			r, ok := reqs[handle]
			if !ok {
				t.Fatalf("simple reply for handle %d, never sent", handle)
			}
			if r.typ == nbdwire.CmdRead && structured {
				t.Fatalf("simple reply to a READ with structured replies")
			}
			if r.typ == nbdwire.CmdRead && errno == 0 {
				if uint64(r.length) > uint64(len(out)) {
					t.Fatalf("read reply of %d bytes, %d written", r.length, len(out))
				}
				out = out[r.length:]
			}
			done[handle]++
		case nbdwire.StructuredReplyMagic:
			if !structured {
				t.Fatalf("structured reply without structured replies")
			}
			if len(out) < nbdwire.StructuredReplyHeaderLen {
				t.Fatalf("a partial chunk header")
			}
			flags, typ, handle, n := be.Uint16(out[4:]), be.Uint16(out[6:]), be.Uint64(out[8:]), be.Uint32(out[16:])
			if uint64(n) > uint64(len(out)-nbdwire.StructuredReplyHeaderLen) {
				t.Fatalf("chunk of %d bytes, %d written", n, len(out)-nbdwire.StructuredReplyHeaderLen)
			}
			payload := out[nbdwire.StructuredReplyHeaderLen : nbdwire.StructuredReplyHeaderLen+n]
			out = out[nbdwire.StructuredReplyHeaderLen+n:]
			checkChunk(t, typ, payload, reqs, handle)
			if flags&nbdwire.ReplyFlagDone != 0 {
				done[handle]++
			}
		default:
			t.Fatalf("reply magic %#x", be.Uint32(out))
		}
	}
	if reqs == nil {
		return
	}
	for h, n := range done {
		if n != 1 {
			t.Fatalf("handle %d got %d final replies", h, n)
		}
	}
	if disc && len(done) != len(reqs) {
		t.Fatalf("%d requests before NBD_CMD_DISC, %d replies", len(reqs), len(done))
	}
}

// completeReplies drops a partial reply at the end of out.
func completeReplies(out []byte, reqs map[uint64]sentRequest, structured bool) []byte {
	i := 0
	for i < len(out) {
		rest := out[i:]
		n := 0
		switch {
		case len(rest) >= nbdwire.SimpleReplyHeaderLen && be.Uint32(rest) == nbdwire.SimpleReplyMagic:
			n = nbdwire.SimpleReplyHeaderLen
			if r, ok := reqs[be.Uint64(rest[8:])]; ok && r.typ == nbdwire.CmdRead && be.Uint32(rest[4:]) == 0 && !structured {
				n += int(r.length)
			}
		case len(rest) >= nbdwire.StructuredReplyHeaderLen && be.Uint32(rest) == nbdwire.StructuredReplyMagic:
			n = nbdwire.StructuredReplyHeaderLen + int(be.Uint32(rest[16:]))
		default:
			return out[:i]
		}
		if n > len(rest) {
			return out[:i]
		}
		i += n
	}
	return out
}

func checkChunk(t *testing.T, typ uint16, payload []byte, reqs map[uint64]sentRequest, handle uint64) {
	r, known := reqs[handle]
	if reqs != nil && !known {
		t.Fatalf("chunk for handle %d, never sent", handle)
	}
	switch typ {
	case nbdwire.ReplyTypeNone:
		if len(payload) != 0 {
			t.Fatalf("NONE chunk with payload")
		}
	case nbdwire.ReplyTypeOffsetData:
		if len(payload) < 9 {
			t.Fatalf("data chunk of %d bytes", len(payload))
		}
		if known && uint64(len(payload)-8) > uint64(r.length) {
			t.Fatalf("data chunk larger than the read")
		}
	case nbdwire.ReplyTypeOffsetHole:
		if len(payload) != 12 || be.Uint32(payload[8:]) == 0 {
			t.Fatalf("hole chunk % x", payload)
		}
		if known && uint64(be.Uint32(payload[8:])) > uint64(r.length) {
			t.Fatalf("hole chunk larger than the read")
		}
	case nbdwire.ReplyTypeBlockStatus:
		if len(payload) < 12 || (len(payload)-4)%8 != 0 {
			t.Fatalf("block status chunk of %d bytes", len(payload))
		}
		var sum uint64
		for p := payload[4:]; len(p) > 0; p = p[8:] {
			if be.Uint32(p) == 0 {
				t.Fatalf("empty descriptor")
			}
			sum += uint64(be.Uint32(p))
		}
		if known && sum > uint64(r.length) {
			t.Fatalf("descriptors cover %d bytes of %d", sum, r.length)
		}
	case nbdwire.ReplyTypeError, nbdwire.ReplyTypeErrorOffset:
		if len(payload) < 6 || be.Uint32(payload) == 0 {
			t.Fatalf("error chunk % x", payload)
		}
		msg := int(be.Uint16(payload[4:]))
		if msg > len(payload)-6 || !utf8.Valid(payload[6:6+msg]) {
			t.Fatalf("error chunk message")
		}
	default:
		t.Fatalf("chunk type %d", typ)
	}
}

// TestFuzzCorpus keeps testdata/fuzz in step with the seeds above, so the
// corpus `go test -fuzz` starts from is the one reviewed here. Run with
// NBDSERVER_WRITE_CORPUS=1 to rewrite it after changing a seed.
func TestFuzzCorpus(t *testing.T) {
	write := os.Getenv("NBDSERVER_WRITE_CORPUS") == "1"
	files := map[string]string{}
	for name, seed := range negotiateSeeds {
		files[filepath.Join("FuzzNegotiate", "seed-"+name)] = corpusFile(seed)
	}
	for name, seed := range requestSeeds {
		files[filepath.Join("FuzzRequests", "seed-"+name)] = corpusFile(byte(3), seed)
	}
	for path, want := range files {
		path = filepath.Join("testdata", "fuzz", path)
		if write {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != want {
			t.Errorf("%s is missing or stale (%v): run NBDSERVER_WRITE_CORPUS=1 go test -run TestFuzzCorpus ./nbdserver", path, err)
		}
	}
}

// corpusFile is the "go test fuzz v1" encoding of the arguments.
func corpusFile(args ...any) string {
	var b bytes.Buffer
	b.WriteString("go test fuzz v1\n")
	for _, a := range args {
		switch v := a.(type) {
		case []byte:
			fmt.Fprintf(&b, "[]byte(%s)\n", strconv.Quote(string(v)))
		case byte:
			fmt.Fprintf(&b, "byte(%s)\n", strconv.QuoteRune(rune(v)))
		default:
			panic(fmt.Sprintf("corpusFile: %T", a))
		}
	}
	return b.String()
}
