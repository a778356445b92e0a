package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// nbdMapEntry is one extent of `nbdinfo --map --json`.
type nbdMapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   uint32 `json:"type"`
}

func nbdinfoMap(t testing.TB, metaContext, uri string) []nbdMapEntry {
	t.Helper()
	out := run(t, "nbdinfo", "--map="+metaContext, "--json", uri)
	var m []nbdMapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map=%s --json: %v\n%s", metaContext, err, out)
	}
	var at int64
	for _, e := range m {
		if e.Offset != at || e.Length <= 0 {
			t.Fatalf("nbdinfo --map=%s: extents do not tile the export at %d: %v", metaContext, at, m)
		}
		at += e.Length
	}
	return m
}

// typeAt is the status of the extent holding off.
func typeAt(m []nbdMapEntry, off int64) uint32 {
	for _, e := range m {
		if off >= e.Offset && off < e.Offset+e.Length {
			return e.Type
		}
	}
	return 1 << 31
}

// hydratedRuns turns a set of hydrated regions into the map
// nbdclone:hydrated must show: runs of 1 (hydrated) and 0.
func hydratedRuns(hydrated map[int64]bool, regions, regionSize, size int64) []nbdMapEntry {
	var m []nbdMapEntry
	for r := range regions {
		typ := uint32(0)
		if hydrated[r] {
			typ = 1
		}
		length := min(regionSize, size-r*regionSize)
		if k := len(m); k > 0 && m[k-1].Type == typ {
			m[k-1].Length += length
			continue
		}
		m = append(m, nbdMapEntry{Offset: r * regionSize, Length: length, Type: typ})
	}
	return m
}

