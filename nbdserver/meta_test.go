package nbdserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

const testHydrated = "x-test:hydrated"

// metaExports has "disk" offering two contexts, "plain" offering none.
func metaExports(t *testing.T) (*memExports, *memExport) {
	e, disk, _ := twoExports(t)
	disk.contexts = []string{ContextBaseAllocation, testHydrated}
	e.add("plain", "", newMemExport(testSize, allFlags))
	return e, disk
}

func metaRequest(export string, queries ...string) []byte {
	b := be.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = be.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

type metaReply struct {
	id   uint32
	name string
}

// metaOption sends a LIST or SET_META_CONTEXT and collects the
// NBD_REP_META_CONTEXT replies up to the ACK; an error reply is returned as
// its type.
func (rc *rawClient) metaOption(opt uint32, data []byte) ([]metaReply, uint32) {
	rc.t.Helper()
	rc.sendOption(opt, data)
	var got []metaReply
	for {
		r := rc.readOptReply()
		if r.opt != opt {
			rc.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		switch r.typ {
		case nbdwire.RepAck:
			return got, nbdwire.RepAck
		case nbdwire.RepMetaContext:
			got = append(got, metaReply{id: be.Uint32(r.data), name: string(r.data[4:])})
		default:
			if r.typ&(1<<31) == 0 {
				rc.t.Fatalf("reply type %#x", r.typ)
			}
			if len(got) != 0 {
				rc.t.Fatalf("error %#x after %d contexts", r.typ, len(got))
			}
			return nil, r.typ
		}
	}
}

func names(rs []metaReply) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.name)
	}
	return out
}

func TestListMetaContext(t *testing.T) {
	e, _ := metaExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)

	// Before structured replies: invalid.
	if _, typ := rc.metaOption(nbdwire.OptListMetaContext, metaRequest("disk")); typ != nbdwire.RepErrInvalid {
		t.Fatalf("LIST before structured replies: %#x", typ)
	}
	rc.sendOption(nbdwire.OptStructuredReply, nil)
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)

	for _, tc := range []struct {
		export  string
		queries []string
		want    []string
	}{
		{"disk", nil, []string{ContextBaseAllocation, testHydrated}},
		{"disk", []string{"base:"}, []string{ContextBaseAllocation}},
		{"disk", []string{"x-test:"}, []string{testHydrated}},
		{"disk", []string{"x-test:hydrated", "base:allocation", "base:allocation"}, []string{testHydrated, ContextBaseAllocation}},
		{"disk", []string{"qemu:dirty-bitmap:a", "base:nothing", "nbdclone:"}, nil},
		{"plain", nil, nil},
		{"plain", []string{"base:allocation"}, nil},
	} {
		got, typ := rc.metaOption(nbdwire.OptListMetaContext, metaRequest(tc.export, tc.queries...))
		if typ != nbdwire.RepAck || !slices.Equal(names(got), tc.want) {
			t.Errorf("LIST %s %q: %q (%#x), want %q", tc.export, tc.queries, names(got), typ, tc.want)
		}
		for _, r := range got {
			if r.id != 0 {
				t.Errorf("LIST reply with context ID %d, want the reserved 0", r.id)
			}
		}
	}
	if _, typ := rc.metaOption(nbdwire.OptListMetaContext, metaRequest("nope")); typ != nbdwire.RepErrUnknown {
		t.Errorf("LIST of an unknown export: %#x", typ)
	}
	rc.goExport("disk", true)
}

