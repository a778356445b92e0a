package e2e

import (
	"bytes"
	"fmt"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
	"github.com/nbdclone/nbdclone/target"
)

// TestCopyUnhydratedEqualsSource: a clone that hydrates nothing reads as its
// source, byte for byte, through nbdcopy's parallel reads over several
// connections, and reading copies nothing: no region becomes hydrated and
// nothing is written to the destination.
func TestCopyUnhydratedEqualsSource(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	testutil.NeedTool(t, "qemu-img")
	d := harness.Serve(t)
	const size = 64 << 20
	makeSource(t, d.Dir, 4, size)
	srcPath := filepath.Join(d.Dir, "src.img")
	destPath := filepath.Join(d.Dir, "dest.img")
	harness.MakeImage(t, destPath, size)
	srcSum := sha256File(t, srcPath)
	cli(t, d, "create", "clone", "--table", "0 131072 clone ./md ./dest.img ./src.img 8 1 no_hydration")

	out := filepath.Join(d.Dir, "out.img")
	run(t, "nbdcopy", "--connections=4", "--requests=16", d.URI("clone"), out)
	if got := sha256File(t, out); got != srcSum {
		t.Errorf("nbdcopy of the unhydrated clone: sha256 %s, source %s (%s)", got, srcSum, firstDiff(readFile(t, out), readFile(t, srcPath)))
	}
	compareImage(t, d.URI("clone"), srcPath)

	st := status(t, d, "clone")
	if st.Hydrated != 0 || st.Regions != 16384 || st.Hydrating != 0 {
		t.Errorf("after reading everything: %d/%d hydrated, %d hydrating; want 0/16384, 0", st.Hydrated, st.Regions, st.Hydrating)
	}
	ci := cloneInfo(t, d, "clone")
	if ci.Stats.SourceCopyBytes != 0 || ci.HydratedRegions != 0 {
		t.Errorf("reads copied %d bytes, hydrated %d regions; want none", ci.Stats.SourceCopyBytes, ci.HydratedRegions)
	}
	// Two full reads (nbdcopy, qemu-img compare), all from the source.
	if ci.Stats.SourceReadBytes < 2*size {
		t.Errorf("source_read_bytes %d, want at least %d: reads did not come from the source", ci.Stats.SourceReadBytes, 2*size)
	}
	var fi syscall.Stat_t
	if err := syscall.Stat(destPath, &fi); err != nil {
		t.Fatal(err)
	}
	if fi.Blocks != 0 {
		t.Errorf("the destination has %d blocks allocated after reads only; want 0", fi.Blocks)
	}
	if got := sha256File(t, srcPath); got != srcSum {
		t.Errorf("the source changed")
	}
}

