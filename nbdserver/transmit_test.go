package nbdserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

func TestReadWriteRoundTrip(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			e, disk, _ := twoExports(t)
			srv := startServer(t, e, Options{})
			rc := connect(t, srv.sock, "disk", structured)
			payload := make([]byte, 12345)
			for i := range payload {
				payload[i] = byte(i*7 + 3)
			}
			const off = 4097 // unaligned on purpose
			rc.request(nbdwire.CmdWrite, nbdwire.CmdFlagFUA, 1, off, uint32(len(payload)), payload)
			rc.expectSimple(1, 0)
			if got := disk.snapshot()[off : off+len(payload)]; !bytes.Equal(got, payload) {
				t.Fatal("export does not hold the written bytes")
			}
			rc.request(nbdwire.CmdRead, 0, 2, off, uint32(len(payload)), nil)
			var got []byte
			if structured {
				c := rc.readChunk()
				if c.handle != 2 || c.typ != nbdwire.ReplyTypeOffsetData || c.flags != nbdwire.ReplyFlagDone || be.Uint64(c.payload) != off {
					t.Fatalf("chunk handle %d type %d flags %d", c.handle, c.typ, c.flags)
				}
				got = c.payload[8:]
			} else {
				var errno uint32
				errno, _, got = rc.readSimple(len(payload))
				if errno != 0 {
					t.Fatalf("errno %d", errno)
				}
			}
			if !bytes.Equal(got, payload) {
				t.Fatal("read back different bytes")
			}
			// Zero-length requests are answered without reaching the export.
			calls := disk.calls.Load()
			rc.request(nbdwire.CmdRead, 0, 3, 0, 0, nil)
			if structured {
				if c := rc.readChunk(); c.handle != 3 || c.typ != nbdwire.ReplyTypeNone || c.flags != nbdwire.ReplyFlagDone {
					t.Fatalf("empty read: chunk %+v", c)
				}
			} else {
				rc.expectSimple(3, 0)
			}
			rc.request(nbdwire.CmdWrite, 0, 4, 0, 0, nil)
			rc.expectSimple(4, 0)
			rc.request(nbdwire.CmdTrim, 0, 5, 0, 0, nil)
			rc.expectSimple(5, 0)
			if n := disk.calls.Load() - calls; n != 0 {
				t.Errorf("zero-length requests made %d export calls", n)
			}
			rc.request(nbdwire.CmdFlush, 0, 6, 0, 0, nil)
			rc.expectSimple(6, 0)
			if disk.flushes.Load() != 1 {
				t.Error("flush did not reach the export")
			}
			rc.request(nbdwire.CmdDisc, 0, 7, 0, 0, nil)
			rc.expectEOF()
		})
	}
}