func TestMetaContextMalformed(t *testing.T) {
	e, _ := metaExports(t)
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptStructuredReply, nil)
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)

	good := metaRequest("disk", "base:allocation")
	countTooBig := metaRequest("disk", "base:allocation")
	be.PutUint32(countTooBig[8:], 2)
	hugeCount := metaRequest("disk")
	be.PutUint32(hugeCount[8:], 1<<31)
	queryPastEnd := metaRequest("disk", "base:allocation")
	be.PutUint32(queryPastEnd[12:], 1000)
	cases := map[string]struct {
		data []byte
		want uint32
	}{
		"too short":          {[]byte{0, 0, 0, 4, 'd'}, nbdwire.RepErrInvalid},
		"name past the end":  {append(be.AppendUint32(nil, 99), good[4:]...), nbdwire.RepErrInvalid},
		"name over 4096":     {metaRequest(strings.Repeat("n", nbdwire.MaxStringLen+1)), nbdwire.RepErrInvalid},
		"count too big":      {countTooBig, nbdwire.RepErrInvalid},
		"huge count":         {hugeCount, nbdwire.RepErrInvalid},
		"query past the end": {queryPastEnd, nbdwire.RepErrInvalid},
		"trailing byte":      {append(good[:len(good):len(good)], 0), nbdwire.RepErrInvalid},
		"query over 4096":    {metaRequest("disk", "base:"+strings.Repeat("a", nbdwire.MaxStringLen)), nbdwire.RepErrTooBig},
		"no namespace":       {metaRequest("disk", "allocation"), nbdwire.RepErrInvalid},
		"empty namespace":    {metaRequest("disk", ":allocation"), nbdwire.RepErrInvalid},
		"NUL in query":       {metaRequest("disk", "base:alloc\x00ation"), nbdwire.RepErrInvalid},
		"bad UTF-8":          {metaRequest("disk", "base:\xff"), nbdwire.RepErrInvalid},
	}
	for name, tc := range cases {
		for _, opt := range []uint32{nbdwire.OptListMetaContext, nbdwire.OptSetMetaContext} {
			if _, typ := rc.metaOption(opt, tc.data); typ != tc.want {
				t.Errorf("%s: option %d: reply %#x, want %#x", name, opt, typ, tc.want)
			}
		}
	}
	// A failed SET leaves nothing selected, even after a good one.
	if got, typ := rc.metaOption(nbdwire.OptSetMetaContext, good); typ != nbdwire.RepAck || len(got) != 1 {
		t.Fatalf("SET: %v %#x", got, typ)
	}
	rc.metaOption(nbdwire.OptSetMetaContext, metaRequest("disk", "nonamespace"))
	rc.goExport("disk", true)
	rc.request(nbdwire.CmdBlockStatus, 0, 1, 0, 4096, nil)
	if c := rc.readChunk(); c.typ != nbdwire.ReplyTypeError || chunkErrnoOf(c) != nbdwire.EINVAL {
		t.Fatalf("BLOCK_STATUS after a failed SET: chunk type %#x", c.typ)
	}
}

func chunkErrnoOf(c chunk) uint32 {
	errno, _ := chunkErrno(c)
	return errno
}

// blockStatus sends NBD_CMD_BLOCK_STATUS and reads its chunks: context ID
// → descriptors (length, flags) pairs. An error chunk is returned as its
// errno.
func (rc *rawClient) blockStatus(handle uint64, flags uint16, off uint64, length uint32) (map[uint32][][2]uint32, uint32) {
	rc.t.Helper()
	rc.request(nbdwire.CmdBlockStatus, flags, handle, off, length, nil)
	got := map[uint32][][2]uint32{}
	for {
		c := rc.readChunk()
		if c.handle != handle {
			rc.t.Fatalf("chunk for handle %d, want %d", c.handle, handle)
		}
		switch c.typ {
		case nbdwire.ReplyTypeBlockStatus:
			if len(c.payload) < 12 || (len(c.payload)-4)%8 != 0 {
				rc.t.Fatalf("block status chunk of %d bytes", len(c.payload))
			}
			id := be.Uint32(c.payload)
			if _, dup := got[id]; dup {
				rc.t.Fatalf("context %d described twice", id)
			}
			var descs [][2]uint32
			var sum uint64
			for p := c.payload[4:]; len(p) > 0; p = p[8:] {
				d := [2]uint32{be.Uint32(p), be.Uint32(p[4:])}
				if d[0] == 0 {
					rc.t.Fatalf("empty descriptor")
				}
				sum += uint64(d[0])
				descs = append(descs, d)
			}
			if sum > uint64(length) {
				rc.t.Fatalf("descriptors cover %d bytes of a %d-byte request", sum, length)
			}
			got[id] = descs
		case nbdwire.ReplyTypeError:
			if c.flags&nbdwire.ReplyFlagDone == 0 || len(got) != 0 {
				rc.t.Fatalf("error chunk flags %d after %d contexts", c.flags, len(got))
			}
			return nil, chunkErrnoOf(c)
		default:
			rc.t.Fatalf("chunk type %d", c.typ)
		}
		if c.flags&nbdwire.ReplyFlagDone != 0 {
			return got, 0
		}
	}
}

