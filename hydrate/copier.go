package hydrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// DefaultChunk is the largest single read/write a copy issues.
const DefaultChunk = 1 << 20

// Copier copies byte ranges from a source to a destination at the same
// offset, through pooled buffers.
type Copier struct {
	src   io.ReaderAt
	dst   io.WriterAt
	chunk int
	pool  sync.Pool

	copiedBytes atomic.Int64
	errors      atomic.Uint64
}

// NewCopier returns a copier moving at most chunk bytes per I/O (0 means
// DefaultChunk).
func NewCopier(src io.ReaderAt, dst io.WriterAt, chunk int) *Copier {
	if chunk <= 0 {
		chunk = DefaultChunk
	}
	c := &Copier{src: src, dst: dst, chunk: chunk}
	c.pool.New = func() any { b := make([]byte, chunk); return &b }
	return c
}

// Copy copies [off, off+n). ctx is checked between chunks: a copy that has
// started its last chunk finishes it.
func (c *Copier) Copy(ctx context.Context, off, n int64) error {
	bp := c.pool.Get().(*[]byte)
	defer c.pool.Put(bp)
	buf := *bp
	for n > 0 {
		if err := ctx.Err(); err != nil {
			c.errors.Add(1)
			return err
		}
		k := min(n, int64(len(buf)))
		if err := readFull(c.src, buf[:k], off); err != nil {
			c.errors.Add(1)
			return fmt.Errorf("hydrate: read source at %d+%d: %w", off, k, err)
		}
		if _, err := c.dst.WriteAt(buf[:k], off); err != nil {
			c.errors.Add(1)
			return fmt.Errorf("hydrate: write destination at %d+%d: %w", off, k, err)
		}
		c.copiedBytes.Add(k)
		off += k
		n -= k
	}
	return nil
}

// CopiedBytes is the number of bytes copied so far.
func (c *Copier) CopiedBytes() int64 { return c.copiedBytes.Load() }

// Errors is the number of failed copies.
func (c *Copier) Errors() uint64 { return c.errors.Load() }

// readFull reads len(p) bytes at off; a short read is an error (a source
// must cover the target).
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("short read: %d of %d bytes: %w", n, len(p), io.ErrUnexpectedEOF)
	}
	return err
}
