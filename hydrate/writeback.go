package hydrate

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// DefaultEvictBehind is how many copied bytes may sit in the destination's
// page cache (dirty or under writeback) before the oldest are waited for
// and dropped.
const DefaultEvictBehind = 32 << 20

// span is a written byte range of the destination.
type span struct{ off, n int64 }

// writeback keeps a copy's data from piling up in the destination's page
// cache, as dm-clone's kcopyd (which bypasses it) and nbdcopy (which evicts
// what it wrote) do: every chunk written starts its writeback at once, and
// once more than limit bytes are behind, the oldest chunk is waited for
// and dropped from the cache. The page cache then holds a small window that
// is reused, not the whole device: no cold pages to fault in, no pressure
// on the host's other users, no backlog for the commit's fdatasync, and
// hydration runs at the destination's speed, not past it.
//
// The waits and drops go through a descriptor of its own: on Linux a
// writeback error is reported once per open file, and sync_file_range's
// wait consumes it for the descriptor it is called on. With a descriptor
// of its own, the destination's descriptor still reports the error at the
// commit's fdatasync, which turns the metadata read-only; an error seen
// here is ignored.
type writeback struct {
	fd    int // own descriptor of the destination, for waits and drops
	limit int64

	mu     sync.Mutex
	ring   []span // written, not yet dropped, oldest first; guarded by mu
	behind int64  // bytes in ring; guarded by mu
}

// newWriteback opens a descriptor of its own on the file behind fd (a
// regular file or a block device). It returns nil when that is not
// possible: copies then only start writeback, as before.
func newWriteback(fd int, limit int64) *writeback {
	if limit <= 0 {
		return nil
	}
	own, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fd), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	return &writeback{fd: own, limit: limit}
}

// written records [off, off+n) as written and returns the spans now to be
// waited for and dropped (the oldest ones past the limit).
func (w *writeback) written(off, n int64) []span {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ring = append(w.ring, span{off, n})
	w.behind += n
	k := 0
	for w.behind > w.limit && k < len(w.ring) {
		w.behind -= w.ring[k].n
		k++
	}
	if k == 0 {
		return nil
	}
	out := append([]span(nil), w.ring[:k]...)
	w.ring = append(w.ring[:0], w.ring[k:]...)
	return out
}

// drop waits for the spans' writeback and drops them from the page cache.
// Only a hint: errors are left to the destination's fdatasync.
func (w *writeback) drop(spans []span) {
	for _, s := range spans {
		unix.SyncFileRange(w.fd, s.off, s.n,
			unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
		unix.Fadvise(w.fd, s.off, s.n, unix.FADV_DONTNEED)
	}
}

// close releases the descriptor.
func (w *writeback) close() {
	w.mu.Lock()
	w.ring = nil
	w.mu.Unlock()
	unix.Close(w.fd)
}