func TestBlockStatus(t *testing.T) {
	e, disk := metaExports(t)
	data := make([]byte, testSize)
	for i := 64 << 10; i < 192<<10; i++ {
		data[i] = 1
	}
	data[testSize-1] = 1
	disk.fill(data)
	disk.setExtents(func(metaContext string, off, n int64, maxExtents int) ([]Extent, error) {
		if metaContext == testHydrated {
			// Odd on purpose: empty, overlong and repeated extents, more
			// than asked for; the server must tidy them up.
			return []Extent{{Length: 0, Flags: 1}, {Length: 100, Flags: 1}, {Length: 28, Flags: 1}, {Length: 1 << 40, Flags: 0}, {Length: 5, Flags: 1}}, nil
		}
		return disk.zeroExtents(off, n, maxExtents), nil
	})
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptStructuredReply, nil)
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)
	sel, typ := rc.metaOption(nbdwire.OptSetMetaContext, metaRequest("disk", testHydrated, "base:allocation", "base:", "nope:x"))
	if typ != nbdwire.RepAck || !slices.Equal(names(sel), []string{testHydrated, ContextBaseAllocation}) {
		t.Fatalf("SET: %v %#x", sel, typ)
	}
	if sel[0].id == sel[1].id || sel[0].id == 0 || sel[1].id == 0 {
		t.Fatalf("context IDs %d and %d", sel[0].id, sel[1].id)
	}
	hydrated, alloc := sel[0].id, sel[1].id
	rc.goExport("disk", true)

	got, errno := rc.blockStatus(1, 0, 0, testSize)
	if errno != 0 {
		t.Fatalf("errno %d", errno)
	}
	const hz = StateHole | StateZero
	want := map[uint32][][2]uint32{
		alloc:    {{64 << 10, hz}, {128 << 10, 0}, {testSize - 192<<10 - 4096, hz}, {4096, 0}},
		hydrated: {{128, 1}, {testSize - 128, 0}},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("block status\n got %v\nwant %v", got, want)
	}

	// REQ_ONE: one descriptor per context, never past the request.
	got, errno = rc.blockStatus(2, nbdwire.CmdFlagReqOne, 60<<10, 8<<10)
	want = map[uint32][][2]uint32{alloc: {{4 << 10, hz}}, hydrated: {{128, 1}}}
	if errno != 0 || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("REQ_ONE: %v (errno %d), want %v", got, errno, want)
	}
	// An unaligned tail: the descriptors stop at the request's end.
	got, errno = rc.blockStatus(3, 0, testSize-10, 10)
	want = map[uint32][][2]uint32{alloc: {{10, 0}}, hydrated: {{10, 1}}}
	if errno != 0 || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("tail: %v (errno %d), want %v", got, errno, want)
	}

	// Errors: length 0, past the end, flags not valid for the command.
	for _, tc := range []struct {
		flags uint16
		off   uint64
		n     uint32
		errno uint32
	}{
		{0, 0, 0, nbdwire.EINVAL},
		{0, testSize, 1, nbdwire.EINVAL},
		{0, testSize - 1, 2, nbdwire.EINVAL},
		{0, 1 << 63, 1 << 31, nbdwire.EINVAL},
		{nbdwire.CmdFlagDF, 0, 512, nbdwire.EINVAL},
		{nbdwire.CmdFlagNoHole, 0, 512, nbdwire.EINVAL},
		{1 << 9, 0, 512, nbdwire.EINVAL},
	} {
		if _, errno := rc.blockStatus(4, tc.flags, tc.off, tc.n); errno != tc.errno {
			t.Errorf("flags %#x [%d,+%d): errno %d, want %d", tc.flags, tc.off, tc.n, errno, tc.errno)
		}
	}

	// An export error fails the whole request; the connection goes on.
	disk.setExtents(func(string, int64, int64, int) ([]Extent, error) {
		return nil, fmt.Errorf("mapping: %w", syscall.ENOSPC)
	})
	if _, errno := rc.blockStatus(5, 0, 0, 4096); errno != nbdwire.ENOSPC {
		t.Errorf("export error: errno %d", errno)
	}
	disk.setExtents(func(string, int64, int64, int) ([]Extent, error) { return nil, errors.New("anything") })
	if _, errno := rc.blockStatus(6, 0, 0, 4096); errno != nbdwire.EIO {
		t.Errorf("export error: errno %d", errno)
	}
	// Nothing usable: the whole range with status 0, always true.
	disk.setExtents(func(string, int64, int64, int) ([]Extent, error) { return []Extent{{Length: -5, Flags: 3}}, nil })
	got, errno = rc.blockStatus(7, 0, 4096, 8192)
	want = map[uint32][][2]uint32{alloc: {{8192, 0}}, hydrated: {{8192, 0}}}
	if errno != 0 || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("no usable extent: %v (errno %d), want %v", got, errno, want)
	}
	rc.request(nbdwire.CmdDisc, 0, 8, 0, 0, nil)
	rc.expectEOF()
}