func TestRequestValidation(t *testing.T) {
	const maxPayload = 64 << 10
	e, _, _ := twoExports(t)
	plain := e.add("plain", "", newMemExport(testSize, ExportFlags{}))
	noFast := e.add("nofast", "", newMemExport(testSize, ExportFlags{Zeroes: true}))
	srv := startServer(t, e, Options{MaxPayload: maxPayload})

	type tc struct {
		name       string
		export     string
		typ, flags uint16
		off        uint64
		length     uint32
		payload    bool // send length bytes after the header (WRITE)
		errno      uint32
		onlyIn     string // "simple" or "structured": the case holds in that mode only
	}
	cases := []tc{
		{"read past end", "disk", nbdwire.CmdRead, 0, testSize - 10, 20, false, nbdwire.EINVAL, ""},
		{"read offset past end", "disk", nbdwire.CmdRead, 0, testSize + 1, 1, false, nbdwire.EINVAL, ""},
		{"read offset overflow", "disk", nbdwire.CmdRead, 0, 1<<64 - 100, 4096, false, nbdwire.EINVAL, ""},
		{"write past end", "disk", nbdwire.CmdWrite, 0, testSize - 10, 20, true, nbdwire.ENOSPC, ""},
		{"write zeroes past end", "disk", nbdwire.CmdWriteZeroes, 0, testSize - 10, 20, false, nbdwire.ENOSPC, ""},
		{"trim past end", "disk", nbdwire.CmdTrim, 0, testSize, 1, false, nbdwire.EINVAL, ""},
		{"cache past end", "disk", nbdwire.CmdCache, 0, testSize - 1, 2, false, nbdwire.EINVAL, ""},
		{"write on read-only", "ro", nbdwire.CmdWrite, 0, 0, 4096, true, nbdwire.EPERM, ""},
		{"trim on read-only", "ro", nbdwire.CmdTrim, 0, 0, 4096, false, nbdwire.EPERM, ""},
		{"write zeroes on read-only", "ro", nbdwire.CmdWriteZeroes, 0, 0, 4096, false, nbdwire.EPERM, ""},
		{"unknown command", "disk", 42, 0, 0, 0, false, nbdwire.EINVAL, ""},
		{"block status without context", "disk", nbdwire.CmdBlockStatus, 0, 0, 4096, false, nbdwire.EINVAL, ""},
		{"unknown flag", "disk", nbdwire.CmdRead, 1 << 9, 0, 1, false, nbdwire.EINVAL, ""},
		{"FUA not advertised", "plain", nbdwire.CmdWrite, nbdwire.CmdFlagFUA, 0, 1, true, nbdwire.EINVAL, ""},
		{"flush not advertised", "plain", nbdwire.CmdFlush, 0, 0, 0, false, nbdwire.EINVAL, ""},
		{"trim not advertised", "plain", nbdwire.CmdTrim, 0, 0, 1, false, nbdwire.EINVAL, ""},
		{"write zeroes not advertised", "plain", nbdwire.CmdWriteZeroes, 0, 0, 1, false, nbdwire.EINVAL, ""},
		{"cache not advertised", "plain", nbdwire.CmdCache, 0, 0, 1, false, nbdwire.EINVAL, ""},
		{"fast zero not advertised", "nofast", nbdwire.CmdWriteZeroes, nbdwire.CmdFlagFastZero, 0, 1, false, nbdwire.EINVAL, ""},
		{"NO_HOLE on write", "disk", nbdwire.CmdWrite, nbdwire.CmdFlagNoHole, 0, 1, true, nbdwire.EINVAL, ""},
		{"DF without structured replies", "disk", nbdwire.CmdRead, nbdwire.CmdFlagDF, 0, 1, false, nbdwire.EINVAL, "simple"},
		{"DF with structured replies", "disk", nbdwire.CmdRead, nbdwire.CmdFlagDF | nbdwire.CmdFlagFUA, 0, 4096, false, 0, "structured"},
		{"REQ_ONE on read", "disk", nbdwire.CmdRead, nbdwire.CmdFlagReqOne, 0, 1, false, nbdwire.EINVAL, ""},
		{"oversized read", "disk", nbdwire.CmdRead, 0, 0, maxPayload + 1, false, nbdwire.EINVAL, ""},
		{"oversized write", "disk", nbdwire.CmdWrite, 0, 0, maxPayload + 1, true, nbdwire.EINVAL, ""},
		{"flush with a range", "disk", nbdwire.CmdFlush, 0, 0, 512, false, nbdwire.EINVAL, ""},
		// Accepted: FUA on any command once advertised; big trims and
		// zeroes (no payload, so MaxPayload does not bound them).
		{"FUA on read", "disk", nbdwire.CmdRead, nbdwire.CmdFlagFUA, 0, 1, false, 0, ""},
		{"FUA on flush", "disk", nbdwire.CmdFlush, nbdwire.CmdFlagFUA, 0, 0, false, 0, ""},
		{"whole-export trim", "disk", nbdwire.CmdTrim, nbdwire.CmdFlagFUA, 0, testSize, false, 0, ""},
		{"whole-export zeroes", "disk", nbdwire.CmdWriteZeroes, nbdwire.CmdFlagNoHole | nbdwire.CmdFlagFastZero, 0, testSize, false, 0, ""},
		{"cache", "disk", nbdwire.CmdCache, 0, 0, testSize, false, 0, ""},
	}
	for _, structured := range []bool{false, true} {
		mode := map[bool]string{false: "simple", true: "structured"}[structured]
		conns := map[string]*rawClient{}
		for _, c := range cases {
			if c.onlyIn != "" && c.onlyIn != mode {
				continue
			}
			rc := conns[c.export]
			if rc == nil {
				rc = connect(t, srv.sock, c.export, structured)
				conns[c.export] = rc
			}
			m := e.exports[c.export]
			calls := m.calls.Load()
			var payload []byte
			if c.payload {
				payload = bytes.Repeat([]byte{0x5a}, int(c.length))
			}
			rc.request(c.typ, c.flags, 100, c.off, c.length, payload)
			var errno uint32
			var msg string
			switch {
			case c.typ == nbdwire.CmdRead && structured:
				ch := rc.readChunk()
				if ch.handle != 100 || ch.flags != nbdwire.ReplyFlagDone {
					t.Fatalf("%s: chunk handle %d flags %d", c.name, ch.handle, ch.flags)
				}
				if ch.typ == nbdwire.ReplyTypeError {
					errno, msg = chunkErrno(ch)
				} else if ch.typ != nbdwire.ReplyTypeOffsetData {
					t.Fatalf("%s: chunk type %d", c.name, ch.typ)
				}
			case structured && c.errno != 0:
				ch := rc.readChunk()
				if ch.handle != 100 || ch.typ != nbdwire.ReplyTypeError || ch.flags != nbdwire.ReplyFlagDone {
					t.Fatalf("%s: chunk %+v", c.name, ch)
				}
				errno, msg = chunkErrno(ch)
			default:
				var handle uint64
				dataLen := 0
				if c.typ == nbdwire.CmdRead {
					dataLen = int(c.length)
				}
				errno, handle, _ = rc.readSimple(dataLen)
				if handle != 100 {
					t.Fatalf("%s: handle %d", c.name, handle)
				}
			}
			if errno != c.errno {
				t.Errorf("structured=%v %s: errno %d (%s), want %d", structured, c.name, errno, msg, c.errno)
			}
			if structured && c.errno != 0 && msg == "" {
				t.Errorf("%s: error chunk without a message", c.name)
			}
			if c.errno != 0 && m.calls.Load() != calls {
				t.Errorf("%s: a rejected request reached the export", c.name)
			}
			// The connection is still framed: a good request after the bad one.
			rc.request(nbdwire.CmdRead, 0, 101, 0, 8, nil)
			if structured {
				if ch := rc.readChunk(); ch.handle != 101 || ch.typ != nbdwire.ReplyTypeOffsetData {
					t.Fatalf("%s: follow-up chunk %+v", c.name, ch)
				}
			} else if errno, handle, _ := rc.readSimple(8); errno != 0 || handle != 101 {
				t.Fatalf("%s: follow-up read errno %d handle %d", c.name, errno, handle)
			}
		}
	}
	// Only the follow-up reads (one per case, in both modes) reached them.
	perExport := map[string]int64{}
	for _, c := range cases {
		perExport[c.export] += map[bool]int64{false: 1, true: 2}[c.onlyIn == ""]
	}
	if plain.calls.Load() != perExport["plain"] || noFast.calls.Load() != perExport["nofast"] {
		t.Errorf("plain saw %d calls, nofast %d; want %v", plain.calls.Load(), noFast.calls.Load(), perExport)
	}
}

