package blockdev

import (
	"container/list"
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// CacheBlock is the unit of a SharedSource's cache: reads are widened to
// whole aligned blocks of this size, and a block is fetched from the source
// once however many readers want it at the same time.
const CacheBlock = 64 << 10

// SharedSource is one source reader shared by several users (the clones of
// one daemon that name the same source), with a bounded LRU cache of the
// blocks read most recently. Concurrent misses on the same block make one
// source read; the others wait for it. Cached bytes are immutable, so a
// reader copies out of a block without holding a lock. A capacity of 0
// shares the reader without caching.
type SharedSource struct {
	src      Reader
	capacity int64

	mu sync.Mutex
	// Guarded by mu.
	blocks map[int64]*cacheBlock // block index → a block being fetched or cached
	lru    list.List             // cached blocks, most recent first
	used   int64                 // bytes of cached blocks
	users  int

	hits, misses         atomic.Uint64 // block lookups
	hitBytes, missBytes  atomic.Int64  // bytes served from the cache / read from the source
	fetches, fetchErrors atomic.Uint64
}

type cacheBlock struct {
	idx   int64
	ready chan struct{} // closed once data or err is set
	data  []byte        // immutable once ready
	err   error
	elem  *list.Element // in lru; nil while fetching or once evicted
}

// NewSharedSource shares src with a cache of at most capacity bytes.
func NewSharedSource(src Reader, capacity int64) *SharedSource {
	return &SharedSource{src: src, capacity: max(0, capacity), blocks: map[int64]*cacheBlock{}}
}

// SourceCacheStats are a shared source's counters, and one user's share.
type SourceCacheStats struct {
	CapacityBytes int64 `json:"capacity_bytes"`
	UsedBytes     int64 `json:"used_bytes"`
	// Users are the open handles (the clones sharing the source).
	Users int `json:"users"`
	// Hits and Misses count block lookups of every user: a hit found the
	// block cached or being fetched by another reader.
	Hits   uint64 `json:"hits"`
	Misses uint64 `json:"misses"`
	// HitBytes were served from the cache, MissBytes read from the source
	// (whole blocks), by every user.
	HitBytes  int64 `json:"hit_bytes"`
	MissBytes int64 `json:"miss_bytes"`
	// DeviceHits and DeviceMisses are this handle's own lookups.
	DeviceHits   uint64 `json:"device_hits"`
	DeviceMisses uint64 `json:"device_misses"`
}

// SourceCacheReporter is implemented by a SharedSource's handles.
type SourceCacheReporter interface {
	SourceCacheStats() SourceCacheStats
}

// Handle returns a Reader for one user. Its Close calls release (once)
// instead of closing the shared reader: the owner closes that with Close
// when the last user left. A handle of a remote source is also a Remote and
// an Identifier, one of a local file has its descriptor (Fd) and is a
// Splicer; every handle is a Mapper and a ContextReader.
func (s *SharedSource) Handle(release func()) Reader {
	s.mu.Lock()
	s.users++
	s.mu.Unlock()
	h := &sourceHandle{s: s, release: release}
	if _, ok := s.src.(Remote); ok {
		return &remoteHandle{h}
	}
	if _, ok := s.src.(interface{ Fd() uintptr }); ok {
		return &fileHandle{h}
	}
	return h
}

// Close closes the shared reader and drops the cache.
func (s *SharedSource) Close() error {
	s.mu.Lock()
	s.blocks = map[int64]*cacheBlock{}
	s.lru.Init()
	s.used = 0
	s.mu.Unlock()
	return s.src.Close()
}

// Stats is a snapshot of the shared counters.
func (s *SharedSource) Stats() SourceCacheStats {
	s.mu.Lock()
	used, users := s.used, s.users
	s.mu.Unlock()
	return SourceCacheStats{
		CapacityBytes: s.capacity, UsedBytes: used, Users: users,
		Hits: s.hits.Load(), Misses: s.misses.Load(),
		HitBytes: s.hitBytes.Load(), MissBytes: s.missBytes.Load(),
	}
}

// readAt fills p from [off, off+len(p)) of the source (clipped to its size)
// through the cache; h counts the caller's lookups.
func (s *SharedSource) readAt(ctx context.Context, h *sourceHandle, p []byte, off int64) (int, error) {
	size := s.src.Size()
	if off < 0 {
		return 0, fmt.Errorf("blockdev: negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	n := int64(len(p))
	var eof error
	if off+n > size {
		n, eof = size-off, io.EOF
	}
	if n == 0 {
		return 0, eof
	}
	if s.capacity == 0 {
		got, err := ReadFullAt(ctx, s.src, p[:n], off)
		s.missBytes.Add(int64(got))
		if err == nil {
			err = eof
		}
		return got, err
	}
	first, last := off/CacheBlock, (off+n-1)/CacheBlock
	blocks := make([]*cacheBlock, 0, last-first+1)
	var claimed []*cacheBlock
	s.mu.Lock()
	for idx := first; idx <= last; idx++ {
		b := s.blocks[idx]
		switch {
		case b == nil:
			b = &cacheBlock{idx: idx, ready: make(chan struct{})}
			s.blocks[idx] = b
			claimed = append(claimed, b)
		case b.elem != nil:
			s.lru.MoveToFront(b.elem)
		}
		blocks = append(blocks, b)
	}
	s.mu.Unlock()
	hits := uint64(len(blocks) - len(claimed))
	s.hits.Add(hits)
	s.misses.Add(uint64(len(claimed)))
	h.hits.Add(hits)
	h.misses.Add(uint64(len(claimed)))

	// Fetch the claimed blocks, one source read per contiguous run. The
	// fetch is not cancelled with the caller: other readers may wait on it.
	fctx := context.WithoutCancel(ctx)
	for i := 0; i < len(claimed); {
		j := i + 1
		for j < len(claimed) && claimed[j].idx == claimed[j-1].idx+1 {
			j++
		}
		s.fetch(fctx, claimed[i:j], size)
		i = j
	}

	end := off + n
	for _, b := range blocks {
		bStart := b.idx * CacheBlock
		lo, hi := max(off, bStart), min(end, bStart+CacheBlock)
		dst := p[lo-off : hi-off]
		select {
		case <-b.ready:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		if b.err != nil {
			// Another reader's fetch failed: try this piece directly.
			got, err := ReadFullAt(ctx, s.src, dst, lo)
			s.missBytes.Add(int64(got))
			if err != nil {
				return 0, err
			}
			continue
		}
		if int64(len(b.data)) < hi-bStart {
			return 0, fmt.Errorf("blockdev: cached block %d is short (%d bytes): %w", b.idx, len(b.data), io.ErrUnexpectedEOF)
		}
		copy(dst, b.data[lo-bStart:hi-bStart])
		if !slicesContain(claimed, b) {
			s.hitBytes.Add(hi - lo)
		}
	}
	return int(n), eof
}

func slicesContain(bs []*cacheBlock, b *cacheBlock) bool {
	for _, x := range bs {
		if x == b {
			return true
		}
	}
	return false
}

// fetch reads the contiguous blocks run from the source and publishes them
// (or their error) to every waiter.
func (s *SharedSource) fetch(ctx context.Context, run []*cacheBlock, size int64) {
	start := run[0].idx * CacheBlock
	end := min(size, (run[len(run)-1].idx+1)*CacheBlock)
	buf := make([]byte, end-start)
	got, err := ReadFullAt(ctx, s.src, buf, start)
	s.fetches.Add(1)
	s.missBytes.Add(int64(got))
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range run {
		if err != nil {
			s.fetchErrors.Add(1)
			b.err = err
			if s.blocks[b.idx] == b {
				delete(s.blocks, b.idx)
			}
			close(b.ready)
			continue
		}
		bs := b.idx*CacheBlock - start
		b.data = append([]byte(nil), buf[bs:min(bs+CacheBlock, int64(len(buf)))]...)
		close(b.ready)
		if s.blocks[b.idx] != b {
			continue // dropped by Close meanwhile
		}
		b.elem = s.lru.PushFront(b)
		s.used += int64(len(b.data))
	}
	s.evictLocked()
}

// evictLocked drops the least recently used blocks beyond the capacity.
func (s *SharedSource) evictLocked() {
	for s.used > s.capacity {
		e := s.lru.Back()
		if e == nil {
			return
		}
		b := e.Value.(*cacheBlock)
		s.lru.Remove(e)
		b.elem = nil
		s.used -= int64(len(b.data))
		delete(s.blocks, b.idx)
	}
}

// sourceHandle is one user's view of a SharedSource.
type sourceHandle struct {
	s            *SharedSource
	release      func()
	closed       atomic.Bool
	hits, misses atomic.Uint64
}

func (h *sourceHandle) ReadAt(p []byte, off int64) (int, error) {
	return h.ReadAtContext(context.Background(), p, off)
}

func (h *sourceHandle) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if h.closed.Load() {
		return 0, ErrClosed
	}
	return h.s.readAt(ctx, h, p, off)
}

func (h *sourceHandle) Size() int64             { return h.s.src.Size() }
func (h *sourceHandle) LogicalBlockSize() int64 { return h.s.src.LogicalBlockSize() }

// Map is the source's map, or all data when the source has none.
func (h *sourceHandle) Map(off, n int64) ([]Extent, error) {
	if m, ok := h.s.src.(Mapper); ok {
		return m.Map(off, n)
	}
	return []Extent{{Length: n}}, nil
}

// SourceID is the source's pin, or "".
func (h *sourceHandle) SourceID() string {
	if id, ok := h.s.src.(Identifier); ok {
		return id.SourceID()
	}
	return ""
}

func (h *sourceHandle) SourceCacheStats() SourceCacheStats {
	st := h.s.Stats()
	st.DeviceHits, st.DeviceMisses = h.hits.Load(), h.misses.Load()
	return st
}

// Close releases this user's share; idempotent.
func (h *sourceHandle) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	h.s.mu.Lock()
	h.s.users--
	h.s.mu.Unlock()
	if h.release != nil {
		h.release()
	}
	return nil
}

// remoteHandle is a handle of a remote source: it keeps the source's
// window, so a clone hides its round trips as it would without sharing.
type remoteHandle struct{ *sourceHandle }

// fileHandle is a handle of a local file or block device: it gives the
// copier the descriptor for copy_file_range, and a server reads spliced
// into a pipe, both bypassing the cache (the kernel's page cache shares a
// local source between clones already).
type fileHandle struct{ *sourceHandle }

func (h *fileHandle) Fd() uintptr { return h.s.src.(interface{ Fd() uintptr }).Fd() }

func (h *fileHandle) SpliceTo(ctx context.Context, pipe int, off int64, n int, dataOnly bool) error {
	if h.closed.Load() {
		return ErrClosed
	}
	s, ok := h.s.src.(Splicer)
	if !ok {
		return ErrNoSplice
	}
	return s.SpliceTo(ctx, pipe, off, n, dataOnly)
}

func (h *remoteHandle) Window() (int64, int64)   { return h.s.src.(Remote).Window() }
func (h *remoteHandle) RemoteStats() RemoteStats { return h.s.src.(Remote).RemoteStats() }