// TestBlockStatusLimits: a 4 GiB - 1 request on a larger export is
// described in 32-bit lengths with at most maxExtentsPerContext descriptors.
func TestBlockStatusLimits(t *testing.T) {
	e := newMemExports(t)
	// A big export without a big buffer: Size is what the server checks.
	big := e.add("big", "", newMemExport(testSize, allFlags))
	big.contexts = []string{ContextBaseAllocation}
	var mu sync.Mutex
	var asked []int
	big.setExtents(func(_ string, off, n int64, maxExtents int) ([]Extent, error) {
		mu.Lock()
		asked = append(asked, maxExtents)
		mu.Unlock()
		// Alternating 512-byte extents: far more than a reply may carry.
		out := make([]Extent, 0, maxExtents+10)
		for i := range maxExtents + 10 {
			out = append(out, Extent{Length: 512, Flags: uint32(i % 2)})
		}
		return out, nil
	})
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptStructuredReply, nil)
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)
	if _, typ := rc.metaOption(nbdwire.OptSetMetaContext, metaRequest("big", ContextBaseAllocation)); typ != nbdwire.RepAck {
		t.Fatal(typ)
	}
	rc.goExport("big", true)
	got, errno := rc.blockStatus(1, 0, 0, 1<<20)
	if errno != 0 || len(got[1]) != min(maxExtentsPerContext, 1<<20/512) {
		t.Fatalf("errno %d, %d descriptors", errno, len(got[1]))
	}
	mu.Lock()
	defer mu.Unlock()
	if len(asked) != 1 || asked[0] != maxExtentsPerContext {
		t.Errorf("export asked for %v extents", asked)
	}
}

// TestMetaContextsFollowTheExport: contexts selected for one export do not
// apply to another; an export without contexts has none to select.
func TestMetaContextsFollowTheExport(t *testing.T) {
	e, disk := metaExports(t)
	e.add("other", "", newMemExport(testSize, allFlags)).contexts = disk.contexts
	srv := startServer(t, e, Options{})
	for _, tc := range []struct {
		name   string
		setFor string
		goTo   string
		works  bool
	}{
		{"same export", "disk", "disk", true},
		{"other export", "disk", "other", false},
		{"export without contexts", "plain", "plain", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := dialRaw(t, srv.sock)
			rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
			rc.sendOption(nbdwire.OptStructuredReply, nil)
			rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)
			rc.metaOption(nbdwire.OptSetMetaContext, metaRequest(tc.setFor, ContextBaseAllocation))
			rc.goExport(tc.goTo, true)
			_, errno := rc.blockStatus(1, 0, 0, 4096)
			if (errno == 0) != tc.works {
				t.Errorf("BLOCK_STATUS errno %d, want success %v", errno, tc.works)
			}
		})
	}
	// Without structured replies there is no BLOCK_STATUS at all.
	rc := connect(t, srv.sock, "disk", false)
	rc.request(nbdwire.CmdBlockStatus, 0, 1, 0, 4096, nil)
	rc.expectSimple(1, nbdwire.EINVAL)
}

// TestBlockStatusContext: the export gets the connection's context.
func TestBlockStatusContext(t *testing.T) {
	e, disk := metaExports(t)
	seen := make(chan context.Context, 1)
	disk.setExtents(func(string, int64, int64, int) ([]Extent, error) { return []Extent{{Length: 1}}, nil })
	disk.hook = func(ctx context.Context, op string, _, _ int64) error {
		if op == "extents" {
			select {
			case seen <- ctx:
			default:
			}
		}
		return nil
	}
	srv := startServer(t, e, Options{})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptStructuredReply, nil)
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)
	rc.metaOption(nbdwire.OptSetMetaContext, metaRequest("disk", ContextBaseAllocation))
	rc.goExport("disk", true)
	if got, errno := rc.blockStatus(1, 0, 0, 4096); errno != 0 || fmt.Sprint(got[1]) != "[[1 0]]" {
		t.Fatalf("%v %d", got, errno)
	}
	ctx := <-seen
	rc.nc.Close()
	<-ctx.Done() // cancelled when the connection closes; a hang fails by timeout
}
