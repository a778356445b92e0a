package nbdserver

import (
	"bytes"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

const testSize = 1 << 20

// twoExports is the registry most tests use: "disk" can do everything,
// "ro" is read-only but advertises the write-side commands, so EPERM (not
// EINVAL) is what a write gets.
func twoExports(t *testing.T) (*memExports, *memExport, *memExport) {
	e := newMemExports(t)
	disk := e.add("disk", "a writable disk", newMemExport(testSize, allFlags))
	ro := e.add("ro", "a read-only disk", newMemExport(testSize, ExportFlags{ReadOnly: true, Flush: true, Trim: true, Zeroes: true, FUA: true}))
	return e, disk, ro
}

// checkServes proves the server still works for a new client.
func checkServes(t *testing.T, sock string) {
	t.Helper()
	rc := connect(t, sock, "disk", false)
	rc.request(nbdwire.CmdRead, 0, 77, 0, 512, nil)
	if errno, handle, data := rc.readSimple(512); errno != 0 || handle != 77 || len(data) != 512 {
		t.Fatalf("read after abuse: errno %d handle %d len %d", errno, handle, len(data))
	}
	rc.request(nbdwire.CmdDisc, 0, 78, 0, 0, nil)
	rc.expectEOF()
}

func TestUnknownClientFlagsDisconnect(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | 1<<7)
	rc.expectEOF()
	checkServes(t, srv.sock)
}

func TestBadOptionMagicDisconnects(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle)
	b := be.AppendUint64(nil, nbdwire.OptMagic^1)
	b = be.AppendUint32(b, nbdwire.OptList)
	b = be.AppendUint32(b, 0)
	rc.write(b)
	rc.expectEOF()
	checkServes(t, srv.sock)
}

func TestGiantOptionRefusedBeforeReading(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	for _, length := range []uint32{maxOptionLen + 1, 1 << 31, 1<<32 - 1} {
		rc := dialRaw(t, srv.sock)
		rc.handshake(nbdwire.FlagCFixedNewstyle)
		// Only the header: the server must answer without waiting for (or
		// allocating) the announced data.
		b := be.AppendUint64(nil, nbdwire.OptMagic)
		b = be.AppendUint32(b, nbdwire.OptGo)
		b = be.AppendUint32(b, length)
		rc.write(b)
		r := rc.expectOptReply(nbdwire.OptGo, nbdwire.RepErrTooBig)
		if !strings.Contains(string(r.data), "exceeds") {
			t.Errorf("length %d: message %q", length, r.data)
		}
		rc.expectEOF()
	}
	checkServes(t, srv.sock)
}

func TestUnknownOptionAtLengthLimitIsSkipped(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(4242, bytes.Repeat([]byte{0xee}, maxOptionLen))
	rc.expectOptReply(4242, nbdwire.RepErrUnsup)
	if size, _ := rc.goExport("disk", false); size != testSize {
		t.Fatalf("size %d", size)
	}
}

func TestUnsupportedOptionsThenGo(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	for _, opt := range []uint32{nbdwire.OptExtendedHeaders, 4, 12, 1 << 30} {
		rc.sendOption(opt, []byte("some data"))
		rc.expectOptReply(opt, nbdwire.RepErrUnsup)
	}
	// Known options with malformed data are invalid, not unsupported; TLS
	// is off, which is policy.
	for _, opt := range []uint32{nbdwire.OptStartTLS, nbdwire.OptListMetaContext, nbdwire.OptSetMetaContext} {
		rc.sendOption(opt, []byte("some data"))
		rc.expectOptReply(opt, nbdwire.RepErrInvalid)
	}
	rc.sendOption(nbdwire.OptStartTLS, nil)
	rc.expectOptReply(nbdwire.OptStartTLS, nbdwire.RepErrPolicy)
	rc.goExport("disk", true)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 4096, nil)
	if c := rc.readChunk(); c.typ != nbdwire.ReplyTypeOffsetData || c.flags != nbdwire.ReplyFlagDone || len(c.payload) != 8+4096 {
		t.Fatalf("chunk %+v", c.typ)
	}
}

func TestList(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)

	rc.sendOption(nbdwire.OptList, []byte{0})
	rc.expectOptReply(nbdwire.OptList, nbdwire.RepErrInvalid)

	rc.sendOption(nbdwire.OptList, nil)
	var got []string
	for {
		r := rc.readOptReply()
		if r.typ == nbdwire.RepAck {
			break
		}
		if r.typ != nbdwire.RepServer {
			t.Fatalf("reply type %#x", r.typ)
		}
		n := be.Uint32(r.data)
		got = append(got, string(r.data[4:4+n])+"|"+string(r.data[4+n:]))
	}
	want := []string{"disk|a writable disk", "ro|a read-only disk"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("list %q, want %q", got, want)
	}
	rc.goExport("ro", false)
}

