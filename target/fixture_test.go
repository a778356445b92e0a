package target

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/nbdclone/nbdclone/blockdev"
)

// fixture is a source file with random content, an empty destination and a
// metadata directory.
type fixture struct {
	dir, src, dst, md string
	size              int64 // target length in bytes (a multiple of 512)
	srcData           []byte
	sourceReads       atomic.Int64 // bytes read from the source, all causes
}

func newFixture(t testing.TB, size int64, seed uint64) *fixture {
	t.Helper()
	dir := t.TempDir()
	f := &fixture{
		dir: dir, size: size,
		src: filepath.Join(dir, "src.img"),
		dst: filepath.Join(dir, "dst.img"),
		md:  filepath.Join(dir, "md"),
	}
	f.srcData = make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, 99))
	for i := range f.srcData {
		f.srcData[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(f.src, f.srcData, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.dst, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(f.dst, size); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) line(regionSectors int, extra string) string {
	s := fmt.Sprintf("0 %d clone %s %s %s %d", f.size/512, f.md, f.dst, f.src, regionSectors)
	if extra != "" {
		s += " " + extra
	}
	return s
}

// countingReader counts bytes read from a source.
type countingReader struct {
	blockdev.Reader
	n *atomic.Int64
}

func (c countingReader) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.Reader.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

func (f *fixture) env() Env {
	return Env{OpenSource: func(_ context.Context, spec string) (blockdev.Reader, error) {
		r, err := blockdev.OpenFileReadOnly(spec)
		if err != nil {
			return nil, err
		}
		return countingReader{r, &f.sourceReads}, nil
	}}
}

// build constructs and resumes a clone; it is closed at cleanup.
func (f *fixture) build(t testing.TB, regionSectors int, extra string) *clone {
	t.Helper()
	return startClone(t, f.line(regionSectors, extra), f.env())
}

// startClone builds the clone of a table line and resumes it; it is closed
// at cleanup.
func startClone(t testing.TB, line string, env Env) *clone {
	t.Helper()
	tb, err := ParseTable(line)
	if err != nil {
		t.Fatal(err)
	}
	tg, err := Build(context.Background(), tb, env)
	if err != nil {
		t.Fatal(err)
	}
	c := tg.(*clone)
	t.Cleanup(func() { c.Close() })
	if err := c.Resume(); err != nil {
		t.Fatal(err)
	}
	return c
}

func (f *fixture) destContent(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(f.dst)
	if err != nil {
		t.Fatal(err)
	}
	return b[:f.size]
}

func (f *fixture) checkSourceUnchanged(t testing.TB) {
	t.Helper()
	b, err := os.ReadFile(f.src)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, f.srcData) {
		t.Fatal("the source was modified")
	}
}
