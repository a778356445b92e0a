package nbdserver

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// memExport is an in-memory Export. hook, when set, runs at the start of
// every I/O method and its error (if any) is the method's result: tests use
// it to block requests, observe contexts and inject errors.
type memExport struct {
	flags     ExportFlags
	preferred uint32
	hook      func(ctx context.Context, op string, off, n int64) error
	// contexts are the metadata contexts offered (none by default);
	// extents, when set (setExtents), answers Extents instead of
	// zeroExtents.
	contexts []string
	extents  atomic.Pointer[extentsFunc]

	mu   sync.RWMutex
	data []byte // guarded by mu

	calls       atomic.Int64 // I/O method calls
	flushes     atomic.Int64
	inFlight    atomic.Int64
	maxInFlight atomic.Int64 // highest inFlight seen
	violations  atomic.Int64 // out-of-range calls: the server promised none
}

func newMemExport(size int, flags ExportFlags) *memExport {
	return &memExport{flags: flags, preferred: 4096, data: make([]byte, size)}
}

var allFlags = ExportFlags{Flush: true, FUA: true, Trim: true, Zeroes: true, FastZero: true, Cache: true, MultiConn: true}

func (m *memExport) Size() int64                { return int64(len(m.data)) }
func (m *memExport) Flags() ExportFlags         { return m.flags }
func (m *memExport) PreferredBlockSize() uint32 { return m.preferred }

func (m *memExport) enter(ctx context.Context, op string, off, n int64) error {
	m.calls.Add(1)
	cur := m.inFlight.Add(1)
	for {
		old := m.maxInFlight.Load()
		if cur <= old || m.maxInFlight.CompareAndSwap(old, cur) {
			break
		}
	}
	if off < 0 || n < 0 || off+n > int64(len(m.data)) || (op != "flush" && n == 0) {
		// The server promises never to pass an empty or out-of-range request.
		m.violations.Add(1)
		return fmt.Errorf("memExport: %s [%d, +%d) out of range (server bug)", op, off, n)
	}
	if m.hook != nil {
		return m.hook(ctx, op, off, n)
	}
	return nil
}

func (m *memExport) leave() { m.inFlight.Add(-1) }

func (m *memExport) ReadAt(ctx context.Context, p []byte, off int64) error {
	defer m.leave()
	if err := m.enter(ctx, "read", off, int64(len(p))); err != nil {
		return err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memExport) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	defer m.leave()
	if err := m.enter(ctx, "write", off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memExport) zero(off, n int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
}

func (m *memExport) WriteZeroes(ctx context.Context, off, n int64, fua, noHole, fastZero bool) error {
	defer m.leave()
	if err := m.enter(ctx, "zero", off, n); err != nil {
		return err
	}
	m.zero(off, n)
	return nil
}

func (m *memExport) Trim(ctx context.Context, off, n int64, fua bool) error {
	defer m.leave()
	if err := m.enter(ctx, "trim", off, n); err != nil {
		return err
	}
	m.zero(off, n)
	return nil
}

func (m *memExport) Flush(ctx context.Context) error {
	defer m.leave()
	if err := m.enter(ctx, "flush", 0, 0); err != nil {
		return err
	}
	m.flushes.Add(1)
	return nil
}

func (m *memExport) Cache(ctx context.Context, off, n int64) error {
	defer m.leave()
	return m.enter(ctx, "cache", off, n)
}

func (m *memExport) MetaContexts() []string { return m.contexts }

func (m *memExport) Extents(ctx context.Context, metaContext string, off, n int64, maxExtents int) ([]Extent, error) {
	defer m.leave()
	if err := m.enter(ctx, "extents", off, n); err != nil {
		return nil, err
	}
	if n >= 1<<32 || maxExtents < 1 {
		m.violations.Add(1)
		return nil, fmt.Errorf("memExport: extents of %d bytes, at most %d (server bug)", n, maxExtents)
	}
	if f := m.extents.Load(); f != nil {
		return (*f)(metaContext, off, n, maxExtents)
	}
	return m.zeroExtents(off, n, maxExtents), nil
}

type extentsFunc func(metaContext string, off, n int64, maxExtents int) ([]Extent, error)

// setExtents makes f answer Extents, even while requests run.
func (m *memExport) setExtents(f extentsFunc) { m.extents.Store(&f) }

// zeroExtents is base:allocation from the data: 4 KiB blocks of zeroes
// are holes, the rest data.
func (m *memExport) zeroExtents(off, n int64, maxExtents int) []Extent {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []Extent
	for end := off + n; off < end; {
		next := min((off/4096+1)*4096, end)
		var flags uint32
		if len(bytes.TrimLeft(m.data[off:next], "\x00")) == 0 {
			flags = StateHole | StateZero
		}
		if k := len(out); k > 0 && out[k-1].Flags == flags {
			out[k-1].Length += next - off
		} else if len(out) == maxExtents {
			break
		} else {
			out = append(out, Extent{Length: next - off, Flags: flags})
		}
		off = next
	}
	return out
}

func (m *memExport) snapshot() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return bytes.Clone(m.data)
}

