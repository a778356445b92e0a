package hydrate

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
)

// fdOnlySource is a local file whose ReadAt must not be used: a copier
// that copies in the kernel reads through the descriptor only.
type fdOnlySource struct {
	f     *os.File
	reads atomic.Int64
}

func (s *fdOnlySource) Fd() uintptr { return s.f.Fd() }
func (s *fdOnlySource) ReadAt(p []byte, off int64) (int, error) {
	s.reads.Add(1)
	return s.f.ReadAt(p, off)
}

// randomData is n reproducible random bytes.
func randomData(n int64, seed uint64) []byte {
	data := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, seed+1))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	return data
}

// tempFile creates dir/name holding data, sized to size.
func tempFile(t *testing.T, dir, name string, data []byte, size int64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestCopierCopiesFilesInTheKernel(t *testing.T) {
	const size = 8<<20 + 12345
	data := randomData(size, 3)
	src := &fdOnlySource{f: tempFile(t, t.TempDir(), "src.img", data, size)}
	dst := tempFile(t, t.TempDir(), "dst.img", nil, size)
	c := NewCopier(src, dst, CopierOptions{Chunk: 1 << 20})
	defer c.Close()
	if err := c.Copy(context.Background(), 4096, size-4096); err != nil {
		t.Fatal(err)
	}
	if n := src.reads.Load(); n != 0 {
		t.Fatalf("%d reads went through user memory; copy_file_range should have copied every chunk", n)
	}
	got := make([]byte, size)
	if _, err := dst.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(make([]byte, 4096), data[4096:]...)
	if !bytes.Equal(got, want) {
		t.Fatal("the destination differs from the source's range")
	}
	if c.CopiedBytes() != size-4096 {
		t.Fatalf("CopiedBytes %d, want %d", c.CopiedBytes(), size-4096)
	}

	// A source that ends before the range does fails the copy, as a short
	// read does: nothing past its end reads as zeroes.
	short := &fdOnlySource{f: tempFile(t, t.TempDir(), "short.img", data[:1<<20], 1<<20)}
	c2 := NewCopier(short, dst, CopierOptions{Chunk: 1 << 20})
	defer c2.Close()
	if err := c2.Copy(context.Background(), 512<<10, 1<<20); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("copy past the source's end: %v, want io.ErrUnexpectedEOF", err)
	}
}
