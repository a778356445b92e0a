package blockdev

import (
	"bytes"
	"os"
	"slices"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestReadaheadFollowsOneStream(t *testing.T) {
	var r readahead
	// Random reads never prefetch.
	for _, off := range []int64{512 << 20, 3 << 30, 64 << 20, 1 << 30} {
		if _, n := r.next(off, 4096); n != 0 {
			t.Fatalf("random read at %d prefetched %d bytes", off, n)
		}
	}
	// Sequential 128 KiB reads, two of them out of order: prefetching
	// starts once raMinRun reads continued the first, covers what follows
	// the stream without gaps or overlaps, and stays at most one window
	// ahead.
	const rs = 128 << 10
	base := int64(2 << 30)
	order := []int64{0, 1, 3, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25}
	var covered int64 // prefetched up to here, from base
	end := int64(0)
	for i, k := range order {
		off := base + k*rs
		pfOff, pfLen := r.next(off, rs)
		end = max(end, off+rs)
		if i < raMinRun {
			if pfLen != 0 {
				t.Fatalf("read %d of a stream prefetched %d bytes", i, pfLen)
			}
			covered = end
			continue
		}
		if pfLen == 0 {
			if covered < end {
				t.Fatalf("read %d ends at %d, past the prefetched %d, and prefetched nothing", i, end, covered)
			}
			continue
		}
		if pfOff != max(covered, end) {
			t.Fatalf("read %d prefetched from %d, want %d", i, pfOff, max(covered, end))
		}
		covered = pfOff + pfLen
		if covered-end > raMaxWindow {
			t.Fatalf("read %d prefetched %d bytes past the stream", i, covered-end)
		}
	}
	if covered < end+raMinWindow/2 {
		t.Fatalf("the stream ends at %d, prefetched only up to %d", end, covered)
	}
	// A jump far from the stream starts over.
	if _, n := r.next(0, rs); n != 0 {
		t.Fatal("a read far from the stream prefetched")
	}
}

// resident says which pages of f are in the page cache.
func resident(t *testing.T, f *os.File, size int) (pages []bool) {
	t.Helper()
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (size+4095)/4096)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	pages = make([]bool, len(vec))
	for i, v := range vec {
		pages[i] = v&1 != 0
	}
	return pages
}

// A destination's descriptor has the kernel's readahead off (a 4 KiB read
// brings in one 4 KiB page, never a large folio around it) and File does
// its own for sequential reads.
func TestDestinationReadahead(t *testing.T) {
	const size = 64 << 20
	content := bytes.Repeat([]byte("nbdclone"), size/8)
	p := tempFile(t, content)
	probe, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	drop := func() {
		t.Helper()
		if err := unix.Fdatasync(int(probe.Fd())); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fadvise(int(probe.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		for i, in := range resident(t, probe, size) {
			if in {
				t.Fatalf("page %d of %s stays cached after POSIX_FADV_DONTNEED: this test needs a disk file system for TMPDIR, not tmpfs", i, p)
			}
		}
	}
	drop()
	d, err := OpenFile(p)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, 128<<10)
	// The kernel reads ahead of a first read at offset 0 (its "initial
	// readahead"), unless readahead is off.
	if _, err := d.ReadAt(buf[:4096], 0); err != nil {
		t.Fatal(err)
	}
	// mincore counts a page once it is read: give a readahead the
	// kernel might have started the time to finish.
	time.Sleep(500 * time.Millisecond)
	var in []int
	for i, r := range resident(t, probe, size) {
		if r {
			in = append(in, i)
		}
	}
	if len(in) != 1 || in[0] != 0 {
		t.Fatalf("a 4 KiB read at offset 0 left pages %v cached, want only page 0", in)
	}

	drop()
	const reads = 4
	for i := range reads {
		if _, err := d.ReadAt(buf, int64(i*len(buf))); err != nil {
			t.Fatal(err)
		}
	}
	// The prefetch's reads complete in the background: mincore counts a
	// page once it is read.
	from, to := reads*len(buf)/4096, (reads*len(buf)+raMinWindow/2)/4096
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		pages := resident(t, probe, size)
		missing := slices.Index(pages[from:to], false)
		if missing < 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %d sequential reads of %d bytes, page %d (offset %d) is not prefetched", reads, len(buf), from+missing, (from+missing)*4096)
		}
	}
}