func (m *memExport) fill(b []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data, b)
}

// memExports is an Exports registry that counts opens and releases.
type memExports struct {
	t            testing.TB
	exports      map[string]*memExport
	descriptions map[string]string
	// wrapped, for a name, is what Lookup and Open return instead of the
	// memExport itself (an export with optional interfaces).
	wrapped map[string]Export

	opens    atomic.Int64
	releases atomic.Int64
}

func newMemExports(t testing.TB) *memExports {
	return &memExports{t: t, exports: map[string]*memExport{}, descriptions: map[string]string{}, wrapped: map[string]Export{}}
}

func (e *memExports) add(name, description string, m *memExport) *memExport {
	e.exports[name] = m
	e.descriptions[name] = description
	return m
}

func (e *memExports) Lookup(name string) (Export, bool) {
	m, ok := e.exports[name]
	if w := e.wrapped[name]; ok && w != nil {
		return w, true
	}
	return m, ok
}

func (e *memExports) Open(name string) (Export, func(), bool) {
	m, ok := e.Lookup(name)
	if !ok {
		return nil, nil, false
	}
	e.opens.Add(1)
	var released atomic.Bool
	return m, func() {
		if released.Swap(true) {
			e.t.Errorf("export %q released twice", name)
		}
		e.releases.Add(1)
	}, true
}

func (e *memExports) List() []ExportInfo {
	var infos []ExportInfo
	for name := range e.exports {
		infos = append(infos, ExportInfo{Name: name, Description: e.descriptions[name]})
	}
	sort.Slice(infos, func(i, j int) bool { return infos[i].Name < infos[j].Name })
	return infos
}

// testServer is a Server on a unix socket in a short temporary directory.
type testServer struct {
	*Server
	sock string
}

// startServer serves exports until the test ends, then closes the server
// and checks that it left no goroutine behind and released every export it
// opened.
func startServer(t testing.TB, exports *memExports, opts Options) *testServer {
	t.Helper()
	sock := testutil.Sock(t, "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	return startServerOn(t, exports, opts, l, sock)
}

// startServerTCP is startServer on 127.0.0.1; dialRaw and connect take
// the address it returns in sock.
func startServerTCP(t testing.TB, exports *memExports, opts Options) *testServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return startServerOn(t, exports, opts, l, l.Addr().String())
}

func startServerOn(t testing.TB, exports *memExports, opts Options, l net.Listener, sock string) *testServer {
	t.Helper()
	before := runtime.NumGoroutine()
	srv, err := NewServer(exports, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		checkNoServerGoroutines(t)
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		cancel()
		if o, r := exports.opens.Load(), exports.releases.Load(); o != r {
			t.Errorf("exports opened %d times, released %d times", o, r)
		}
		for name, m := range exports.exports {
			if v := m.violations.Load(); v != 0 {
				t.Errorf("export %q saw %d invalid calls", name, v)
			}
		}
		if n := len(srv.Connections()); n != 0 {
			t.Errorf("Connections after Close: %v", srv.Connections())
		}
		srv.pipes.mu.Lock()
		if srv.pipes.open != 0 {
			t.Errorf("%d pipes still open after Close", srv.pipes.open)
		}
		srv.pipes.mu.Unlock()
		checkGoroutineCount(t, before)
	})
	return &testServer{Server: srv, sock: sock}
}

