package blockdev

import (
	"sync"

	"golang.org/x/sys/unix"
)

// A destination is opened with POSIX_FADV_RANDOM, which turns the kernel's
// readahead off for its descriptor. The kernel's readahead fills the page
// cache with large folios (up to 2 MiB on ext4 since 6.16, on XFS since
// 5.18), and a 4 KiB write into a large folio costs a whole folio's
// writeback: on these machines 4 KiB random writes at QD32 ran at 15K IOPS
// over a file read sequentially before, 110K over one that was not (for
// nbdclone and nbdkit alike). Reads with POSIX_FADV_RANDOM, and
// POSIX_FADV_WILLNEED, use 4 KiB pages. Without readahead, though, cold
// sequential reads of 128 KiB (a kernel client's usual size) ran at half
// speed, so readahead is done here: a read that continues a sequential
// stream prefetches the window after it with POSIX_FADV_WILLNEED, which
// starts the reads and does not wait for them.
const (
	raSlack     = 4 << 20 // how far from the stream's end a read still continues it
	raMinWindow = 2 << 20 // prefetch window: 16 reads ahead, within these bounds
	raMaxWindow = 16 << 20
	raMinRun    = 2 // reads that continue a stream before it is prefetched
)

// readahead follows one sequential stream of reads, out of order by up to
// raSlack (requests in flight complete in any order).
type readahead struct {
	mu    sync.Mutex
	end   int64 // the highest end of the stream's reads
	ahead int64 // prefetched up to here
	run   int   // reads in a row that continued the stream
}

// next records a read of n bytes at off and returns the range to prefetch,
// if any (n == 0: none).
func (r *readahead) next(off, n int64) (pfOff, pfLen int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	end := off + n
	if off > r.end+raSlack || end < r.end-raSlack {
		r.end, r.ahead, r.run = end, end, 0
		return 0, 0
	}
	r.run++
	r.end = max(r.end, end)
	if r.run < raMinRun {
		return 0, 0
	}
	window := min(max(16*n, raMinWindow), raMaxWindow)
	if r.ahead >= r.end+window/2 {
		return 0, 0 // far enough ahead already
	}
	from := max(r.ahead, r.end)
	r.ahead = r.end + window
	return from, r.ahead - from
}

// prefetch starts reading [off, off+n) into the page cache. It is advice:
// its failure changes nothing but speed, so it is not reported.
func prefetch(fd uintptr, off, n int64) {
	_ = unix.Fadvise(int(fd), off, n, unix.FADV_WILLNEED)
}