func TestBadRequestMagicDisconnects(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	other := connect(t, srv.sock, "disk", false)
	rc := connect(t, srv.sock, "disk", false)
	b := be.AppendUint32(nil, nbdwire.RequestMagic+1)
	rc.write(append(b, make([]byte, nbdwire.RequestHeaderLen-4)...))
	rc.expectEOF()
	// The other connection and new ones are unaffected.
	other.request(nbdwire.CmdRead, 0, 1, 0, 1, nil)
	if errno, handle, _ := other.readSimple(1); errno != 0 || handle != 1 {
		t.Fatalf("other connection: errno %d handle %d", errno, handle)
	}
	checkServes(t, srv.sock)
}

func TestBackendErrorsMapToErrno(t *testing.T) {
	cases := []struct {
		err   error
		errno uint32
	}{
		{fmt.Errorf("wrapped: %w", syscall.ENOSPC), nbdwire.ENOSPC},
		{syscall.EDQUOT, nbdwire.ENOSPC},
		{syscall.EFBIG, nbdwire.ENOSPC},
		{syscall.EPERM, nbdwire.EPERM},
		{syscall.EROFS, nbdwire.EPERM},
		{syscall.ENOMEM, nbdwire.ENOMEM},
		{syscall.EINVAL, nbdwire.EINVAL},
		{syscall.EOVERFLOW, nbdwire.EOVERFLOW},
		{ErrNotSupported, nbdwire.ENOTSUP},
		{syscall.EOPNOTSUPP, nbdwire.ENOTSUP},
		{syscall.ESHUTDOWN, nbdwire.ESHUTDOWN},
		{syscall.ENOENT, nbdwire.EIO}, // not an NBD errno
		{errInjected, nbdwire.EIO},
		{context.Canceled, nbdwire.EIO},
	}
	for _, c := range cases {
		if got := errnoOf(c.err); got != c.errno {
			t.Errorf("errnoOf(%v) = %d, want %d", c.err, got, c.errno)
		}
	}

	// And on the wire, for every command that can fail, on one connection
	// that survives all of them.
	e, disk, _ := twoExports(t)
	var mu sync.Mutex
	var failWith error
	disk.hook = func(ctx context.Context, op string, off, n int64) error {
		mu.Lock()
		defer mu.Unlock()
		return failWith
	}
	srv := startServer(t, e, Options{})
	for _, structured := range []bool{false, true} {
		rc := connect(t, srv.sock, "disk", structured)
		for i, c := range cases {
			mu.Lock()
			failWith = fmt.Errorf("injected: %w", c.err)
			mu.Unlock()
			for _, typ := range []uint16{nbdwire.CmdRead, nbdwire.CmdWrite, nbdwire.CmdFlush, nbdwire.CmdTrim, nbdwire.CmdWriteZeroes, nbdwire.CmdCache} {
				handle := uint64(i*10 + int(typ))
				var payload []byte
				length := uint32(512)
				switch typ {
				case nbdwire.CmdWrite:
					payload = make([]byte, length)
				}
				off := uint64(512)
				if typ == nbdwire.CmdFlush {
					off, length = 0, 0
				}
				rc.request(typ, 0, handle, off, length, payload)
				var errno uint32
				if structured {
					ch := rc.readChunk()
					if ch.handle != handle || ch.typ != nbdwire.ReplyTypeError || ch.flags != nbdwire.ReplyFlagDone {
						t.Fatalf("%s: chunk %+v", cmdName(typ), ch)
					}
					var msg string
					errno, msg = chunkErrno(ch)
					if !strings.Contains(msg, "injected") {
						t.Errorf("message %q", msg)
					}
				} else {
					var h uint64
					errno, h, _ = rc.readSimple(0)
					if h != handle {
						t.Fatalf("handle %d want %d", h, handle)
					}
				}
				if errno != c.errno {
					t.Errorf("structured=%v %s failing with %v: errno %d, want %d", structured, cmdName(typ), c.err, errno, c.errno)
				}
			}
		}
	}
}

