package daemon

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/nbdclone/nbdclone/internal/histogram"
	"github.com/nbdclone/nbdclone/nbdserver"
)

// ioOp is an NBD request type, as the metrics' op label names it.
type ioOp uint8

const (
	opRead ioOp = iota
	opWrite
	opTrim
	opWriteZeroes
	opFlush
	opCache
	opBlockStatus
	numOps
)

func (o ioOp) String() string {
	switch o {
	case opRead:
		return "read"
	case opWrite:
		return "write"
	case opTrim:
		return "trim"
	case opWriteZeroes:
		return "write_zeroes"
	case opFlush:
		return "flush"
	case opCache:
		return "cache"
	default:
		return "block_status"
	}
}

// opStats are one op's counters. All atomic: the I/O path takes no lock
// and allocates nothing to count (histogram.Histogram).
type opStats struct {
	requests atomic.Uint64
	errors   atomic.Uint64
	bytes    atomic.Uint64
	latency  *histogram.Histogram
}

// ioStats count a device's NBD requests, over every table it had: they
// live as long as the device.
type ioStats struct {
	ops      [numOps]opStats
	inFlight atomic.Int64
	// spliced counts read bytes that went from a file to the socket
	// without a copy (they count in ops[opRead] too), splicedWrites write
	// bytes that went from the socket to a file without one (in
	// ops[opWrite] too).
	spliced, splicedWrites atomic.Uint64
}

func newIOStats() *ioStats {
	s := &ioStats{}
	for i := range s.ops {
		s.ops[i].latency = histogram.New(nil)
	}
	return s
}

func (s *ioStats) start() time.Time {
	s.inFlight.Add(1)
	return time.Now()
}

// done counts one request of op over n bytes that started at start.
func (s *ioStats) done(op ioOp, n int64, start time.Time, err error) {
	o := &s.ops[op]
	o.latency.Since(start)
	o.requests.Add(1)
	o.bytes.Add(uint64(max(n, 0)))
	if err != nil {
		o.errors.Add(1)
	}
	s.inFlight.Add(-1)
}

// meteredExport is the export NBD connections get: the device, each
// request counted and timed. Everything else is the device's.
type meteredExport struct{ *device }

var (
	_ nbdserver.Export       = meteredExport{}
	_ nbdserver.Extenter     = meteredExport{}
	_ nbdserver.Splicer      = meteredExport{}
	_ nbdserver.SpliceWriter = meteredExport{}
)

func (d *device) metered() nbdserver.Export { return meteredExport{d} }

func (m meteredExport) ReadAt(ctx context.Context, p []byte, off int64) error {
	t := m.io.start()
	err := m.device.ReadAt(ctx, p, off)
	m.io.done(opRead, int64(len(p)), t, err)
	return err
}

// SpliceTo counts a spliced READ, whatever its pieces, as one read. A
// failed one is not counted: the server reads the range again with
// ReadAt, which counts it.
func (m meteredExport) SpliceTo(ctx context.Context, pieces []nbdserver.SplicePiece, dataOnly bool) error {
	t := m.io.start()
	if err := m.device.SpliceTo(ctx, pieces, dataOnly); err != nil {
		m.io.inFlight.Add(-1)
		return err
	}
	var n int
	for _, p := range pieces {
		n += p.N
	}
	m.io.spliced.Add(uint64(n))
	m.io.done(opRead, int64(n), t, nil)
	return nil
}

// SpliceFrom counts a spliced WRITE, whatever its pieces, as one write.
// One the device would not take (ErrNoSplice) is not counted: the server
// writes it with WriteAt, which counts it.
func (m meteredExport) SpliceFrom(ctx context.Context, pieces []nbdserver.SplicePiece, fua bool) error {
	t := m.io.start()
	err := m.device.SpliceFrom(ctx, pieces, fua)
	if errors.Is(err, nbdserver.ErrNoSplice) {
		m.io.inFlight.Add(-1)
		return err
	}
	var n int
	for _, p := range pieces {
		n += p.N
	}
	if err == nil {
		m.io.splicedWrites.Add(uint64(n))
	}
	m.io.done(opWrite, int64(n), t, err)
	return err
}

func (m meteredExport) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	t := m.io.start()
	err := m.device.WriteAt(ctx, p, off, fua)
	m.io.done(opWrite, int64(len(p)), t, err)
	return err
}

func (m meteredExport) WriteZeroes(ctx context.Context, off, n int64, fua, noHole, fastZero bool) error {
	t := m.io.start()
	err := m.device.WriteZeroes(ctx, off, n, fua, noHole, fastZero)
	m.io.done(opWriteZeroes, n, t, err)
	return err
}

func (m meteredExport) Trim(ctx context.Context, off, n int64, fua bool) error {
	t := m.io.start()
	err := m.device.Trim(ctx, off, n, fua)
	m.io.done(opTrim, n, t, err)
	return err
}

func (m meteredExport) Flush(ctx context.Context) error {
	t := m.io.start()
	err := m.device.Flush(ctx)
	m.io.done(opFlush, 0, t, err)
	return err
}

func (m meteredExport) Cache(ctx context.Context, off, n int64) error {
	t := m.io.start()
	err := m.device.Cache(ctx, off, n)
	m.io.done(opCache, n, t, err)
	return err
}

func (m meteredExport) Extents(ctx context.Context, metaContext string, off, n int64, maxExtents int) ([]nbdserver.Extent, error) {
	t := m.io.start()
	out, err := m.device.Extents(ctx, metaContext, off, n, maxExtents)
	m.io.done(opBlockStatus, n, t, err)
	return out, err
}