func TestInfoReplies(t *testing.T) {
	e, disk, _ := twoExports(t)
	disk.preferred = 64 << 10
	srv := startServer(t, e, Options{MaxPayload: 1 << 20})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptInfo, infoRequest("disk", nbdwire.InfoName, nbdwire.InfoDescription, nbdwire.InfoBlockSize, 999))
	seen := map[uint16][]byte{}
	for {
		r := rc.readOptReply()
		if r.opt != nbdwire.OptInfo {
			t.Fatalf("reply for option %d", r.opt)
		}
		if r.typ == nbdwire.RepAck {
			break
		}
		if r.typ != nbdwire.RepInfo {
			t.Fatalf("reply type %#x %q", r.typ, r.data)
		}
		typ := be.Uint16(r.data)
		if seen[typ] != nil {
			t.Errorf("info %d sent twice", typ)
		}
		seen[typ] = r.data[2:]
	}
	if exp := seen[nbdwire.InfoExport]; len(exp) != 10 || be.Uint64(exp) != testSize || be.Uint16(exp[8:]) != transmissionFlags(allFlags, false) {
		t.Errorf("NBD_INFO_EXPORT % x", exp)
	}
	if string(seen[nbdwire.InfoName]) != "disk" || string(seen[nbdwire.InfoDescription]) != "a writable disk" {
		t.Errorf("name %q description %q", seen[nbdwire.InfoName], seen[nbdwire.InfoDescription])
	}
	bs := seen[nbdwire.InfoBlockSize]
	if len(bs) != 12 || be.Uint32(bs) != 1 || be.Uint32(bs[4:]) != 64<<10 || be.Uint32(bs[8:]) != 1<<20 {
		t.Errorf("NBD_INFO_BLOCK_SIZE % x", bs)
	}
	if len(seen) != 4 {
		t.Errorf("%d info types sent", len(seen))
	}
	if n := e.opens.Load(); n != 0 {
		t.Errorf("NBD_OPT_INFO opened the export %d times", n)
	}
	rc.goExport("disk", false)
	if got := srv.Connections(); got["disk"] != 1 || len(got) != 1 {
		t.Errorf("Connections %v", got)
	}
}

func TestInfoAndGoUnknownExport(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	for _, opt := range []uint32{nbdwire.OptInfo, nbdwire.OptGo} {
		rc.sendOption(opt, infoRequest("nope"))
		if r := rc.expectOptReply(opt, nbdwire.RepErrUnknown); !strings.Contains(string(r.data), "nope") {
			t.Errorf("message %q", r.data)
		}
	}
	rc.goExport("disk", false)
}

func TestInfoMalformed(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	long := strings.Repeat("x", nbdwire.MaxStringLen+1)
	cases := map[string][]byte{
		"too short":         {0, 0, 0},
		"name past the end": append(be.AppendUint32(nil, 100), "disk\x00\x00"...),
		"trailing byte":     append(infoRequest("disk", nbdwire.InfoName), 7),
		"name over 4096":    infoRequest(long),
	}
	// A count that promises two requests but carries one.
	bad := infoRequest("disk", nbdwire.InfoName)
	be.PutUint16(bad[4+4:], 2)
	cases["count too big"] = bad
	for name, data := range cases {
		for _, opt := range []uint32{nbdwire.OptInfo, nbdwire.OptGo} {
			rc.sendOption(opt, data)
			if r := rc.readOptReply(); r.opt != opt || r.typ != nbdwire.RepErrInvalid {
				t.Fatalf("%s: option %d reply type %#x %q", name, opt, r.typ, r.data)
			}
		}
	}
	if n := e.opens.Load(); n != 0 {
		t.Errorf("malformed NBD_OPT_GO opened the export %d times", n)
	}
	rc.goExport("disk", false)
}

func TestStructuredReplyWithDataIsInvalid(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptStructuredReply, []byte{1})
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepErrInvalid)
	// Not negotiated: READ gets a simple reply.
	_, flags := rc.goExport("disk", false)
	if flags&nbdwire.FlagSendDF != 0 {
		t.Error("SEND_DF advertised without structured replies")
	}
	rc.request(nbdwire.CmdRead, 0, 5, 0, 16, nil)
	if errno, _, data := rc.readSimple(16); errno != 0 || len(data) != 16 {
		t.Fatalf("read errno %d", errno)
	}
}

