package blockdev

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
)

// memSource is an in-memory Reader that counts the bytes read from it and
// can fail reads.
type memSource struct {
	data   []byte
	read   atomic.Int64
	reads  atomic.Int64
	fail   atomic.Int64 // reads left to fail
	closed atomic.Bool
}

var errInjected = errors.New("injected read error")

func (m *memSource) ReadAt(p []byte, off int64) (int, error) {
	if m.fail.Add(-1) >= 0 {
		return 0, errInjected
	}
	m.reads.Add(1)
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	m.read.Add(int64(n))
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memSource) Size() int64             { return int64(len(m.data)) }
func (m *memSource) LogicalBlockSize() int64 { return 512 }
func (m *memSource) Close() error            { m.closed.Store(true); return nil }

func newMem(size int) *memSource {
	m := &memSource{data: make([]byte, size)}
	rand.NewChaCha8([32]byte{9}).Read(m.data)
	return m
}

// TestSharedSourceReadsOnce: 8 users reading the whole source at once, in
// random-sized pieces, get the right bytes, and the source is read about
// once when the cache holds it all (a partial last block included).
func TestSharedSourceReadsOnce(t *testing.T) {
	const size = 4<<20 + 1234
	m := newMem(size)
	s := NewSharedSource(m, 8<<20)
	var wg sync.WaitGroup
	for u := range 8 {
		h := s.Handle(nil)
		wg.Go(func() {
			defer h.Close()
			rng := rand.New(rand.NewPCG(uint64(u), 1))
			for off := int64(0); off < size; {
				n := min(int64(1+rng.IntN(300<<10)), size-off)
				p := make([]byte, n)
				if got, err := h.ReadAt(p, off); err != nil || int64(got) != n {
					t.Errorf("user %d: read %d+%d: %d, %v", u, off, n, got, err)
					return
				}
				if !bytes.Equal(p, m.data[off:off+n]) {
					t.Errorf("user %d: wrong bytes at %d+%d", u, off, n)
					return
				}
				off += n
			}
		})
	}
	wg.Wait()
	if got := m.read.Load(); got != size {
		t.Fatalf("source read %d bytes for 8 readers of %d, want exactly once", got, size)
	}
	st := s.Stats()
	if st.MissBytes != size || st.Users != 0 || st.Hits == 0 || st.Misses != (size+CacheBlock-1)/CacheBlock {
		t.Fatalf("stats %+v", st)
	}
	// Past the end: EOF, short read.
	h := s.Handle(nil)
	p := make([]byte, 100)
	if n, err := h.ReadAt(p, size-10); n != 10 || !errors.Is(err, io.EOF) || !bytes.Equal(p[:10], m.data[size-10:]) {
		t.Fatalf("read across the end: %d, %v", n, err)
	}
	h.Close()
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.ReadAt(p, 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
}

// TestSharedSourceBounded: the cache never holds more than its capacity,
// evicts the least recently used blocks, and re-reads them on demand.
func TestSharedSourceBounded(t *testing.T) {
	m := newMem(16 * CacheBlock)
	s := NewSharedSource(m, 4*CacheBlock)
	h := s.Handle(nil)
	defer h.Close()
	p := make([]byte, CacheBlock)
	read := func(b int64) {
		t.Helper()
		if _, err := h.ReadAt(p, b*CacheBlock); err != nil || !bytes.Equal(p, m.data[b*CacheBlock:(b+1)*CacheBlock]) {
			t.Fatalf("block %d: %v", b, err)
		}
		if st := s.Stats(); st.UsedBytes > st.CapacityBytes {
			t.Fatalf("cache holds %d bytes, capacity %d", st.UsedBytes, st.CapacityBytes)
		}
	}
	for b := range int64(4) {
		read(b)
	}
	read(0) // 0 is now the most recent; 1 the least
	before := m.read.Load()
	read(4) // evicts 1
	read(0)
	if got := m.read.Load() - before; got != CacheBlock {
		t.Fatalf("read %d source bytes for a miss and a hit, want one block", got)
	}
	read(1)
	if got := m.read.Load() - before; got != 2*CacheBlock {
		t.Fatalf("block 1 was not evicted: %d source bytes", got)
	}
	if st := h.(SourceCacheReporter).SourceCacheStats(); st.DeviceHits != 2 || st.DeviceMisses != 6 {
		t.Fatalf("handle stats %+v, want 2 hits 6 misses", st)
	}
}

// TestSharedSourceErrors: a failed fetch is not cached; its readers try
// their piece once more directly, and fail if that fails too; the next
// read fetches again; a capacity of 0 reads through.
func TestSharedSourceErrors(t *testing.T) {
	m := newMem(4 * CacheBlock)
	s := NewSharedSource(m, 4*CacheBlock)
	h := s.Handle(nil)
	p := make([]byte, 2*CacheBlock)
	m.fail.Store(1)
	if _, err := h.ReadAt(p, 0); err != nil || !bytes.Equal(p, m.data[:2*CacheBlock]) {
		t.Fatalf("read with one failure (retried directly): %v", err)
	}
	s.Close() // drops the cache
	m.closed.Store(false)
	m.fail.Store(2)
	if _, err := h.ReadAt(p, 0); !errors.Is(err, errInjected) {
		t.Fatalf("read with a failing source: %v", err)
	}
	if _, err := h.ReadAt(p, 0); err != nil || !bytes.Equal(p, m.data[:2*CacheBlock]) {
		t.Fatalf("read after the failure: %v", err)
	}
	released := false
	h2 := s.Handle(func() { released = true })
	h2.Close()
	h.Close()
	if !released || m.closed.Load() {
		t.Fatalf("release ran %v, source closed %v: handles must not close the shared source", released, m.closed.Load())
	}
	s.Close()
	if !m.closed.Load() {
		t.Fatal("Close did not close the source")
	}

	m = newMem(3 * CacheBlock)
	s = NewSharedSource(m, 0)
	h = s.Handle(nil)
	for range 3 {
		if _, err := h.(ContextReader).ReadAtContext(context.Background(), p[:100], 7); err != nil || !bytes.Equal(p[:100], m.data[7:107]) {
			t.Fatal(err)
		}
	}
	if m.read.Load() != 300 {
		t.Fatalf("uncached reads read %d bytes, want 300", m.read.Load())
	}
}
