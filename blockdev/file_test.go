package blockdev

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/testutil"
)

func tempFile(t *testing.T, content []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "dev.img")
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFileReadWriteSync(t *testing.T) {
	p := tempFile(t, bytes.Repeat([]byte{7}, 64<<10))
	d, err := OpenFile(p)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != 64<<10 || d.LogicalBlockSize() != 512 {
		t.Fatalf("size %d lbs %d", d.Size(), d.LogicalBlockSize())
	}
	if _, err := d.WriteAt([]byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if _, err := d.ReadAt(got, 4096); err != nil || string(got) != "hello" {
		t.Fatalf("read back %q, %v", got, err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
	if _, err := d.ReadAt(got, 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
}

func TestReadOnlyNeverWrites(t *testing.T) {
	orig := bytes.Repeat([]byte{9}, 8192)
	p := tempFile(t, orig)
	d, err := OpenFileReadOnly(p)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("WriteAt: %v", err)
	}
	for name, err := range map[string]error{
		"Discard": d.Discard(0, 4096), "WriteZeroes": d.WriteZeroes(0, 4096), "Sync": d.Sync(),
	} {
		if !errors.Is(err, ErrReadOnly) {
			t.Errorf("%s on a read-only device: %v", name, err)
		}
	}
	// The descriptor itself is read-only.
	if _, err := d.f.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("the read-only descriptor accepted a write")
	}
	if b, _ := os.ReadFile(p); !bytes.Equal(b, orig) {
		t.Fatal("read-only device was modified")
	}
	// A read-only file can be a source even without write permission.
	os.Chmod(p, 0o400)
	if d2, err := OpenFileReadOnly(p); err != nil {
		t.Fatal(err)
	} else {
		d2.Close()
	}
}

func TestDiscardAndWriteZeroesOnFile(t *testing.T) {
	p := tempFile(t, bytes.Repeat([]byte{0xff}, 1<<20))
	d, err := OpenFile(p)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Discard(64<<10, 128<<10); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(512<<10+100, 5000); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if len(b) != 1<<20 {
		t.Fatalf("discard changed the size to %d", len(b))
	}
	if !bytes.Equal(b[64<<10:192<<10], make([]byte, 128<<10)) {
		t.Fatal("punched range does not read as zeroes")
	}
	if b[64<<10-1] != 0xff || b[192<<10] != 0xff {
		t.Fatal("discard touched bytes outside its range")
	}
	if !bytes.Equal(b[512<<10+100:512<<10+5100], make([]byte, 5000)) || b[512<<10+99] != 0xff || b[512<<10+5100] != 0xff {
		t.Fatal("WriteZeroes wrong")
	}
	if err := d.Discard(0, 0); err != nil {
		t.Fatal("zero-length discard:", err)
	}
}

func TestWriteZeroBuffersFallback(t *testing.T) {
	var w sliceWriter = make([]byte, 3<<20)
	for i := range w {
		w[i] = 1
	}
	if err := writeZeroBuffers(w, 10, 2<<20+5); err != nil {
		t.Fatal(err)
	}
	if w[9] != 1 || w[2<<20+15] != 1 || !bytes.Equal(w[10:2<<20+15], make([]byte, 2<<20+5)) {
		t.Fatal("fallback zeroing wrong")
	}
}

type sliceWriter []byte

func (s sliceWriter) WriteAt(p []byte, off int64) (int, error) { return copy(s[off:], p), nil }

func TestOpenErrors(t *testing.T) {
	if _, err := OpenFile(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("opened a missing file")
	}
	if _, err := OpenFile(t.TempDir()); err == nil {
		t.Fatal("opened a directory read-write")
	}
	if _, err := OpenFileReadOnly(t.TempDir()); err == nil || !strings.Contains(err.Error(), "neither a regular file nor a block device") {
		t.Fatalf("directory: %v", err)
	}
}

// TestBlockDevice runs the block-device paths (BLKGETSIZE64, BLKSSZGET,
// BLKDISCARD, BLKZEROOUT) on a loop device.
func TestBlockDevice(t *testing.T) {
	testutil.NeedRoot(t)
	losetup := testutil.NeedTool(t, "losetup")
	p := tempFile(t, bytes.Repeat([]byte{0xab}, 4<<20))
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
	if !d.block || d.Size() != 4<<20 || d.LogicalBlockSize() != 512 {
		t.Fatalf("block=%v size=%d lbs=%d", d.block, d.Size(), d.LogicalBlockSize())
	}
	if err := d.WriteZeroes(1<<20, 64<<10); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	if _, err := d.ReadAt(buf, 1<<20); err != nil || !bytes.Equal(buf, make([]byte, 64<<10)) {
		t.Fatalf("BLKZEROOUT range does not read zeroes: %v", err)
	}
	switch err := d.Discard(2<<20, 64<<10); {
	case err == nil, errors.Is(err, ErrNotSupported):
	default:
		t.Fatalf("BLKDISCARD: %v", err)
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	ro, err := OpenFileReadOnly(loop)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if ro.Size() != 4<<20 {
		t.Fatalf("read-only block device size %d", ro.Size())
	}
}
