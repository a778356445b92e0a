package blockdev

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nbdclone/nbdclone/internal/testutil"
)

// sparseFile is 4 MiB with data at [64K, 192K) and [3M, 3M+4K), holes
// elsewhere.
func sparseFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "sparse.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(4 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 128<<10), 64<<10); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{2}, 4<<10), 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return p
}

func fmtExtents(es []Extent) string {
	var parts []string
	for _, e := range es {
		kind := "data"
		if e.Hole {
			kind = "hole"
		}
		if e.Zero {
			kind += "+zero"
		}
		parts = append(parts, fmt.Sprintf("%d:%s", e.Length, kind))
	}
	return strings.Join(parts, " ")
}

func TestFileMap(t *testing.T) {
	p := sparseFile(t)
	d, err := OpenFileReadOnly(p) // sources are mapped read-only
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	const K, M = 1 << 10, 1 << 20
	for _, tc := range []struct {
		off, n int64
		want   string
	}{
		{0, 4 * M, "65536:hole+zero 131072:data 2949120:hole+zero 4096:data 1044480:hole+zero"},
		{0, 64 * K, "65536:hole+zero"},
		{0, 64*K + 1, "65536:hole+zero 1:data"},
		{100 * K, 10, "10:data"},
		{100 * K, 200 * K, "94208:data 110592:hole+zero"},
		{3*M + 4*K - 1, 2, "1:data 1:hole+zero"},
		{4*M - 1, 1, "1:hole+zero"},
		{4*M - 512, 10 * M, "512:hole+zero"}, // cut at the device size
	} {
		got, err := d.Map(tc.off, tc.n)
		if err != nil {
			t.Fatalf("Map(%d, %d): %v", tc.off, tc.n, err)
		}
		if s := fmtExtents(got); s != tc.want {
			t.Errorf("Map(%d, %d) = %s, want %s", tc.off, tc.n, s, tc.want)
		}
	}
	for _, bad := range [][2]int64{{-1, 10}, {0, 0}, {4 * M, 1}, {0, -5}} {
		if _, err := d.Map(bad[0], bad[1]); err == nil {
			t.Errorf("Map(%d, %d) succeeded", bad[0], bad[1])
		}
	}
	d.Close()
	if _, err := d.Map(0, 1); !errors.Is(err, ErrClosed) {
		t.Errorf("Map after Close: %v", err)
	}
}

// TestFileMapManyExtents: a file of alternating 4 KiB data and holes is
// described in bounded pieces that, asked again, cover it exactly.
func TestFileMapManyExtents(t *testing.T) {
	const blocks = 3000
	p := filepath.Join(t.TempDir(), "striped.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(blocks * 4096); err != nil {
		t.Fatal(err)
	}
	for b := int64(0); b < blocks; b += 2 {
		if _, err := f.WriteAt(bytes.Repeat([]byte{9}, 4096), b*4096); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	d, err := OpenFile(p)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var all []Extent
	calls := 0
	for off := int64(0); off < d.Size(); calls++ {
		es, err := d.Map(off, d.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if len(es) == 0 || len(es) > maxMapExtents {
			t.Fatalf("Map returned %d extents", len(es))
		}
		for _, e := range es {
			if e.Length <= 0 {
				t.Fatalf("empty extent at %d", off)
			}
			off += e.Length
		}
		all = append(all, es...)
	}
	if calls < 2 {
		t.Errorf("%d extents described in one call: the bound is not applied", len(all))
	}
	if len(all) != blocks {
		t.Fatalf("%d extents, want %d", len(all), blocks)
	}
	for i, e := range all {
		if e.Length != 4096 || e.Hole != (i%2 == 1) || e.Zero != e.Hole {
			t.Fatalf("extent %d: %+v", i, e)
		}
	}
}

func TestZeroesFast(t *testing.T) {
	p := sparseFile(t)
	d, err := OpenFile(p)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		t.Fatal(err)
	}
	want := st.Type == ext4Magic || st.Type == xfsMagic
	if got := d.ZeroesFast(); got != want {
		t.Errorf("ZeroesFast = %v on filesystem type %#x", got, st.Type)
	}
	d.noZeroRange.Store(true) // as after fallocate said EOPNOTSUPP
	if d.ZeroesFast() {
		t.Error("ZeroesFast after ZERO_RANGE proved unsupported")
	}
	ro, err := OpenFileReadOnly(p)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if ro.ZeroesFast() {
		t.Error("a read-only device zeroes fast")
	}
	// tmpfs has no FALLOC_FL_ZERO_RANGE: never fast there.
	if shm, err := os.CreateTemp("/dev/shm", "nbdclone-zero"); err == nil {
		shm.Truncate(1 << 20)
		shm.Close()
		defer os.Remove(shm.Name())
		sd, err := OpenFile(shm.Name())
		if err != nil {
			t.Fatal(err)
		}
		defer sd.Close()
		if sd.ZeroesFast() {
			t.Error("ZeroesFast on tmpfs")
		}
	}
}

// TestBlockDeviceMap: a block device is all data; its ZeroesFast follows
// the queue's write-zeroes offload.
func TestBlockDeviceMap(t *testing.T) {
	testutil.NeedRoot(t)
	losetup := testutil.NeedTool(t, "losetup")
	p := sparseFile(t)
	out, err := exec.Command(losetup, "-f", "--show", p).CombinedOutput()
	if err != nil {
		testutil.Unavailable(t, "loop device: %v %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command(losetup, "-d", loop).Run() })
	d, err := OpenFile(loop)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	es, err := d.Map(0, 10<<20)
	if err != nil || fmtExtents(es) != "4194304:data" {
		t.Fatalf("Map = %s, %v", fmtExtents(es), err)
	}
	sysfs, err := os.ReadFile("/sys/block/" + filepath.Base(loop) + "/queue/write_zeroes_max_bytes")
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.TrimSpace(string(sysfs)) != "0"; d.ZeroesFast() != want {
		t.Errorf("ZeroesFast = %v, write_zeroes_max_bytes %s", d.ZeroesFast(), sysfs)
	}
}

// TestFileMapAfterTruncation: a source truncated after it was opened has
// nothing past its new end. The hole before it maps as zeroes; the part
// past it is an error, never a hole a copier would zero instead of failing.
func TestFileMapAfterTruncation(t *testing.T) {
	p := sparseFile(t)
	d, err := OpenFileReadOnly(p)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	const K, M = 1 << 10, 1 << 20
	if err := os.Truncate(p, 1*M); err != nil {
		t.Fatal(err)
	}
	got, err := d.Map(512*K, 3*M)
	if err != nil {
		t.Fatalf("Map across the new end: %v", err)
	}
	if s := fmtExtents(got); s != "524288:hole+zero" {
		t.Fatalf("Map across the new end = %s, want only the hole before it", s)
	}
	if got, err := d.Map(2*M, 4*K); !errors.Is(err, ErrShrunk) {
		t.Fatalf("Map past the new end = %s, %v; want ErrShrunk", fmtExtents(got), err)
	}
	// Before the new end nothing changed.
	if got, err := d.Map(0, 256*K); err != nil || fmtExtents(got) != "65536:hole+zero 131072:data 65536:hole+zero" {
		t.Fatalf("Map before the new end = %s, %v", fmtExtents(got), err)
	}
}