// TestWritesReadBack: writes of every shape (inside a region, whole
// regions, across regions, unaligned, write-zeroes) read back at once and
// after hydration; the source never changes; once hydrated, the
// destination is the source overlaid with the writes.
func TestWritesReadBack(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	d := harness.Serve(t)
	const (
		size = 64 << 20
		R    = 64 << 10 // region: 128 sectors
		M    = 1 << 20
	)
	expected := makeSource(t, d.Dir, 5, size)
	srcPath := filepath.Join(d.Dir, "src.img")
	destPath := filepath.Join(d.Dir, "dest.img")
	harness.MakeImage(t, destPath, size)
	srcSum := sha256File(t, srcPath)
	cli(t, d, "create", "clone", "--table", "0 131072 clone ./md ./dest.img ./src.img 128 1 no_hydration")

	writes := []imageWrite{
		{off: 4096, n: 8192, fill: 0x11},                    // inside region 0
		{off: 1 * M, n: R, fill: 0x22},                      // whole region 16
		{off: 3*M - 4096, n: 4096 + 2*R + 4096, fill: 0x33}, // tail of 47, 48 and 49 whole, head of 50
		{off: 5000003, n: 777, fill: 0x44},                  // unaligned, inside a region
		{off: 8*M - 100, n: 300, fill: 0x55},                // unaligned, across a boundary
		{off: 10 * M, n: 4 * R, zero: true},                 // zeroes, whole regions
		{off: 12*M + 1000, n: 5000, zero: true},             // zeroes, unaligned
		{off: 14*M - 512, n: R + 1024, zero: true},          // zeroes across regions
		{off: 4096 + 100, n: 50, fill: 0x66},                // again into hydrated region 0
		{off: size - R, n: R, fill: 0x77},                   // the last region, whole
		{off: size - 1, n: 1, fill: 0x88},                   // the last byte
		{off: 20*M + 12345, n: M, fill: 0x99},               // many regions, unaligned ends
		{off: 1*M + 10, n: 10, fill: 0xaa},                  // into whole-written region 16
	}
	writeAndCheck(t, d.URI("clone"), expected, writes...)
	expPath := filepath.Join(d.Dir, "expected.img")
	writeFile(t, expPath, expected)
	compareImage(t, d.URI("clone"), expPath)
	if got := sha256File(t, srcPath); got != srcSum {
		t.Fatal("writes to the clone changed the source")
	}

	// Hydrate the rest, faster than dm's defaults, and check the
	// destination itself.
	cli(t, d, "message", "clone", "0", "hydration_threshold", "32")
	cli(t, d, "message", "clone", "0", "hydration_batch_size", "16")
	cli(t, d, "message", "clone", "0", "enable_hydration")
	cli(t, d, "wait", "clone")
	if st := status(t, d, "clone"); st.Hydrated != 1024 || st.Regions != 1024 || st.Hydrating != 0 {
		t.Errorf("after wait: %+v", st)
	}
	if diff := firstDiff(readFile(t, destPath), expected); diff != "" {
		t.Errorf("hydrated destination is not the source overlaid with the writes: %s", diff)
	}
	// Reads after hydration come from the destination and still match.
	var reads []string
	for _, w := range writes {
		if bytes.Equal(expected[w.off:w.off+w.n], pattern(expected[w.off], int(w.n))) {
			reads = append(reads, imageWrite{off: w.off, n: w.n, fill: expected[w.off]}.readCmd())
		}
	}
	qemuIO(t, d.URI("clone"), reads...)
	compareImage(t, d.URI("clone"), expPath)
	if got := sha256File(t, srcPath); got != srcSum {
		t.Error("hydration changed the source")
	}
}

// statsDelta is what one step changed in a clone's counters.
type statsDelta struct {
	copied, overwrite, write, zero, discard, background, cache int64
	hydrated                                                   int64
}

func deltaOf(a, b target.CloneInfo) statsDelta {
	return statsDelta{
		copied:     b.Stats.SourceCopyBytes - a.Stats.SourceCopyBytes,
		overwrite:  b.Stats.HydratedOverwriteBytes - a.Stats.HydratedOverwriteBytes,
		write:      b.Stats.HydratedWriteBytes - a.Stats.HydratedWriteBytes,
		zero:       b.Stats.HydratedZeroBytes - a.Stats.HydratedZeroBytes,
		discard:    b.Stats.HydratedDiscardBytes - a.Stats.HydratedDiscardBytes,
		background: b.Stats.HydratedBackgroundBytes - a.Stats.HydratedBackgroundBytes,
		cache:      b.Stats.HydratedCacheBytes - a.Stats.HydratedCacheBytes,
		hydrated:   int64(b.HydratedRegions) - int64(a.HydratedRegions),
	}
}

