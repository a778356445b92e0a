package blockdev

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// testPipe is a non-blocking pipe of size bytes (0: the default 64 KiB).
func testPipe(t *testing.T, size int) (r, w int) {
	t.Helper()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	if size > 0 {
		if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, size); err != nil {
			t.Fatal(err)
		}
	}
	return fds[0], fds[1]
}

// drain reads what the pipe holds.
func drain(t *testing.T, r int) []byte {
	t.Helper()
	var out []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(r, buf)
		if err == unix.EAGAIN || n == 0 {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, buf[:n]...)
	}
}

func TestSpliceMovesTheFilesBytes(t *testing.T) {
	ctx := t.Context()
	data := make([]byte, 1<<20)
	rand.Read(data)
	path := tempFile(t, data)
	for _, ro := range []bool{false, true} {
		var d *File
		var err error
		if ro {
			d, err = OpenFileReadOnly(path)
		} else {
			d, err = OpenFile(path)
		}
		if err != nil {
			t.Fatal(err)
		}
		r, w := testPipe(t, 1<<20)
		// Unaligned on both ends.
		off, n := int64(4096+100), 300<<10
		if err := d.SpliceTo(ctx, w, off, n, true); err != nil {
			t.Fatalf("read-only %v: %v", ro, err)
		}
		if got := drain(t, r); !bytes.Equal(got, data[off:off+int64(n)]) {
			t.Fatalf("read-only %v: the pipe holds %d bytes that are not the file's %d at %d", ro, len(got), n, off)
		}
		d.Close()
		if err := d.SpliceTo(ctx, w, 0, 4096, false); !errors.Is(err, ErrClosed) {
			t.Fatalf("SpliceTo after Close: %v, want ErrClosed", err)
		}
	}
}

// With dataOnly a range with a hole is refused before anything is moved;
// without it the hole is moved as zeroes.
func TestSpliceDataOnlyRefusesHoles(t *testing.T) {
	ctx := t.Context()
	path := tempFile(t, nil)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xab}, 1<<20)
	// 1 MiB of data, a 1 MiB hole, 1 MiB of data.
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 2<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	d, err := OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if ext, err := d.Map(0, 3<<20); err != nil || len(ext) != 3 || !ext[1].Hole {
		t.Fatalf("the filesystem under %s does not report the hole (%v, %v): this test needs one that does", path, ext, err)
	}
	r, w := testPipe(t, 1<<20)
	for _, rng := range [][2]int64{{1 << 20, 4096}, {(1 << 20) - 4096, 8192}, {(2 << 20) - 4096, 8192}} {
		if err := d.SpliceTo(ctx, w, rng[0], int(rng[1]), true); !errors.Is(err, ErrNoSplice) {
			t.Fatalf("dataOnly splice of %d+%d over a hole: %v, want ErrNoSplice", rng[0], rng[1], err)
		}
		if got := drain(t, r); len(got) != 0 {
			t.Fatalf("a refused splice left %d bytes in the pipe", len(got))
		}
	}
	if err := d.SpliceTo(ctx, w, (1<<20)-4096, 8192, false); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Repeat([]byte{0xab}, 4096), make([]byte, 4096)...)
	if got := drain(t, r); !bytes.Equal(got, want) {
		t.Fatalf("splice over data then hole moved %d bytes, not the data then zeroes", len(got))
	}
}

// A pipe too small for the range is ErrNoSplice (the caller reads into a
// buffer instead); a file shorter than when it was opened is ErrShrunk.
func TestSpliceFailures(t *testing.T) {
	ctx := t.Context()
	data := make([]byte, 256<<10)
	rand.Read(data)
	path := tempFile(t, data)
	d, err := OpenFileReadOnly(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_, w := testPipe(t, 0) // 64 KiB
	if err := d.SpliceTo(ctx, w, 0, 128<<10, false); !errors.Is(err, ErrNoSplice) {
		t.Fatalf("128 KiB into a 64 KiB pipe: %v, want ErrNoSplice", err)
	}
	if err := d.SpliceTo(ctx, w, 255<<10, 2<<10, false); err == nil {
		t.Fatal("a splice past the end succeeded")
	}
	if err := os.Truncate(path, 64<<10); err != nil {
		t.Fatal(err)
	}
	_, w2 := testPipe(t, 1<<20)
	if err := d.SpliceTo(ctx, w2, 128<<10, 64<<10, false); !errors.Is(err, ErrShrunk) {
		t.Fatalf("splice past a truncation: %v, want ErrShrunk", err)
	}
}

// SpliceFrom writes exactly the pipe's bytes at the offset, unaligned, and
// leaves the rest of the file alone; a pipe holding fewer bytes than asked
// is an error, not a wait; a read-only or closed file takes nothing.
func TestSpliceFromWritesThePipesBytes(t *testing.T) {
	data := make([]byte, 1<<20)
	rand.Read(data)
	path := tempFile(t, data)
	d, err := OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	r, w := testPipe(t, 1<<20)
	payload := make([]byte, 300<<10)
	rand.Read(payload)
	if _, err := unix.Write(w, payload); err != nil {
		t.Fatal(err)
	}
	off := int64(4096 + 100)
	if err := d.SpliceFrom(r, off, len(payload)); err != nil {
		t.Fatal(err)
	}
	copy(data[off:], payload)
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the file is not its old bytes with the pipe's written at the offset")
	}
	if _, err := unix.Write(w, payload[:1000]); err != nil {
		t.Fatal(err)
	}
	if err := d.SpliceFrom(r, 0, 2000); err == nil {
		t.Fatal("SpliceFrom of 2000 bytes from a pipe holding 1000: no error")
	}
	if err := d.SpliceFrom(r, int64(len(data))-10, 20); err == nil {
		t.Fatal("SpliceFrom beyond the end: no error")
	}
	ro, err := OpenFileReadOnly(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.SpliceFrom(r, 0, 10); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("SpliceFrom into a read-only file: %v, want ErrReadOnly", err)
	}
	d.Close()
	if err := d.SpliceFrom(r, 0, 10); !errors.Is(err, ErrClosed) {
		t.Fatalf("SpliceFrom after Close: %v, want ErrClosed", err)
	}
}
