package e2e

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// Spliced READ replies (nbdserver/splice.go): a READ of at least 128 KiB
// on a plain socket that the live target serves from one local file goes
// file → pipe → socket. These tests read whole exports with real clients
// and check the bytes against images they build themselves, and
// nbdclone_io_read_spliced_bytes_total against what must (or must not)
// have been spliced.

// spliceChunk is nbdcopy's default request size: every READ it sends is
// one 256 KiB aligned chunk (the tests' sizes are multiples of it), at or
// above the server's 128 KiB splice threshold.
const spliceChunk = 256 << 10

// spliceDaemon is serveWithMetrics with a second NBD listener on TCP
// loopback; it returns the daemon, the metrics URL and the TCP HOST:PORT.
func spliceDaemon(t *testing.T) (*harness.Daemon, string, string) {
	t.Helper()
	d, url := serveWithMetrics(t, "--listen", "tcp:127.0.0.1:0")
	return d, url, fromLog(t, d, `\btcp:(127\.0\.0\.1:\d+)\b`, "the TCP listener's address")
}

// readCounters are a device's read (and write) counters at one scrape.
type readCounters struct{ spliced, read, requests, sourceReads, written, writeSpliced float64 }

func scrapeReads(t testing.TB, url, dev string) readCounters {
	t.Helper()
	s := scrapeMetrics(t, url)
	return readCounters{
		spliced:      s.get(t, "nbdclone_io_read_spliced_bytes_total", "device="+dev),
		read:         s.get(t, "nbdclone_io_bytes_total", "device="+dev, "op=read"),
		requests:     s.get(t, "nbdclone_io_requests_total", "device="+dev, "op=read"),
		sourceReads:  s.get(t, "nbdclone_source_read_duration_seconds_count", "device="+dev, "reason=read"),
		written:      s.get(t, "nbdclone_io_bytes_total", "device="+dev, "op=write"),
		writeSpliced: s.get(t, "nbdclone_io_write_spliced_bytes_total", "device="+dev),
	}
}

func (c readCounters) sub(o readCounters) readCounters {
	return readCounters{c.spliced - o.spliced, c.read - o.read, c.requests - o.requests, c.sourceReads - o.sourceReads,
		c.written - o.written, c.writeSpliced - o.writeSpliced}
}

// copyExport reads a whole export with nbdcopy (extra options first) into
// a file, checks it equals want byte for byte, and returns how the
// device's read counters moved meanwhile.
func copyExport(t *testing.T, url, dev, uri string, want []byte, extra ...string) readCounters {
	t.Helper()
	out := filepath.Join(t.TempDir(), "copy.img")
	before := scrapeReads(t, url, dev)
	run(t, "nbdcopy", append(extra, uri, out)...)
	delta := scrapeReads(t, url, dev).sub(before)
	if diff := firstDiff(readFile(t, out), want); diff != "" {
		t.Fatalf("nbdcopy %s %s: the copy differs from the expected image: %s", strings.Join(extra, " "), uri, diff)
	}
	t.Logf("nbdcopy %s %s: %v bytes read, %v spliced", strings.Join(extra, " "), uri, delta.read, delta.spliced)
	if delta.spliced > delta.read {
		t.Errorf("nbdcopy %s: %v bytes spliced but only %v read (spliced bytes count as reads too)", uri, delta.spliced, delta.read)
	}
	return delta
}