func TestOffsetErrorPartialRead(t *testing.T) {
	e, disk, _ := twoExports(t)
	const off, length, failAt = 8192, 4096, 8192 + 1000
	const outsideOff = 3 * 8192
	disk.hook = func(ctx context.Context, op string, o, n int64) error {
		switch {
		case op == "read" && o == off:
			return &OffsetError{Offset: failAt, Err: syscall.EIO}
		case op == "read" && o == outsideOff:
			return &OffsetError{Offset: 0, Err: syscall.EIO} // not within the request
		case op == "write":
			return &OffsetError{Offset: o + 5, Err: syscall.ENOSPC}
		}
		return nil
	}
	srv := startServer(t, e, Options{})

	rc := connect(t, srv.sock, "disk", true)
	rc.request(nbdwire.CmdRead, 0, 1, off, length, nil)
	// One data chunk for [off, failAt), not final, then a final
	// ERROR_OFFSET chunk at failAt.
	data := rc.readChunk()
	if data.typ != nbdwire.ReplyTypeOffsetData || data.flags != 0 || be.Uint64(data.payload) != off || len(data.payload) != 8+failAt-off {
		t.Fatalf("data chunk type %d flags %d len %d", data.typ, data.flags, len(data.payload))
	}
	errc := rc.readChunk()
	if errc.typ != nbdwire.ReplyTypeErrorOffset || errc.flags != nbdwire.ReplyFlagDone || errc.handle != 1 {
		t.Fatalf("error chunk %+v", errc)
	}
	errno, msg := chunkErrno(errc)
	if got := be.Uint64(errc.payload[6+len(msg):]); errno != nbdwire.EIO || got != failAt {
		t.Fatalf("error chunk errno %d offset %d", errno, got)
	}

	// An offset outside the request is not trusted: a plain error chunk.
	rc.request(nbdwire.CmdRead, 0, 2, outsideOff, length, nil)
	if c := rc.readChunk(); c.typ != nbdwire.ReplyTypeError || c.flags != nbdwire.ReplyFlagDone {
		t.Fatalf("chunk type %d flags %d", c.typ, c.flags)
	}
	// A write failing inside its range: ERROR_OFFSET with its errno.
	rc.request(nbdwire.CmdWrite, 0, 3, 0, 16, make([]byte, 16))
	c := rc.readChunk()
	if errno, msg := chunkErrno(c); c.typ != nbdwire.ReplyTypeErrorOffset || errno != nbdwire.ENOSPC || be.Uint64(c.payload[6+len(msg):]) != 5 {
		t.Fatalf("write error chunk type %d errno %d", c.typ, errno)
	}
	// Without structured replies: a simple EIO, no data.
	rc = connect(t, srv.sock, "disk", false)
	rc.request(nbdwire.CmdRead, 0, 4, off, length, nil)
	rc.expectSimple(4, nbdwire.EIO)
	rc.request(nbdwire.CmdRead, 0, 5, 0, 4, nil)
	if errno, handle, _ := rc.readSimple(4); errno != 0 || handle != 5 {
		t.Fatalf("follow-up read errno %d handle %d", errno, handle)
	}
}

