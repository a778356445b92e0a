package hydrate

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdclone/nbdclone/blockdev"
)

// DefaultChunk is the largest single read/write a copy issues.
const DefaultChunk = 1 << 20

// CopierOptions configure a Copier.
type CopierOptions struct {
	// Chunk is the largest single read or write; 0 means DefaultChunk.
	Chunk int
	// InFlightBytes, when positive, lets each copy keep several chunks in
	// flight at once, with at most InFlightBytes in flight over all copies
	// together: what a remote source needs to hide its round trip. 0 copies
	// one chunk at a time (local devices, dm-clone's kcopyd).
	InFlightBytes int64
	// ObserveRead, if set, is told how long each source read took (for
	// a latency histogram; it must not block).
	ObserveRead func(time.Duration)
	// EvictBehind is how many copied bytes may stay in the destination's
	// page cache before the oldest are waited for and dropped (see
	// writeback); 0 means DefaultEvictBehind, negative keeps them cached.
	EvictBehind int64
}

// zeroer is the destination's efficient zeroing (blockdev.Device has it).
type zeroer interface {
	WriteZeroes(off, n int64) error
}

// Copier copies byte ranges from a source to a destination at the same
// offset, through pooled buffers. Where the source can map its holes
// (blockdev.Mapper) and the destination can zero, ranges the source
// reports as zeroes are zeroed on the destination instead of transferred.
type Copier struct {
	src   io.ReaderAt
	dst   io.WriterAt
	zero  zeroer          // nil: holes are copied like data
	mapr  blockdev.Mapper // nil: the source is all data
	chunk int
	pool  sync.Pool
	// slots holds one token per chunk in flight over all copies; nil when
	// each copy moves one chunk at a time.
	slots chan struct{}
	// fd is the destination's descriptor for writeback hints; -1 if none.
	fd int
	// writer, for a regular file destination, lets one write in at a time:
	// the kernel serialises a file's buffered writes on its inode lock, and
	// more writers only spin on that lock (a whole CPU on a small machine)
	// and switch threads. nil: writes are not limited (block devices).
	writer chan struct{}
	// observeRead times source reads; nil when nobody asked.
	observeRead func(time.Duration)
	// wb drops copied chunks from the destination's page cache once
	// written back; nil when the destination has no descriptor.
	wb *writeback
	// srcFd, when the source and the destination are both regular files,
	// is the source's descriptor: chunks are copied in the kernel with
	// copy_file_range (no copy through user memory; a reflink where the
	// filesystem shares extents); -1 otherwise. noCFR is set once the
	// kernel said it cannot copy between these files.
	srcFd int
	noCFR atomic.Bool

	copiedBytes atomic.Int64
	holeBytes   atomic.Int64
	errors      atomic.Uint64
}

// NewCopier returns a copier from src to dst.
func NewCopier(src io.ReaderAt, dst io.WriterAt, opts CopierOptions) *Copier {
	chunk := opts.Chunk
	if chunk <= 0 {
		chunk = DefaultChunk
	}
	c := &Copier{src: src, dst: dst, chunk: chunk, fd: -1, srcFd: -1, observeRead: opts.ObserveRead}
	if f, ok := dst.(interface{ Fd() uintptr }); ok {
		c.fd = int(f.Fd())
		if isRegular(c.fd) {
			c.writer = make(chan struct{}, 1)
			if s, ok := src.(interface{ Fd() uintptr }); ok && isRegular(int(s.Fd())) {
				c.srcFd = int(s.Fd())
			}
		}
		behind := opts.EvictBehind
		if behind == 0 {
			behind = DefaultEvictBehind
		}
		c.wb = newWriteback(c.fd, behind)
	}
	c.pool.New = func() any { b := make([]byte, chunk); return &b }
	if z, ok := dst.(zeroer); ok {
		if m, ok := src.(blockdev.Mapper); ok {
			c.zero, c.mapr = z, m
		}
	}
	if opts.InFlightBytes > 0 {
		c.slots = make(chan struct{}, max(1, opts.InFlightBytes/int64(chunk)))
	}
	return c
}

// Copy copies [off, off+n). ctx is checked between chunks: a chunk that
// has started finishes. Nothing partial is reported as success: any
// failure fails the whole copy. The chunks leave the destination's page
// cache once written back (see writeback): background hydration.
func (c *Copier) Copy(ctx context.Context, off, n int64) error { return c.copy(ctx, off, n, true) }

// CopyCached is Copy for data about to be used (NBD_CMD_CACHE, the copy
// before a partial write): the chunks stay in the page cache.
func (c *Copier) CopyCached(ctx context.Context, off, n int64) error {
	return c.copy(ctx, off, n, false)
}

func (c *Copier) copy(ctx context.Context, off, n int64, evict bool) error {
	err := c.copyMapped(ctx, off, n, evict)
	if err != nil {
		c.errors.Add(1)
	}
	return err
}

// copyMapped zeroes the source's zero extents and copies the rest. A
// source that cannot map the range (or fails to) is copied as data.
func (c *Copier) copyMapped(ctx context.Context, off, n int64, evict bool) error {
	if c.mapr == nil {
		return c.copyData(ctx, off, n, evict)
	}
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		exts, err := c.mapr.Map(off, n)
		if err != nil || len(exts) == 0 {
			return c.copyData(ctx, off, n, evict)
		}
		for _, e := range exts {
			k := min(e.Length, n)
			if k <= 0 {
				return c.copyData(ctx, off, n, evict)
			}
			if e.Zero {
				if err := c.zero.WriteZeroes(off, k); err != nil {
					return fmt.Errorf("hydrate: zero destination at %d+%d: %w", off, k, err)
				}
				c.holeBytes.Add(k)
			} else if err := c.copyData(ctx, off, k, evict); err != nil {
				return err
			}
			off += k
			n -= k
			if n == 0 {
				break
			}
		}
	}
	return nil
}

