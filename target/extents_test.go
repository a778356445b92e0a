package target

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/blockdev"
)

const (
	extRegion = 64 << 10
	extSize   = 16*extRegion + 4096 // 17 regions, the last one partial
)

// sparseImage writes a file of size bytes with data in the given [off, n)
// ranges and holes elsewhere.
func sparseImage(t *testing.T, path string, size int64, data ...[2]int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, d := range data {
		if _, err := f.WriteAt(bytes.Repeat([]byte{0xc3}, int(d[1])), d[0]); err != nil {
			t.Fatal(err)
		}
	}
}

func fmtAlloc(es []blockdev.Extent) string {
	var parts []string
	for _, e := range es {
		kind := "data"
		switch {
		case e.Hole && e.Zero:
			kind = "hole"
		case e.Zero:
			kind = "zero"
		case e.Hole:
			kind = "hole-nonzero"
		}
		parts = append(parts, fmt.Sprintf("%d:%s", e.Length, kind))
	}
	return strings.Join(parts, " ")
}

func fmtHydration(es []HydrationExtent) string {
	var parts []string
	for _, e := range es {
		parts = append(parts, fmt.Sprintf("%d:%v", e.Length, e.Hydrated))
	}
	return strings.Join(parts, " ")
}

// buildSparseClone is a clone of a sparse source (data in regions 0-1 and
// 8) onto a sparse destination, with files opened as they are in
// production, so both can map themselves.
func buildSparseClone(t *testing.T) *clone {
	t.Helper()
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.img"), filepath.Join(dir, "dst.img")
	sparseImage(t, src, extSize, [2]int64{0, 2 * extRegion}, [2]int64{8 * extRegion, extRegion})
	sparseImage(t, dst, extSize)
	return startClone(t, fmt.Sprintf("0 %d clone %s %s %s %d 1 no_hydration",
		extSize/SectorSize, filepath.Join(dir, "md"), dst, src, extRegion/SectorSize), Env{})
}

func TestCloneExtents(t *testing.T) {
	ctx := context.Background()
	c := buildSparseClone(t)
	const R = extRegion
	alloc := func(off, n int64, maxExtents int) string {
		t.Helper()
		es, err := c.Allocation(ctx, off, n, maxExtents)
		if err != nil {
			t.Fatalf("Allocation(%d, %d): %v", off, n, err)
		}
		return fmtAlloc(es)
	}
	hyd := func(off, n int64, maxExtents int) string {
		t.Helper()
		es, err := c.Hydration(ctx, off, n, maxExtents)
		if err != nil {
			t.Fatalf("Hydration(%d, %d): %v", off, n, err)
		}
		return fmtHydration(es)
	}

	// Nothing hydrated: all from the source.
	want := fmt.Sprintf("%d:data %d:hole %d:data %d:hole", 2*R, 6*R, R, extSize-9*R)
	if got := alloc(0, extSize, 100); got != want {
		t.Errorf("fresh allocation %s, want %s", got, want)
	}
	if got := hyd(0, extSize, 100); got != fmt.Sprintf("%d:false", extSize) {
		t.Errorf("fresh hydration %s", got)
	}

	// Region 2 overwritten with data (hydrated, data on the destination),
	// region 8 discarded (hydrated, punched), region 9 zeroed whole
	// (hydrated, zeroes on the destination), region 4 partly written
	// (copied from its hole in the source, then written).
	if err := c.WriteAt(ctx, bytes.Repeat([]byte{1}, R), 2*R, false); err != nil {
		t.Fatal(err)
	}
	if err := c.Trim(ctx, 8*R, R); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(ctx, 9*R, R, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, []byte{7}, 4*R+100, false); err != nil {
		t.Fatal(err)
	}
	want = fmt.Sprintf("%d:false %d:true %d:false %d:true %d:false %d:true %d:false", 2*R, R, R, R, 3*R, 2*R, extSize-10*R)
	if got := hyd(0, extSize, 100); got != want {
		t.Errorf("hydration %s, want %s", got, want)
	}
	// Unhydrated regions map the source (holes in regions 3, 5-7 and 10
	// on), hydrated ones the destination: region 2's data, region 4's copy
	// and byte (data), regions 8 and 9 punched and zeroed (zeroes, or data
	// where the filesystem writes them out).
	es, err := c.Allocation(ctx, 0, extSize, 100)
	if err != nil {
		t.Fatal(err)
	}
	checkAllocation(t, es, extSize, map[int64]string{
		0: "data", 2*R - 1: "data", 2 * R: "data", 3*R - 1: "data",
		3 * R: "zero", 4*R - 1: "zero", 4*R + 100: "data", 5 * R: "zero", 8*R - 1: "zero",
		10 * R: "zero", extSize - 1: "zero",
	})
	if got := alloc(0, 3*R, 100); got != fmt.Sprintf("%d:data", 3*R) {
		t.Errorf("allocation of regions 0-2: %s (source data, then destination data)", got)
	}

	// Bounds: maxExtents, partial ranges, the tail.
	if got := hyd(0, extSize, 2); got != fmt.Sprintf("%d:false %d:true", 2*R, R) {
		t.Errorf("hydration, at most 2: %s", got)
	}
	if got := alloc(0, extSize, 1); got != fmt.Sprintf("%d:data", 3*R) {
		t.Errorf("allocation, at most 1: %s", got)
	}
	if got := hyd(2*R+5, 10, 5); got != "10:true" {
		t.Errorf("hydration inside a region: %s", got)
	}
	if got := alloc(extSize-100, 100, 5); got != "100:hole" {
		t.Errorf("allocation of the tail: %s", got)
	}
	for _, bad := range [][2]int64{{0, 0}, {-1, 5}, {extSize, 1}, {extSize - 1, 2}} {
		if _, err := c.Allocation(ctx, bad[0], bad[1], 5); err == nil {
			t.Errorf("Allocation(%d, %d) succeeded", bad[0], bad[1])
		}
		if _, err := c.Hydration(ctx, bad[0], bad[1], 5); err == nil {
			t.Errorf("Hydration(%d, %d) succeeded", bad[0], bad[1])
		}
	}
	if _, err := c.Hydration(ctx, 0, 1, 0); err == nil {
		t.Error("Hydration with maxExtents 0 succeeded")
	}

	// Hydrated completely: one hydrated extent, the destination's map.
	if err := c.Cache(ctx, 0, extSize); err != nil {
		t.Fatal(err)
	}
	if got := hyd(0, extSize, 100); got != fmt.Sprintf("%d:true", extSize) {
		t.Errorf("hydration after CACHE of everything: %s", got)
	}
	dst := c.dst.(blockdev.Mapper)
	dm, err := dst.Map(0, extSize)
	if err != nil {
		t.Fatal(err)
	}
	if got := alloc(0, extSize, 1000); got != fmtAlloc(dm) {
		t.Errorf("hydrated allocation %s, destination %s", got, fmtAlloc(dm))
	}
}