// pipeCounts are the server's pipes made and not closed, and those of
// them idle in the pool.
func pipeCounts(srv *testServer) (open, free int) {
	srv.pipes.mu.Lock()
	defer srv.pipes.mu.Unlock()
	return srv.pipes.open, len(srv.pipes.free)
}

// serverFrame matches the goroutines the server starts: connections, their
// workers, and Serve's listener watcher (a closure). A caller's own
// goroutine in Serve or Close does not count.
var serverFrame = regexp.MustCompile(`nbdserver\.\(\*(conn|admission)\)|nbdserver\.\(\*Server\)\.\w+\.func`)

// checkNoServerGoroutines fails if any goroutine the server started is
// still running. Close waits for all of them, so right after it returns
// there must be none: no polling.
func checkNoServerGoroutines(t testing.TB) {
	t.Helper()
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if serverFrame.Match(g) && !bytes.Contains(g, []byte("checkNoServerGoroutines")) {
			t.Errorf("server goroutine still running after Close:\n%s", g)
		}
	}
}

// checkGoroutineCount waits for the goroutine count to drop back to what it
// was before the server started: the test's own helpers (the Serve caller,
// exec.Cmd pipes) exit asynchronously, so this one polls, with a generous
// bound that only turns a leak into a failure rather than a hang.
func checkGoroutineCount(t testing.TB, before int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("goroutines: %d before the server, %d after Close\n%s", before, runtime.NumGoroutine(), buf)
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rawClient speaks NBD byte by byte, so tests can break the protocol.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	r  *bufio.Reader
}