func TestRepliesOutOfOrder(t *testing.T) {
	e, disk, _ := twoExports(t)
	gate := make(chan struct{})
	entered := make(chan struct{}, 1)
	disk.hook = func(ctx context.Context, op string, off, n int64) error {
		if op == "read" && off == 0 {
			entered <- struct{}{}
			<-gate
		}
		return nil
	}
	srv := startServer(t, e, Options{})
	openGate := sync.OnceFunc(func() { close(gate) })
	t.Cleanup(openGate)
	rc := connect(t, srv.sock, "disk", false)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 4096, nil) // blocks in the export
	<-entered
	rc.request(nbdwire.CmdWrite, 0, 2, 8192, 4, []byte("fast"))
	rc.request(nbdwire.CmdRead, 0, 3, 8192, 4, nil)
	// The slow read must not hold the others back. The write and the read
	// race each other (the client sent them without waiting), so only their
	// handles are checked, not their order or the read's data.
	for range 2 {
		errno, handle, _ := rc.readSimple(0)
		if errno != 0 || (handle != 2 && handle != 3) {
			t.Fatalf("reply errno %d handle %d, want 2 or 3", errno, handle)
		}
		if handle == 3 {
			rc.read(4)
		}
	}
	openGate()
	if errno, handle, data := rc.readSimple(4096); errno != 0 || handle != 1 || len(data) != 4096 {
		t.Fatalf("slow read %d %d", errno, handle)
	}
}

func TestMaxInFlightBoundsConcurrency(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"requests", Options{MaxInFlight: 2}},
		{"bytes", Options{MaxPayload: 64 << 10, MaxInFlightBytes: 128 << 10}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, disk, _ := twoExports(t)
			gate := make(chan struct{})
			entered := make(chan struct{}, 16)
			disk.hook = func(ctx context.Context, op string, off, n int64) error {
				entered <- struct{}{}
				<-gate
				return nil
			}
			srv := startServer(t, e, tc.opts)
			openGate := sync.OnceFunc(func() { close(gate) })
			t.Cleanup(openGate) // runs before the server's cleanup
			rc := connect(t, srv.sock, "disk", false)
			const requests = 6
			payload := make([]byte, 64<<10)
			// From another goroutine: once the server stops reading (the
			// back-pressure under test) these writes block.
			sent := make(chan error, 1)
			go func() {
				var b []byte
				for i := range requests {
					b = be.AppendUint32(b, nbdwire.RequestMagic)
					b = be.AppendUint16(b, 0)
					b = be.AppendUint16(b, nbdwire.CmdWrite)
					b = be.AppendUint64(b, uint64(i))
					b = be.AppendUint64(b, uint64(i)*uint64(len(payload)))
					b = be.AppendUint32(b, uint32(len(payload)))
					b = append(b, payload...)
				}
				_, err := rc.nc.Write(b)
				sent <- err
			}()
			<-entered
			<-entered
			openGate()
			seen := map[uint64]bool{}
			for range requests {
				errno, handle, _ := rc.readSimple(0)
				if errno != 0 || seen[handle] {
					t.Fatalf("reply errno %d handle %d (seen %v)", errno, handle, seen)
				}
				seen[handle] = true
			}
			if err := <-sent; err != nil {
				t.Fatal(err)
			}
			if m := disk.maxInFlight.Load(); m != 2 {
				t.Fatalf("%d requests reached the export at once, want 2", m)
			}
		})
	}
}