// checkAllocation checks that es covers [0, size) exactly and describes
// each offset in want as "data" (not zero: describing data as zero would
// corrupt a copy) or "zero".
func checkAllocation(t *testing.T, es []blockdev.Extent, size int64, want map[int64]string) {
	t.Helper()
	var sum int64
	for _, e := range es {
		if e.Length <= 0 {
			t.Fatalf("empty extent in %s", fmtAlloc(es))
		}
		sum += e.Length
	}
	if sum != size {
		t.Fatalf("extents cover %d bytes of %d: %s", sum, size, fmtAlloc(es))
	}
	for off, kind := range want {
		var at int64
		for _, e := range es {
			if off < at+e.Length {
				if got := map[bool]string{true: "zero", false: "data"}[e.Zero]; got != kind {
					t.Errorf("offset %d is described as %s, want %s: %s", off, got, kind, fmtAlloc(es))
				}
				break
			}
			at += e.Length
		}
	}
}

func TestCloneZeroesFast(t *testing.T) {
	c := buildSparseClone(t)
	ctx := context.Background()
	const R = extRegion
	native := zeroesFast(c.dst)
	if err := c.WriteAt(ctx, []byte{1}, 3*R, false); err != nil { // hydrates region 3
		t.Fatal(err)
	}
	for _, tc := range []struct {
		off, n int64
		fast   bool
	}{
		{0, extSize, true},          // whole regions only (the tail counts: it reaches the end)
		{0, R, true},                // one whole unhydrated region
		{0, R + 1, false},           // and a sliver of an unhydrated one: a copy
		{R / 2, R, false},           // slivers of two unhydrated regions
		{3*R + 5, 10, true},         // inside a hydrated region
		{3*R + 5, R, false},         // into unhydrated region 4
		{2*R + 5, R, false},         // from unhydrated region 2
		{extSize - 100, 100, false}, // part of the unhydrated tail, to the end
		{extSize - 100, 50, false},  // part of the unhydrated tail
		{extSize - 100, 101, false}, // beyond the end
		{16 * R, 4096, true},        // exactly the tail region
	} {
		if got := c.ZeroesFast(tc.off, tc.n); got != (tc.fast && native) {
			t.Errorf("ZeroesFast(%d, %d) = %v, want %v (destination native: %v)", tc.off, tc.n, got, tc.fast && native, native)
		}
	}
	if !native {
		t.Logf("destination filesystem cannot zero natively: every answer was false")
	}
}

func TestLinearExtents(t *testing.T) {
	dir := t.TempDir()
	dev := filepath.Join(dir, "dev.img")
	const K = 1 << 10
	sparseImage(t, dev, 1<<20, [2]int64{64 * K, 64 * K})
	// Offset 32 KiB: the target's [32K, 96K) is the device's data.
	tb, err := ParseTable(fmt.Sprintf("0 %d linear %s %d", 512*K/SectorSize, dev, 32*K/SectorSize))
	if err != nil {
		t.Fatal(err)
	}
	tg, err := Build(context.Background(), tb, Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	ctx := context.Background()
	l := tg.(*linear)
	es, err := l.Allocation(ctx, 0, 512*K, 10)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmtAlloc(es), fmt.Sprintf("%d:hole %d:data %d:hole", 32*K, 64*K, 512*K-96*K); got != want {
		t.Errorf("linear allocation %s, want %s", got, want)
	}
	hs, err := l.Hydration(ctx, 100, 1000, 1)
	if err != nil || fmtHydration(hs) != "1000:true" {
		t.Errorf("linear hydration %s, %v", fmtHydration(hs), err)
	}
	if _, err := l.Allocation(ctx, 500*K, 13*K, 1); err == nil {
		t.Error("allocation past the end succeeded")
	}
	if got := l.ZeroesFast(0, 512*K); got != zeroesFast(l.dev) {
		t.Errorf("linear ZeroesFast %v", got)
	}
	if l.ZeroesFast(500*K, 13*K) {
		t.Error("ZeroesFast past the end")
	}
}