func TestExportName(t *testing.T) {
	e, disk, _ := twoExports(t)
	disk.fill([]byte("hello"))
	srv := startServer(t, e, Options{})
	for _, noZeroes := range []bool{true, false} {
		rc := dialRaw(t, srv.sock)
		flags := nbdwire.FlagCFixedNewstyle
		if noZeroes {
			flags |= nbdwire.FlagCNoZeroes
		}
		rc.handshake(flags)
		rc.sendOption(nbdwire.OptExportName, []byte("disk"))
		r := rc.read(10)
		if be.Uint64(r) != testSize || be.Uint16(r[8:]) != transmissionFlags(allFlags, false) {
			t.Fatalf("reply % x", r)
		}
		if !noZeroes {
			if z := rc.read(nbdwire.ExportNameZeroes); !bytes.Equal(z, make([]byte, nbdwire.ExportNameZeroes)) {
				t.Fatalf("padding % x", z)
			}
		}
		// Framing is right only if the padding was (not) sent as negotiated.
		rc.request(nbdwire.CmdRead, 0, 9, 0, 5, nil)
		if errno, handle, data := rc.readSimple(5); errno != 0 || handle != 9 || string(data) != "hello" {
			t.Fatalf("noZeroes=%v: read %d %d %q", noZeroes, errno, handle, data)
		}
	}
}

func TestExportNameUnknownDisconnects(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptExportName, []byte("nope"))
	rc.expectEOF()
	checkServes(t, srv.sock)
}

func TestAbort(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle)
	rc.sendOption(nbdwire.OptAbort, []byte("ignored"))
	rc.expectOptReply(nbdwire.OptAbort, nbdwire.RepAck)
	rc.expectEOF()
	if n := e.opens.Load(); n != 0 {
		t.Errorf("opens %d", n)
	}
}

func TestPlainNewstyleClient(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})

	// NBD_OPT_EXPORT_NAME works without fixed newstyle.
	rc := dialRaw(t, srv.sock)
	rc.handshake(0)
	rc.sendOption(nbdwire.OptExportName, []byte("disk"))
	rc.read(10 + nbdwire.ExportNameZeroes)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 1, nil)
	rc.readSimple(1)

	// Anything else gets no reply a plain client could parse: disconnect.
	rc = dialRaw(t, srv.sock)
	rc.handshake(0)
	rc.sendOption(nbdwire.OptList, nil)
	rc.expectEOF()
}

func TestTransmissionFlags(t *testing.T) {
	cases := []struct {
		flags      ExportFlags
		structured bool
		want       uint16
	}{
		{ExportFlags{}, false, nbdwire.FlagHasFlags},
		{ExportFlags{}, true, nbdwire.FlagHasFlags | nbdwire.FlagSendDF},
		{ExportFlags{ReadOnly: true}, false, nbdwire.FlagHasFlags | nbdwire.FlagReadOnly},
		{ExportFlags{FastZero: true}, false, nbdwire.FlagHasFlags}, // never FAST_ZERO without WRITE_ZEROES
		{allFlags, false, nbdwire.FlagHasFlags | nbdwire.FlagSendFlush | nbdwire.FlagSendFUA | nbdwire.FlagSendTrim | nbdwire.FlagSendWriteZeroes | nbdwire.FlagSendFastZero | nbdwire.FlagSendCache | nbdwire.FlagCanMultiConn},
		{ExportFlags{Cache: true, MultiConn: true}, false, nbdwire.FlagHasFlags | nbdwire.FlagSendCache | nbdwire.FlagCanMultiConn},
	}
	for _, c := range cases {
		if got := transmissionFlags(c.flags, c.structured); got != c.want {
			t.Errorf("%+v structured=%v: %#x, want %#x", c.flags, c.structured, got, c.want)
		}
	}
}

func TestPreferredBlockSize(t *testing.T) {
	cases := []struct {
		preferred uint32
		max       int
		want      uint32
	}{
		{0, 32 << 20, 4096},
		{1, 32 << 20, 512},
		{4096, 32 << 20, 4096},
		{5000, 32 << 20, 4096},
		{64 << 20, 32 << 20, 32 << 20},
		{1 << 31, 64 << 10, 64 << 10},
		{1 << 20, 100 << 10, 64 << 10},
	}
	for _, c := range cases {
		if got := preferredBlockSize(c.preferred, c.max); got != c.want {
			t.Errorf("preferredBlockSize(%d, %d) = %d, want %d", c.preferred, c.max, got, c.want)
		}
	}
}