// A request stays in flight until its reply is written: a client that
// sends reads and does not read the replies makes the server stop reading
// once the socket is full and MaxInFlight replies wait, instead of reading
// every request and keeping its reply in memory.
func TestUnwrittenRepliesStayInFlight(t *testing.T) {
	e, disk, _ := twoExports(t)
	srv := startServer(t, e, Options{MaxInFlight: 4, MaxPayload: 64 << 10, MaxInFlightBytes: 256 << 10})
	rc := connect(t, srv.sock, "disk", false)
	const requests, size = 64, 64 << 10 // 4 MiB of replies
	for i := range requests {
		rc.request(nbdwire.CmdRead, 0, uint64(i), uint64(i%(testSize/size))*size, size, nil)
	}
	// Wait until the server stops calling the export.
	last, stable := int64(-1), 0
	for deadline := time.Now().Add(20 * time.Second); stable < 6; {
		if time.Now().After(deadline) {
			t.Fatalf("the export is still being called: %d calls", disk.calls.Load())
		}
		time.Sleep(50 * time.Millisecond)
		if n := disk.calls.Load(); n == last {
			stable++
		} else {
			last, stable = n, 0
		}
	}
	if last >= requests {
		t.Fatalf("the server read all %d requests while none of their replies could be written", requests)
	}
	t.Logf("%d reads served before the client read a reply", last)
	seen := map[uint64]bool{}
	for range requests {
		errno, handle, data := rc.readSimple(size)
		if errno != 0 || seen[handle] || len(data) != size {
			t.Fatalf("reply errno %d handle %d len %d (seen %v)", errno, handle, len(data), seen)
		}
		seen[handle] = true
	}
}

func TestDiscFinishesRequestsInFlight(t *testing.T) {
	e, disk, _ := twoExports(t)
	gate := make(chan struct{})
	entered := make(chan struct{}, 3)
	disk.hook = func(ctx context.Context, op string, off, n int64) error {
		entered <- struct{}{}
		<-gate
		return ctx.Err() // the request must not be cancelled by DISC
	}
	srv := startServer(t, e, Options{})
	openGate := sync.OnceFunc(func() { close(gate) })
	t.Cleanup(openGate)
	rc := connect(t, srv.sock, "disk", false)
	for i := range 3 {
		rc.request(nbdwire.CmdWrite, 0, uint64(i), uint64(i)*512, 3, []byte("abc"))
	}
	for range 3 {
		<-entered
	}
	rc.request(nbdwire.CmdDisc, 0, 99, 0, 0, nil)
	openGate()
	seen := map[uint64]bool{}
	for range 3 {
		errno, handle, _ := rc.readSimple(0)
		if errno != 0 {
			t.Fatalf("handle %d errno %d", handle, errno)
		}
		seen[handle] = true
	}
	if len(seen) != 3 {
		t.Fatalf("replies for %v", seen)
	}
	rc.expectEOF()
	data := disk.snapshot()
	for i := range 3 {
		if string(data[i*512:i*512+3]) != "abc" {
			t.Fatalf("write %d lost", i)
		}
	}
	waitFor(t, "release", func() bool { return e.releases.Load() == e.opens.Load() })
	if len(srv.Connections()) != 0 {
		t.Errorf("Connections %v", srv.Connections())
	}
}