// TestSpliceHydratedClone reads a fully hydrated clone (every READ served
// by the destination file) with nbdcopy over the unix socket and over TCP
// on 127.0.0.1: the copies equal the source, and most of the bytes went
// through splice.
func TestSpliceHydratedClone(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	d, url, tcp := spliceDaemon(t)
	const size = 64 << 20
	src := makeSource(t, d.Dir, 41, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 128", size/sector))
	cli(t, d, "wait", "c")
	if st := status(t, d, "c"); st.Hydrated != st.Regions {
		t.Fatalf("wait returned at %d/%d regions", st.Hydrated, st.Regions)
	}
	for _, uri := range []string{d.URI("c"), "nbd://" + tcp + "/c"} {
		delta := copyExport(t, url, "c", uri, src)
		if delta.read < size {
			t.Errorf("%s: %v bytes read, want at least the export's %d", uri, delta.read, size)
		}
		if delta.spliced <= size/2 {
			t.Errorf("%s: %v bytes spliced, want more than half of the %d read in %d KiB requests", uri, delta.spliced, size, spliceChunk>>10)
		}
		if delta.sourceReads != 0 {
			t.Errorf("%s: %v source reads from a fully hydrated clone", uri, delta.sourceReads)
		}
	}
}

// TestSpliceLargeReads reads a hydrated clone in requests larger than a
// pipe: nbdcopy in 4 MiB requests and qemu-img convert (2 MiB): each READ
// is spliced in pieces of a pipe each, and the copies equal the source.
func TestSpliceLargeReads(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	testutil.NeedTool(t, "qemu-img")
	d, url, _ := spliceDaemon(t)
	const size = 64 << 20
	src := makeSource(t, d.Dir, 46, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 128", size/sector))
	cli(t, d, "wait", "c")
	delta := copyExport(t, url, "c", d.URI("c"), src, "--request-size=4194304")
	if delta.spliced < size {
		t.Errorf("nbdcopy in 4 MiB requests: %v bytes spliced, want all %d", delta.spliced, size)
	}
	if delta.requests != size/(4<<20) {
		t.Errorf("nbdcopy in 4 MiB requests: %v reads counted, want one per request (%d), not one per piece", delta.requests, size/(4<<20))
	}
	out := filepath.Join(t.TempDir(), "convert.img")
	before := scrapeReads(t, url, "c")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", d.URI("c"), out)
	delta = scrapeReads(t, url, "c").sub(before)
	if diff := firstDiff(readFile(t, out), src); diff != "" {
		t.Fatalf("qemu-img convert: the copy differs from the source: %s", diff)
	}
	t.Logf("qemu-img convert: %v bytes read, %v spliced", delta.read, delta.spliced)
	if delta.spliced <= size/2 {
		t.Errorf("qemu-img convert: %v bytes spliced, want more than half of the %d read in 2 MiB requests", delta.spliced, size)
	}
}

// TestSpliceWrites writes clones with nbdcopy (256 KiB WRITEs): over TCP
// on 127.0.0.1, a hydrated clone takes every payload spliced from the
// socket into its destination; over the unix socket none is spliced (a
// unix socket's buffers would be copied into the pipe anyway); an
// unhydrated clone (no_hydration) takes its first pass of writes through
// buffers (each region is hydrated by its write) and the second spliced.
// Every image read back equals what was written.
func TestSpliceWrites(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	d, url, tcp := spliceDaemon(t)
	const size = 64 << 20
	makeSource(t, d.Dir, 47, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest2.img"), size)
	cli(t, d, "create", "h", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 128", size/sector))
	cli(t, d, "wait", "h")
	cli(t, d, "create", "u", "--table", fmt.Sprintf("0 %d clone ./md2 ./dest2.img ./src.img 8 1 no_hydration", size/sector))
	for i, c := range []struct {
		dev, uri string
		spliced  bool
	}{
		{"h", "nbd://" + tcp + "/h", true},
		{"h", d.URI("h"), false},
		{"u", "nbd://" + tcp + "/u", false},
		{"u", "nbd://" + tcp + "/u", true},
	} {
		img := randomBytes(uint64(60+i), size)
		in := filepath.Join(t.TempDir(), "in.img")
		writeFile(t, in, img)
		before := scrapeReads(t, url, c.dev)
		run(t, "nbdcopy", in, c.uri)
		delta := scrapeReads(t, url, c.dev).sub(before)
		t.Logf("nbdcopy to %s: %v bytes written, %v spliced", c.uri, delta.written, delta.writeSpliced)
		if delta.written < size {
			t.Errorf("nbdcopy to %s: %v bytes written, want at least %d", c.uri, delta.written, size)
		}
		if c.spliced && delta.writeSpliced < size {
			t.Errorf("nbdcopy to %s: %v bytes spliced, want all %d", c.uri, delta.writeSpliced, size)
		}
		if !c.spliced && delta.writeSpliced != 0 {
			t.Errorf("nbdcopy to %s: %v bytes spliced, want none", c.uri, delta.writeSpliced)
		}
		copyExport(t, url, c.dev, d.URI(c.dev), img) // read back: the bytes written
	}
}

// TestSpliceUnhydratedSource reads a clone that hydrates nothing
// (no_hydration): every READ is served by the source file, spliced, and
// the copy equals the source.
func TestSpliceUnhydratedSource(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	d, url, _ := spliceDaemon(t)
	const size = 64 << 20
	src := makeSource(t, d.Dir, 42, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 8 1 no_hydration", size/sector))
	srcBefore := cloneInfo(t, d, "c").Stats.SourceReadBytes
	delta := copyExport(t, url, "c", d.URI("c"), src)
	if got := cloneInfo(t, d, "c").Stats.SourceReadBytes - srcBefore; got < size {
		t.Errorf("source_read_bytes grew by %d, want at least %d: the reads did not come from the source", got, size)
	}
	if delta.read < size {
		t.Errorf("%v bytes read, want at least the export's %d", delta.read, size)
	}
	if delta.spliced <= size/2 {
		t.Errorf("%v bytes spliced, want more than half of the %d read", delta.spliced, size)
	}
	if delta.sourceReads == 0 {
		t.Error("no source read counted: the reads did not come from the source")
	}
	if st := status(t, d, "c"); st.Hydrated != 0 {
		t.Errorf("%d regions hydrated with no_hydration and only reads", st.Hydrated)
	}
}

// TestSpliceHolesNotSpliced serves a sparse source (data in its first and
// last MiB, a 62 MiB hole between) through a no_hydration clone. nbdcopy
// --no-extents READs every byte, with structured replies: the copy is
// right (zeros in the hole), and the READs inside the hole were answered
// from a buffer (so that the reply can describe the hole), never spliced:
// at most the 2 MiB of data were. nbdsh then shows the other side: with
// structured replies the hole comes back as hole chunks; without them, or
// with DF, the hole's zeros are spliced like data, and read back right.
func TestSpliceHolesNotSpliced(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	d, url, _ := spliceDaemon(t)
	const size = 64 << 20
	const dataLen = 1 << 20
	const hole = size - 2*dataLen
	want := make([]byte, size)
	head, tail := randomBytes(43, dataLen), randomBytes(44, dataLen)
	copy(want, head)
	copy(want[size-dataLen:], tail)
	f, err := os.Create(filepath.Join(d.Dir, "src.img"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(head, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(tail, size-dataLen); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	var fi syscall.Stat_t
	if err := syscall.Stat(filepath.Join(d.Dir, "src.img"), &fi); err != nil {
		t.Fatal(err)
	}
	if allocated := fi.Blocks * 512; allocated > 4*dataLen {
		t.Fatalf("the source has %d bytes allocated: the filesystem did not keep the hole", allocated)
	}
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 8 1 no_hydration", size/sector))

	delta := copyExport(t, url, "c", d.URI("c"), want, "--no-extents")
	if delta.read < size {
		t.Errorf("%v bytes read, want at least %d: nbdcopy --no-extents skipped part of the hole", delta.read, size)
	}
	if delta.spliced > size-hole {
		t.Errorf("%v bytes spliced with structured replies, want at most the %d bytes of data: READs inside the %d-byte hole were spliced", delta.spliced, size-hole, hole)
	}
	if delta.spliced == 0 {
		t.Error("nothing spliced: the READs of the data were not spliced either")
	}

	// nbdsh reads the export whole in 256 KiB READs three ways and prints
	// what it negotiated, the chunks it got and the sha256 of the bytes.
	// With structured replies (no DF) the hole comes back in hole chunks,
	// not spliced; without structured replies, or with DF, a hole cannot
	// be described, and its zeros are spliced like data.
	sh := nbdshell(t)
	for _, c := range []struct {
		name       string
		structured bool
		flags      string
		allSpliced bool // else at most the data
	}{
		{"simple replies", false, "0", true},
		{"structured replies", true, "0", false},
		{"structured replies and DF", true, "nbd.CMD_FLAG_DF", true},
	} {
		script := fmt.Sprintf(`
import hashlib, nbd
structured = %s
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(%q)
s = hashlib.sha256()
kinds = {nbd.READ_DATA: 0, nbd.READ_HOLE: 0, nbd.READ_ERROR: 0}
def chunk(subbuf, offset, status, err):
    kinds[status] += 1
    return 0
for off in range(0, %d, %d):
    if structured:
        s.update(h.pread_structured(%d, off, chunk, flags=%s))
    else:
        s.update(h.pread(%d, off))
print(h.get_structured_replies_negotiated(), kinds[nbd.READ_DATA], kinds[nbd.READ_HOLE], s.hexdigest())
h.shutdown()
`, map[bool]string{true: "True", false: "False"}[c.structured], d.URI("c"), size, spliceChunk, spliceChunk, c.flags, spliceChunk)
		before := scrapeReads(t, url, "c")
		out := run(t, sh[0], append(sh[1:], "-c", script)...)
		after := scrapeReads(t, url, "c").sub(before)
		var negotiated string
		var dataChunks, holeChunks int
		var sum string
		if _, err := fmt.Sscan(out, &negotiated, &dataChunks, &holeChunks, &sum); err != nil {
			t.Fatalf("%s: nbdsh printed %q: %v", c.name, out, err)
		}
		t.Logf("nbdsh, %s: %v bytes read, %v spliced; %d data chunks, %d hole chunks", c.name, after.read, after.spliced, dataChunks, holeChunks)
		if want := map[bool]string{true: "True", false: "False"}[c.structured]; negotiated != want {
			t.Fatalf("%s: structured replies negotiated %s, want %s", c.name, negotiated, want)
		}
		if w := fmt.Sprintf("%x", sha256.Sum256(want)); sum != w {
			t.Errorf("%s: read sha256 %s, want %s", c.name, sum, w)
		}
		if after.read != size {
			t.Errorf("%s: %v bytes read, want %d", c.name, after.read, size)
		}
		switch {
		case c.allSpliced && after.spliced != size:
			// One READ at a time: a pipe is always free, and every READ
			// is served from the source file alone.
			t.Errorf("%s: %v bytes spliced, want all %d (the hole too)", c.name, after.spliced, size)
		case !c.allSpliced && after.spliced > size-hole:
			t.Errorf("%s: %v bytes spliced, want at most the %d bytes of data", c.name, after.spliced, size-hole)
		}
		switch {
		case c.structured && c.flags != "0" && (holeChunks != 0 || dataChunks != size/spliceChunk):
			t.Errorf("%s: %d data and %d hole chunks, want one data chunk per READ (%d)", c.name, dataChunks, holeChunks, size/spliceChunk)
		case c.structured && c.flags == "0" && holeChunks < hole/spliceChunk:
			t.Errorf("%s: %d hole chunks, want at least one per READ inside the hole (%d)", c.name, holeChunks, hole/spliceChunk)
		}
	}
}

// TestSpliceMixedHydration reads a clone with 4 KiB regions, some of them
// hydrated by writes, whole: every READ is spliced, those across hydrated
// and unhydrated regions run by run from the destination and the source
// file in turn, and the copy equals the expected image, byte for byte.
func TestSpliceMixedHydration(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	d, url, tcp := spliceDaemon(t)
	const size = 64 << 20
	img := makeSource(t, d.Dir, 45, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 8 1 no_hydration", size/sector))

	var writes []imageWrite
	mixed := map[int64]bool{} // 256 KiB chunks holding both kinds of region
	for off := int64(0); off < size; off += 3 << 20 {
		// 100 bytes inside a region: the region is copied, then written.
		w := imageWrite{off: off + 300000, n: 100, fill: byte(0x40 + off>>20)}
		writes = append(writes, w)
		mixed[w.off/spliceChunk] = true
	}
	writes = append(writes,
		imageWrite{off: 8 << 20, n: spliceChunk, fill: 0x22},            // one whole chunk hydrated: spliced from the destination
		imageWrite{off: 20<<20 + 4096, n: 64 << 10, zero: true},         // zeroed regions inside a chunk
		imageWrite{off: 40<<20 + spliceChunk - 8192, n: 16384, fill: 7}, // regions across a chunk boundary
	)
	mixed[(20<<20+4096)/spliceChunk] = true
	mixed[(40<<20)/spliceChunk] = true
	mixed[(40<<20)/spliceChunk+1] = true
	writeAndCheck(t, d.URI("c"), img, writes...)
	st := status(t, d, "c")
	if st.Hydrated == 0 || st.Hydrated == st.Regions {
		t.Fatalf("%d/%d regions hydrated, want some", st.Hydrated, st.Regions)
	}
	writeFile(t, filepath.Join(d.Dir, "want.img"), img)

	for _, c := range []struct {
		uri   string
		extra []string
	}{
		{d.URI("c"), []string{"--no-extents"}},
		{"nbd://" + tcp + "/c", []string{"--no-extents"}},
		{d.URI("c"), nil},
	} {
		delta := copyExport(t, url, "c", c.uri, img, c.extra...)
		if delta.read < size {
			t.Errorf("%s: %v bytes read, want at least %d", c.uri, delta.read, size)
		}
		if delta.spliced < size {
			t.Errorf("%s %v: %v bytes spliced, want all %d, the %d chunks with both hydrated and unhydrated regions too", c.uri, c.extra, delta.spliced, size, len(mixed))
		}
	}
	// qemu-img reads with its own request sizes.
	compareImage(t, d.URI("c"), filepath.Join(d.Dir, "want.img"))
	if got := status(t, d, "c").Hydrated; got != st.Hydrated {
		t.Errorf("reads hydrated regions: %d, then %d", st.Hydrated, got)
	}
}

// TestSpliceFamily reads a child clone whose source is another device
// (dev:p, no_hydration) whose regions are all hydrated: each READ of the
// child is spliced from the parent's destination file, through the
// parent's target, and the copy equals the parent.
func TestSpliceFamily(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	d, url, _ := spliceDaemon(t)
	const size = 64 << 20
	src := makeSource(t, d.Dir, 44, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "p.dst"), size)
	harness.MakeImage(t, filepath.Join(d.Dir, "c.dst"), size)
	cli(t, d, "create", "p", "--table", fmt.Sprintf("0 %d clone ./p.md ./p.dst ./src.img 128", size/sector))
	cli(t, d, "wait", "p")
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./c.md ./c.dst dev:p 8 1 no_hydration", size/sector))
	delta := copyExport(t, url, "c", d.URI("c"), src)
	if delta.spliced <= size/2 {
		t.Errorf("%v bytes spliced from the child, want more than half of the %d read", delta.spliced, size)
	}
	if st := status(t, d, "c"); st.Hydrated != 0 {
		t.Errorf("%d regions of the child hydrated with no_hydration and only reads", st.Hydrated)
	}
}