// TestWholeRegionWriteReadsNoSource: a write covering a whole unhydrated
// region goes straight to the destination without reading the source; a
// partial write copies exactly its region (once); write-zeroes of whole
// regions and discards of whole regions copy nothing; NBD_CMD_CACHE copies
// the unhydrated regions it touches. The sources here are
// local files, so the source-side count is the daemon's own
// source_copy_bytes counter (what the copier read from the source).
func TestWholeRegionWriteReadsNoSource(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "nbdcopy")
	d := harness.Serve(t)
	const (
		R    = 64 << 10 // region: 128 sectors
		M    = 1 << 20
		size = 16*M + 4096 // 256 whole regions and a partial 4 KiB tail region
	)
	expected := makeSource(t, d.Dir, 6, size)
	src := bytes.Clone(expected)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "clone", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 128 1 no_hydration", size/sector))
	uri := d.URI("clone")

	prev := cloneInfo(t, d, "clone")
	if prev.Regions != 257 || prev.HydratedRegions != 0 {
		t.Fatalf("fresh clone: %+v", prev)
	}
	step := func(what string, want statsDelta, cmds ...imageWrite) {
		t.Helper()
		if len(cmds) > 0 {
			writeAndCheck(t, uri, expected, cmds...)
		}
		cur := cloneInfo(t, d, "clone")
		if got := deltaOf(prev, cur); got != want {
			t.Errorf("%s: counters moved by %+v, want %+v", what, got, want)
		}
		prev = cur
	}

	// Reads of unhydrated regions come from the source and copy nothing
	// (hydration is off).
	qemuIO(t, uri, fmt.Sprintf("read -P 0x%02x 0 1", src[0]), "read 0 16M")
	step("reading everything", statsDelta{})
	if prev.Stats.SourceReadBytes < 16*M {
		t.Errorf("source_read_bytes %d after reading 16 MiB", prev.Stats.SourceReadBytes)
	}

	step("whole-region write", statsDelta{overwrite: R, hydrated: 1},
		imageWrite{off: 1 * M, n: R, fill: 0x21})
	step("partial write", statsDelta{copied: R, write: R, hydrated: 1},
		imageWrite{off: 2*M + 512, n: 4096, fill: 0x22})
	step("partial write to the same region again", statsDelta{},
		imageWrite{off: 2*M + 8192, n: 100, fill: 0x23})
	step("rewriting a whole-written region", statsDelta{},
		imageWrite{off: 1*M + 7, n: 9, fill: 0x24}, imageWrite{off: 1 * M, n: R, fill: 0x25})
	step("write across three regions", statsDelta{copied: 2 * R, write: 2 * R, overwrite: R, hydrated: 3},
		imageWrite{off: 4*M - 4096, n: 4096 + R + 4096, fill: 0x26})
	step("five unaligned bytes", statsDelta{copied: R, write: R, hydrated: 1},
		imageWrite{off: 6*M + 3, n: 5, fill: 0x27})
	step("write-zeroes of two whole regions", statsDelta{zero: 2 * R, hydrated: 2},
		imageWrite{off: 8 * M, n: 2 * R, zero: true})
	step("write-zeroes inside a region", statsDelta{copied: R, write: R, hydrated: 1},
		imageWrite{off: 9*M + 100, n: 1000, zero: true})

	qemuIO(t, uri, fmt.Sprintf("discard %d %d", 10*M, 3*R))
	step("discard of three whole regions", statsDelta{discard: 3 * R, hydrated: 3})
	qemuIO(t, uri, fmt.Sprintf("discard %d %d", 12*M+512, R))
	step("discard covering no whole region", statsDelta{})

	// NBD_CMD_CACHE (a hint to hydrate now, served even with hydration
	// off): the unhydrated regions it touches are copied, once; the
	// discarded ones it also touches are not.
	sh := nbdshell(t)
	run(t, sh[0], append(sh[1:], "-u", uri, "-c", fmt.Sprintf("h.cache(%d, %d)", 5*R-1, 10*M+1))...)
	step("cache of three hydrated and two unhydrated regions", statsDelta{copied: 2 * R, cache: 2 * R, hydrated: 2})

	// The partial last region (4 KiB) written whole. dm-clone copies it
	// first (its overwrite test is "bio size == region size"); nbdclone
	// treats a write covering the whole tail region as an overwrite, which
	// is safe (the write replaces every byte of it) and saves the read.
	step("whole write of the partial tail region", statsDelta{overwrite: 4096, hydrated: 1},
		imageWrite{off: 16 * M, n: 4096, fill: 0x28})

	// Everything reads back: the writes, and the source everywhere else.
	// Discarded bytes are unspecified after a discard, so they are taken
	// from what the clone returns.
	out := filepath.Join(d.Dir, "out.img")
	run(t, "nbdcopy", d.URI("clone"), out)
	got := readFile(t, out)
	copy(expected[10*M:10*M+3*R], got[10*M:10*M+3*R])
	if diff := firstDiff(got, expected); diff != "" {
		t.Errorf("clone contents: %s", diff)
	}
	if st := status(t, d, "clone"); st.Hydrated != 15 || st.Regions != 257 {
		t.Errorf("status: %d/%d hydrated, want 15/257", st.Hydrated, st.Regions)
	}
	if !bytes.Equal(readFile(t, filepath.Join(d.Dir, "src.img")), src) {
		t.Error("the source changed")
	}
}