func dialRaw(t testing.TB, sock string) *rawClient {
	t.Helper()
	network := "unix"
	if strings.HasPrefix(sock, "127.0.0.1:") {
		network = "tcp" // from startServerTCP
	}
	nc, err := net.Dial(network, sock)
	if err != nil {
		t.Fatal(err)
	}
	// Not a timed assertion: it turns a server that hangs into a failure
	// instead of a stuck test binary.
	nc.SetDeadline(time.Now().Add(60 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return &rawClient{t: t, nc: nc, r: bufio.NewReader(nc)}
}

func (rc *rawClient) write(b []byte) {
	rc.t.Helper()
	if _, err := rc.nc.Write(b); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

func (rc *rawClient) read(n int) []byte {
	rc.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(rc.r, b); err != nil {
		rc.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// handshake reads the greeting and sends client flags.
func (rc *rawClient) handshake(clientFlags uint32) {
	rc.t.Helper()
	g := rc.read(18)
	if be.Uint64(g) != nbdwire.NBDMagic || be.Uint64(g[8:]) != nbdwire.OptMagic {
		rc.t.Fatalf("bad greeting % x", g)
	}
	if f := be.Uint16(g[16:]); f != nbdwire.FlagFixedNewstyle|nbdwire.FlagNoZeroes {
		rc.t.Fatalf("handshake flags %#x", f)
	}
	rc.write(be.AppendUint32(nil, clientFlags))
}

func (rc *rawClient) sendOption(opt uint32, data []byte) {
	rc.t.Helper()
	b := be.AppendUint64(nil, nbdwire.OptMagic)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	rc.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (rc *rawClient) readOptReply() optReply {
	rc.t.Helper()
	h := rc.read(20)
	if m := be.Uint64(h); m != nbdwire.OptReplyMagic {
		rc.t.Fatalf("option reply magic %#x", m)
	}
	return optReply{opt: be.Uint32(h[8:]), typ: be.Uint32(h[12:]), data: rc.read(int(be.Uint32(h[16:])))}
}

func (rc *rawClient) expectOptReply(opt, typ uint32) optReply {
	rc.t.Helper()
	r := rc.readOptReply()
	if r.opt != opt || r.typ != typ {
		rc.t.Fatalf("option reply (opt %d, type %#x, %q), want (opt %d, type %#x)", r.opt, r.typ, r.data, opt, typ)
	}
	return r
}

func infoRequest(name string, infos ...uint16) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = be.AppendUint16(b, i)
	}
	return b
}

// goExport negotiates (optionally structured replies) and enters the
// transmission phase with NBD_OPT_GO; it returns size and flags.
func (rc *rawClient) goExport(name string, structured bool) (uint64, uint16) {
	rc.t.Helper()
	if structured {
		rc.sendOption(nbdwire.OptStructuredReply, nil)
		rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)
	}
	rc.sendOption(nbdwire.OptGo, infoRequest(name))
	var size uint64
	var flags uint16
	for {
		r := rc.readOptReply()
		switch r.typ {
		case nbdwire.RepInfo:
			if be.Uint16(r.data) == nbdwire.InfoExport {
				size, flags = be.Uint64(r.data[2:]), be.Uint16(r.data[10:])
			}
		case nbdwire.RepAck:
			return size, flags
		default:
			rc.t.Fatalf("NBD_OPT_GO %q: reply type %#x %q", name, r.typ, r.data)
		}
	}
}

// connect dials, handshakes with fixed newstyle and no zeroes, and enters
// the transmission phase.
func connect(t testing.TB, sock, name string, structured bool) *rawClient {
	t.Helper()
	rc := dialRaw(t, sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.goExport(name, structured)
	return rc
}

func (rc *rawClient) request(typ, flags uint16, handle, off uint64, length uint32, payload []byte) {
	rc.t.Helper()
	b := be.AppendUint32(nil, nbdwire.RequestMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, handle)
	b = be.AppendUint64(b, off)
	b = be.AppendUint32(b, length)
	rc.write(append(b, payload...))
}

// readSimple reads a simple reply; for a successful read it also reads
// dataLen bytes of data.
func (rc *rawClient) readSimple(dataLen int) (errno uint32, handle uint64, data []byte) {
	rc.t.Helper()
	h := rc.read(nbdwire.SimpleReplyHeaderLen)
	if m := be.Uint32(h); m != nbdwire.SimpleReplyMagic {
		rc.t.Fatalf("simple reply magic %#x", m)
	}
	errno, handle = be.Uint32(h[4:]), be.Uint64(h[8:])
	if errno == 0 && dataLen > 0 {
		data = rc.read(dataLen)
	}
	return errno, handle, data
}

func (rc *rawClient) expectSimple(handle uint64, errno uint32) {
	rc.t.Helper()
	gotErrno, gotHandle, _ := rc.readSimple(0)
	if gotHandle != handle || gotErrno != errno {
		rc.t.Fatalf("reply (handle %d, errno %d), want (handle %d, errno %d)", gotHandle, gotErrno, handle, errno)
	}
}

type chunk struct {
	flags, typ uint16
	handle     uint64
	payload    []byte
}

func (rc *rawClient) readChunk() chunk {
	rc.t.Helper()
	h := rc.read(nbdwire.StructuredReplyHeaderLen)
	if m := be.Uint32(h); m != nbdwire.StructuredReplyMagic {
		rc.t.Fatalf("structured reply magic %#x", m)
	}
	return chunk{flags: be.Uint16(h[4:]), typ: be.Uint16(h[6:]), handle: be.Uint64(h[8:]), payload: rc.read(int(be.Uint32(h[16:])))}
}

// chunkErrno decodes an error chunk's errno and message.
func chunkErrno(c chunk) (uint32, string) {
	n := int(be.Uint16(c.payload[4:]))
	return be.Uint32(c.payload), string(c.payload[6 : 6+n])
}

// expectEOF reads until the server closes the connection, failing if
// anything arrives first.
func (rc *rawClient) expectEOF() {
	rc.t.Helper()
	b, err := io.ReadAll(rc.r)
	if len(b) != 0 {
		rc.t.Fatalf("got %d bytes (% x...) before EOF", len(b), b[:min(len(b), 32)])
	}
	if err != nil && !isClosedConn(err) {
		rc.t.Fatalf("want EOF, got %v", err)
	}
}

// waitFor polls cond; a bound turns a hang into a failure (no timing is
// asserted).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

var errInjected = errors.New("injected failure")