// TestProtoMaps: on a partly hydrated clone of a sparse source, `nbdinfo
// --map=nbdclone:hydrated` shows exactly the regions hydrated (the JSON
// status agrees), `nbdinfo --map` (base:allocation) and `qemu-img map`
// show the source's holes where regions are unhydrated and the
// destination's where they are hydrated, and everything described as zero
// reads as zeroes. After full hydration and after the swap to linear, the
// maps follow.
func TestProtoMaps(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "nbdcopy")
	sh := nbdshell(t)
	d := harness.Serve(t)
	const (
		K    = 1 << 10
		M    = 1 << 20
		R    = 64 * K
		size = 8*M + 4*K // 129 regions, the last one partial
	)
	// A sparse source: data in [0, 1M) and [4M, 4M+256K), holes elsewhere.
	src := make([]byte, size)
	copy(src, randomBytes(21, M))
	copy(src[4*M:], randomBytes(22, 256*K))
	f, err := os.Create(filepath.Join(d.Dir, "src.img"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.WriteAt(src[:M], 0)
	f.WriteAt(src[4*M:4*M+256*K], 4*M)
	f.Close()
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img %d 1 no_hydration", size/sector, R/sector))
	uri := d.URI("c")

	// Nothing hydrated yet.
	if got, want := nbdinfoMap(t, "nbdclone:hydrated", uri), []nbdMapEntry{{0, size, 0}}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("fresh clone, hydrated map %v, want %v", got, want)
	}
	alloc := nbdinfoMap(t, "base:allocation", uri)
	wantAlloc := []nbdMapEntry{{0, M, 0}, {M, 3 * M, 3}, {4 * M, 256 * K, 0}, {4*M + 256*K, size - 4*M - 256*K, 3}}
	if fmt.Sprint(alloc) != fmt.Sprint(wantAlloc) {
		t.Fatalf("fresh clone, allocation %v, want the source's %v", alloc, wantAlloc)
	}

	// Hydrate some regions, each in its own way.
	img := bytes.Clone(src)
	hydrated := map[int64]bool{}
	writeAndCheck(t, uri, img,
		imageWrite{off: 20 * R, n: R, fill: 0x11},          // overwrite a whole region of a hole
		imageWrite{off: 40*R + 100, n: 10, fill: 0x12},     // partial write: copy, then write
		imageWrite{off: 5*R + 7, n: 2 * R, fill: 0x13},     // source data, regions 5-7 copied
		imageWrite{off: 80 * R, n: 2 * R, zero: true},      // write zeroes of whole regions
		imageWrite{off: 128 * R, n: size - 128*R, fill: 9}, // the partial tail region, whole
	)
	for _, r := range []int64{20, 40, 5, 6, 7, 80, 81, 128} {
		hydrated[r] = true
	}
	qemuIO(t, uri, fmt.Sprintf("discard %d %d", 64*R, 4*R)) // regions 64-67: the source's data there
	clear(img[64*R : 68*R])                                 // punched on the destination: zeroes
	for r := int64(64); r < 68; r++ {
		hydrated[r] = true
	}
	run(t, sh[0], append(sh[1:], "-u", uri, "-c", fmt.Sprintf("h.cache(%d, %d)", R, 100*R))...) // a hole, copied
	hydrated[100] = true

	info := cloneInfo(t, d, "c")
	if info.HydratedRegions != uint64(len(hydrated)) || info.Regions != 129 {
		t.Fatalf("JSON status: %d/%d hydrated, want %d/129", info.HydratedRegions, info.Regions, len(hydrated))
	}
	wantHydrated := hydratedRuns(hydrated, 129, R, size)
	if got := nbdinfoMap(t, "nbdclone:hydrated", uri); fmt.Sprint(got) != fmt.Sprint(wantHydrated) {
		t.Errorf("hydrated map\n got %v\nwant %v", got, wantHydrated)
	}

	alloc = nbdinfoMap(t, "base:allocation", uri)
	// Unhydrated: the source's holes and data. Hydrated: the destination's,
	// written (data) or punched (zero).
	for off, want := range map[int64]uint32{
		0: 0, M - 1: 0, // source data
		M: 3, 20*R - 1: 3, 21 * R: 3, 40*R - 1: 3, 4*M - 1: 3, // source holes
		20 * R: 0, 21*R - 1: 0, 40*R + 100: 0, 5 * R: 0, 128 * R: 0, size - 1: 0, // written
		64 * R: 3, 68*R - 1: 3, // discarded, punched
		68 * R: 3,             // the source hole after its data
		99 * R: 3, 101 * R: 3, // around the cached hole
	} {
		if got := typeAt(alloc, off); got != want {
			t.Errorf("allocation at %d (region %d): type %d, want %d\n%v", off, off/R, got, want, alloc)
		}
	}

	// qemu-img agrees: zero exactly where nbdinfo said so. (Before anything
	// reads the image: on ext4, reading a zeroed range that is an unwritten
	// extent puts pages in the page cache, and SEEK_DATA calls those data
	// from then on.)
	var qm []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Zero   bool  `json:"zero"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", "-f", "raw", uri)), &qm); err != nil {
		t.Fatal(err)
	}
	var covered int64
	for _, q := range qm {
		if q.Start != covered {
			t.Fatalf("qemu-img map: gap at %d", covered)
		}
		covered += q.Length
		for _, off := range []int64{q.Start, q.Start + q.Length - 1} {
			if typ := typeAt(alloc, off); q.Zero != (typ&2 != 0) || q.Data != (typ&1 == 0) {
				t.Errorf("qemu-img map at %d: zero=%v data=%v; nbdinfo type %d\nqemu-img: %+v\nnbdinfo: %v", off, q.Zero, q.Data, typ, qm, alloc)
			}
		}
	}
	if covered != size {
		t.Errorf("qemu-img map covers %d of %d bytes", covered, size)
	}

	// What is described as zero reads as zero; the copy is the image.
	out := filepath.Join(d.Dir, "out.img")
	run(t, "nbdcopy", "--connections=4", "--requests=64", uri, out)
	got := readFile(t, out)
	if diff := firstDiff(got, img); diff != "" {
		t.Fatalf("clone contents: %s", diff)
	}
	for _, e := range alloc {
		if e.Type&2 != 0 && !bytes.Equal(got[e.Offset:e.Offset+e.Length], make([]byte, e.Length)) {
			t.Errorf("extent %+v is described as zero but does not read as zeroes", e)
		}
	}

	// Fully hydrated: one hydrated extent. Then linear: the same, and the
	// destination's allocation.
	cli(t, d, "message", "c", "0", "hydration_threshold", "64")
	cli(t, d, "message", "c", "0", "enable_hydration")
	cli(t, d, "wait", "c")
	full := []nbdMapEntry{{0, size, 1}}
	if got := nbdinfoMap(t, "nbdclone:hydrated", uri); fmt.Sprint(got) != fmt.Sprint(full) {
		t.Errorf("hydrated clone: hydrated map %v", got)
	}
	cli(t, d, "suspend", "c")
	cli(t, d, "load", "c", "--table", fmt.Sprintf("0 %d linear ./dest.img 0", size/sector))
	cli(t, d, "resume", "c")
	if got := nbdinfoMap(t, "nbdclone:hydrated", uri); fmt.Sprint(got) != fmt.Sprint(full) {
		t.Errorf("linear: hydrated map %v", got)
	}
	alloc = nbdinfoMap(t, "base:allocation", uri)
	for off, want := range map[int64]uint32{0: 0, 20 * R: 0, 64 * R: 3, size - 1: 0} {
		if got := typeAt(alloc, off); got != want {
			t.Errorf("linear: allocation at %d: type %d, want %d\n%v", off, got, want, alloc)
		}
	}
	run(t, "nbdcopy", uri, out)
	if diff := firstDiff(readFile(t, out), img); diff != "" {
		t.Fatalf("linear contents: %s", diff)
	}
	if strings.Contains(d.Log(), "level=ERROR") {
		t.Errorf("errors in the daemon log:\n%s", d.Log())
	}
}
