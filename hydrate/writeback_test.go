package hydrate

import (
	"bytes"
	"context"
	"os"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// residentBytes is how much of path's first size bytes is in the page
// cache (mincore over a read-only mapping).
func residentBytes(t *testing.T, path string, size int64) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	page := int64(os.Getpagesize())
	vec := make([]byte, (size+page-1)/page)
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)),
		uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal(e)
	}
	n := int64(0)
	for _, v := range vec {
		n += int64(v & 1)
	}
	return n * page
}

// copyToFile copies size random bytes into a new file of dir through a
// Copier with evictBehind (and chunks of 1 MiB, four copies at once), with
// CopyCached if cached, and returns the file's path and the data.
func copyToFile(t *testing.T, dir string, size, evictBehind int64, cached bool) (string, []byte) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Fatalf("%s is tmpfs: its pages cannot be dropped; run the test on a disk filesystem", dir)
	}
	data := randomData(size, 1)
	f := tempFile(t, dir, "dst.img", nil, size)
	path := f.Name()
	c := NewCopier(bytes.NewReader(data), f, CopierOptions{Chunk: 1 << 20, EvictBehind: evictBehind})
	defer c.Close()
	run := c.Copy
	if cached {
		run = c.CopyCached
	}
	var wg sync.WaitGroup
	part := size / 4
	for i := range int64(4) {
		wg.Go(func() {
			if err := run(context.Background(), i*part, part); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	return path, data
}

func TestCopierDropsWrittenBackChunks(t *testing.T) {
	const size = 64 << 20
	path, data := copyToFile(t, t.TempDir(), size, 8<<20, false)
	if got := residentBytes(t, path, size); got > 16<<20 {
		t.Fatalf("%d MiB of the copy left in the page cache, want ≤ 16 (8 MiB behind + chunks in flight)", got>>20)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the destination differs from the source after the copy")
	}
}

// CopyCached (NBD_CMD_CACHE) keeps what it copied cached; so does a copier
// with eviction off (which also shows the measure itself works).
func TestCopierKeepsChunksCachedWhenAsked(t *testing.T) {
	const size = 64 << 20
	for _, tc := range []struct {
		name   string
		behind int64
		cached bool
	}{{"CopyCached", 8 << 20, true}, {"eviction off", -1, false}} {
		path, _ := copyToFile(t, t.TempDir(), size, tc.behind, tc.cached)
		if got := residentBytes(t, path, size); got < 48<<20 {
			t.Fatalf("%s: only %d MiB of a 64 MiB copy cached", tc.name, got>>20)
		}
	}
}