func TestAbruptCloseMidPayload(t *testing.T) {
	e, disk, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := connect(t, srv.sock, "disk", false)
	b := be.AppendUint32(nil, nbdwire.RequestMagic)
	b = be.AppendUint16(b, 0)
	b = be.AppendUint16(b, nbdwire.CmdWrite)
	b = be.AppendUint64(b, 1)
	b = be.AppendUint64(b, 0)
	b = be.AppendUint32(b, 64<<10)
	rc.write(append(b, bytes.Repeat([]byte{0xff}, 1000)...))
	rc.nc.Close()
	waitFor(t, "connection teardown", func() bool { return e.releases.Load() == 1 })
	if len(srv.Connections()) != 0 {
		t.Errorf("Connections %v", srv.Connections())
	}
	if n := disk.calls.Load(); n != 0 {
		t.Errorf("a partial write reached the export (%d calls)", n)
	}
	if !bytes.Equal(disk.snapshot()[:1000], make([]byte, 1000)) {
		t.Error("partial payload was written")
	}
	checkServes(t, srv.sock)
}

func TestAbruptCloseCancelsRequests(t *testing.T) {
	e, disk, _ := twoExports(t)
	entered := make(chan struct{})
	cancelled := make(chan error, 1)
	disk.hook = func(ctx context.Context, op string, off, n int64) error {
		close(entered)
		<-ctx.Done()
		cancelled <- ctx.Err()
		return ctx.Err()
	}
	srv := startServer(t, e, Options{})
	rc := connect(t, srv.sock, "disk", false)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 512, nil)
	<-entered
	rc.nc.Close()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Fatalf("ctx error %v", err)
	}
	waitFor(t, "release", func() bool { return e.releases.Load() == 1 })
}

// TestConcurrentClients pipelines random writes and reads from several
// connections, each owning a slice of the export, and checks every byte
// against a model. Replay with the logged seed.
func TestConcurrentClients(t *testing.T) {
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	e, disk, _ := twoExports(t)
	srv := startServer(t, e, Options{MaxInFlight: 8})
	const clients, slice = 4, testSize / 4
	// Parallel subtests, so each client may fail its own t.
	t.Run("clients", func(t *testing.T) {
		for k := range clients {
			t.Run(fmt.Sprint(k), func(t *testing.T) {
				t.Parallel()
				rng := rand.New(rand.NewPCG(seed, uint64(k)))
				rc := connect(t, srv.sock, "disk", k%2 == 0)
				model := make([]byte, slice)
				base := uint64(k * slice)
				// Writes to disjoint 4 KiB blocks can be in flight together;
				// replies come back in any order.
				const block = 4096
				perm := rng.Perm(slice / block)
				for i, blk := range perm {
					n := 1 + rng.IntN(block)
					p := make([]byte, n)
					for j := range p {
						p[j] = byte(rng.Uint32())
					}
					copy(model[blk*block:], p)
					rc.request(nbdwire.CmdWrite, 0, uint64(i), base+uint64(blk*block), uint32(n), p)
				}
				seen := map[uint64]bool{}
				for range perm {
					errno, handle, _ := rc.readSimple(0)
					if errno != 0 || seen[handle] {
						t.Fatalf("client %d: write reply errno %d handle %d", k, errno, handle)
					}
					seen[handle] = true
				}
				for i := range slice / block {
					rc.request(nbdwire.CmdRead, 0, uint64(i), base+uint64(i*block), block, nil)
				}
				for range slice / block {
					var handle uint64
					var data []byte
					if k%2 == 0 {
						c := rc.readChunk()
						handle, data = c.handle, c.payload[8:]
					} else {
						var errno uint32
						errno, handle, data = rc.readSimple(block)
						if errno != 0 {
							t.Fatalf("client %d: read errno %d", k, errno)
						}
					}
					if !bytes.Equal(data, model[handle*block:(handle+1)*block]) {
						t.Errorf("client %d: block %d differs from the model", k, handle)
					}
				}
				rc.request(nbdwire.CmdDisc, 0, 0, 0, 0, nil)
				rc.expectEOF()
			})
		}
	})
	if disk.maxInFlight.Load() > 4*8 {
		t.Errorf("max in flight %d", disk.maxInFlight.Load())
	}
}