func (c *Copier) copyData(ctx context.Context, off, n int64, evict bool) error {
	switch {
	case c.slots == nil:
		return c.copySerial(ctx, off, n, evict)
	case n <= int64(c.chunk):
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		defer func() { <-c.slots }()
		return c.copySerial(ctx, off, n, evict)
	default:
		return c.copyParallel(ctx, off, n, evict)
	}
}

func (c *Copier) copySerial(ctx context.Context, off, n int64, evict bool) error {
	bp := c.pool.Get().(*[]byte)
	defer c.pool.Put(bp)
	buf := *bp
	for n > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		k := min(n, int64(len(buf)))
		if err := c.copyChunk(ctx, buf[:k], off, evict); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// copyParallel keeps several chunks of one copy in flight, within the
// copier-wide budget of slots.
func (c *Copier) copyParallel(ctx context.Context, off, n int64, evict bool) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	failed := func() bool { mu.Lock(); defer mu.Unlock(); return first != nil }
	for n > 0 && !failed() {
		if err := ctx.Err(); err != nil {
			mu.Lock()
			first = err
			mu.Unlock()
			break
		}
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			continue
		}
		k, at := min(n, int64(c.chunk)), off
		wg.Go(func() {
			defer func() { <-c.slots }()
			bp := c.pool.Get().(*[]byte)
			defer c.pool.Put(bp)
			if err := c.copyChunk(ctx, (*bp)[:k], at, evict); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		})
		off += k
		n -= k
	}
	wg.Wait()
	return first
}

func (c *Copier) copyChunk(ctx context.Context, buf []byte, off int64, evict bool) error {
	start := time.Now()
	inKernel, err := c.copyInKernel(off, int64(len(buf)))
	if err != nil {
		err = fmt.Errorf("hydrate: copy_file_range at %d+%d: %w", off, len(buf), err)
	} else if !inKernel {
		if _, err = blockdev.ReadFullAt(ctx, c.src, buf, off); err != nil {
			err = fmt.Errorf("hydrate: read source at %d+%d: %w", off, len(buf), err)
		}
	}
	if c.observeRead != nil {
		c.observeRead(time.Since(start)) // for copy_file_range, the whole in-kernel copy
	}
	if err != nil {
		return err
	}
	if !inKernel {
		if err := c.write(buf, off); err != nil {
			return fmt.Errorf("hydrate: write destination at %d+%d: %w", off, len(buf), err)
		}
	}
	if c.fd >= 0 {
		// Start writing the chunk back now, as nbdcopy does: dirty pages
		// never pile up for the kernel to throttle, and the commit's
		// fdatasync finds little left to do. Only a hint: errors surface
		// at that fdatasync.
		unix.SyncFileRange(c.fd, off, int64(len(buf)), unix.SYNC_FILE_RANGE_WRITE)
	}
	if c.wb != nil && evict {
		c.wb.drop(c.wb.written(off, int64(len(buf))))
	}
	c.copiedBytes.Add(int64(len(buf)))
	return nil
}

// isRegular reports whether fd is a regular file.
func isRegular(fd int) bool {
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG
}

// copyInKernel copies [off, off+n) with copy_file_range where the source
// and the destination are regular files. done is false when it did not try
// (or the kernel cannot do it for these files: then never again, and
// nothing was written); a source that ends early is an error, as a short
// read is.
func (c *Copier) copyInKernel(off, n int64) (done bool, err error) {
	if c.srcFd < 0 || c.noCFR.Load() {
		return false, nil
	}
	if c.writer != nil {
		c.writer <- struct{}{}
		defer func() { <-c.writer }()
	}
	roff, woff := off, off
	for n > 0 {
		k, err := unix.CopyFileRange(c.srcFd, &roff, c.fd, &woff, int(n), 0)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil && roff == off && (err == unix.EXDEV || err == unix.EINVAL || err == unix.EOPNOTSUPP || err == unix.ENOSYS):
			c.noCFR.Store(true) // nothing copied yet: the read/write path takes over
			return false, nil
		case err != nil:
			return true, err
		case k == 0:
			return true, io.ErrUnexpectedEOF // the source ends before the range does
		}
		n -= int64(k)
	}
	return true, nil
}

// write writes buf at off, one writer at a time where that is what the
// destination does anyway.
func (c *Copier) write(buf []byte, off int64) error {
	if c.writer != nil {
		c.writer <- struct{}{}
		defer func() { <-c.writer }()
	}
	_, err := c.dst.WriteAt(buf, off)
	return err
}

// Close releases the copier's own descriptor of the destination. Copies
// must have ended.
func (c *Copier) Close() {
	if c.wb != nil {
		c.wb.close()
	}
}

// CopiedBytes is the number of bytes read from the source and written so
// far.
func (c *Copier) CopiedBytes() int64 { return c.copiedBytes.Load() }

// HoleBytes is the number of bytes zeroed on the destination because the
// source reported them as zeroes: hydrated without a transfer.
func (c *Copier) HoleBytes() int64 { return c.holeBytes.Load() }

// Errors is the number of failed copies.
func (c *Copier) Errors() uint64 { return c.errors.Load() }
