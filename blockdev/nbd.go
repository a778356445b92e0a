package blockdev

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// NBDOptions configure an NBD source. Zero values mean the defaults.
type NBDOptions struct {
	// Connections is how many connections to keep when the server offers
	// multi-conn (one otherwise). Default 4.
	Connections int
	// InFlight is the number of requests in flight per connection.
	// Default 64.
	InFlight int
	// RequestBytes is the largest read sent as one request (also capped by
	// the server's maximum block size). Default 1 MiB.
	RequestBytes int64
	// WindowBytes is how many bytes a copier should keep in flight to fill
	// the link (bandwidth × round trip, with room). Default 64 MiB.
	WindowBytes int64
	// ConnectTimeout bounds one connection's dial and handshake.
	// Default 10 s.
	ConnectTimeout time.Duration
	// RequestTimeout bounds one request: a request without its reply by
	// then drops its connection (its other requests are retried on a new
	// one). Default 30 s.
	RequestTimeout time.Duration
	// Retry bounds each call (attempts, backoff, total time).
	Retry RetryPolicy
	// TLSConfig is the base TLS configuration of nbds:// sources (roots,
	// client certificates); the URI's tls-certificates directory adds its
	// ca-cert.pem. Nil means the system roots. Verification is on unless
	// the URI says tls-verify-peer=false.
	TLSConfig *tls.Config
	// NoBlockStatus: do not negotiate base:allocation (tests, or servers
	// whose extents cannot be trusted).
	NoBlockStatus bool
	Logger        *slog.Logger
}

func (o *NBDOptions) setDefaults() {
	if o.Connections <= 0 {
		o.Connections = 4
	}
	if o.InFlight <= 0 {
		o.InFlight = 64
	}
	if o.RequestBytes <= 0 {
		o.RequestBytes = 1 << 20
	}
	if o.WindowBytes <= 0 {
		o.WindowBytes = DefaultWindowBytes
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 10 * time.Second
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 30 * time.Second
	}
	o.Retry = o.Retry.withDefaults()
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// NBD is an NBD export used read-only: a clone's source. It keeps one
// connection, or several when the server offers multi-conn, each with many
// requests in flight; dropped connections are re-established on demand and
// failed requests retried (RetryPolicy). A read that cannot be served
// returns an error within Retry.Timeout: never partial or wrong data.
type NBD struct {
	uri    string
	addr   nbdAddress
	opts   NBDOptions
	log    *slog.Logger
	info   nbdInfo // of the first connection; later ones must match
	want   int     // connections to keep
	reqMax int64   // largest request, a multiple of the minimum block size

	mapMu    sync.Mutex
	mapCache map[int64]*mapEntry // guarded by mapMu; by window start

	closeCtx    context.Context
	closeCancel context.CancelFunc
	dials       sync.WaitGroup

	mu sync.Mutex
	// The fields below are guarded by mu.
	conns        []*nbdConn // live or not yet found dead
	rr           int
	dialing      bool
	dialDone     chan struct{} // closed when the dial in progress ends
	dialErr      error         // of the last dial
	extraRetryAt time.Time     // a refused extra connection is not retried before
	closed       bool
	lost         uint64

	requests, retries, reconnects, failures atomic.Uint64
}

var (
	_ Reader        = (*NBD)(nil)
	_ Mapper        = (*NBD)(nil)
	_ ContextReader = (*NBD)(nil)
	_ Remote        = (*NBD)(nil)
)

// OpenNBD connects to an NBD export given by URI
// (nbd://host[:port]/export, nbd+unix:///export?socket=PATH, or nbds
// variants with TLS) and negotiates read-only use.
func OpenNBD(ctx context.Context, uri string, opts NBDOptions) (*NBD, error) {
	opts.setDefaults()
	a, err := parseNBDURI(uri)
	if err != nil {
		return nil, err
	}
	closeCtx, cancel := context.WithCancel(context.Background())
	d := &NBD{uri: uri, addr: a, opts: opts, log: opts.Logger.With("source", uri), closeCtx: closeCtx, closeCancel: cancel,
		mapCache: map[int64]*mapEntry{}}
	var first *nbdConn
	err = retry(ctx, opts.Retry, "blockdev: connect to "+uri, func(ctx context.Context) error {
		cctx, ccancel := context.WithTimeout(ctx, opts.ConnectTimeout)
		defer ccancel()
		c, err := dialNBD(cctx, a, &d.opts)
		first = c
		return err
	}, nil)
	if err != nil {
		cancel()
		return nil, err
	}
	d.info = first.info
	d.want = 1
	if d.info.multiConn() {
		d.want = opts.Connections
	}
	mb := int64(d.info.minBlock)
	d.reqMax = max(mb, min(opts.RequestBytes, int64(d.info.maxBlock))/mb*mb)
	d.conns = []*nbdConn{first}
	d.mu.Lock()
	d.maybeDialLocked(false)
	d.mu.Unlock()
	d.log.Info("NBD source connected", "size", d.info.size, "multi_conn", d.info.multiConn(),
		"structured_replies", d.info.structured, "block_status", d.info.hasMeta,
		"block_size_min", d.info.minBlock, "block_size_max", d.info.maxBlock)
	return d, nil
}

func (d *NBD) Size() int64 { return d.info.size }

// LogicalBlockSize is the server's minimum block size, at least a sector.
func (d *NBD) LogicalBlockSize() int64 { return max(512, int64(d.info.minBlock)) }

// Window is the in-flight byte count and request size that fill the link.
func (d *NBD) Window() (inFlightBytes, requestBytes int64) { return d.opts.WindowBytes, d.reqMax }

// RemoteStats returns the source's counters.
func (d *NBD) RemoteStats() RemoteStats {
	d.mu.Lock()
	n := 0
	for _, c := range d.conns {
		if !c.isDead() {
			n++
		}
	}
	d.mu.Unlock()
	return RemoteStats{
		Requests: d.requests.Load(), Retries: d.retries.Load(), Reconnects: d.reconnects.Load(),
		Failures: d.failures.Load(), Connections: n,
	}
}

// maybeDialLocked starts a dial when none is in progress and either no
// connection lives (need) or fewer than wanted do and extra connections
// are not being refused. It returns the channel closed when the dial ends,
// or nil.
func (d *NBD) maybeDialLocked(need bool) chan struct{} {
	if d.closed {
		return nil
	}
	if d.dialing {
		return d.dialDone
	}
	if !need && (len(d.conns) >= d.want || time.Now().Before(d.extraRetryAt)) {
		return nil
	}
	d.dialing = true
	d.dialDone = make(chan struct{})
	d.dials.Add(1)
	go d.dial(d.dialDone)
	return d.dialDone
}

func (d *NBD) dial(done chan struct{}) {
	defer d.dials.Done()
	ctx, cancel := context.WithTimeout(d.closeCtx, d.opts.ConnectTimeout)
	c, err := dialNBD(ctx, d.addr, &d.opts)
	cancel()
	if err == nil && c.info.size != d.info.size {
		err = fmt.Errorf("%w: %s: export size changed from %d to %d bytes", ErrSourceChanged, d.uri, d.info.size, c.info.size)
		c.close()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dialing = false
	d.dialErr = err
	close(done)
	if err == nil && d.closed {
		d.mu.Unlock()
		c.close()
		d.mu.Lock()
		return
	}
	switch {
	case err != nil && len(d.conns) > 0:
		// An extra connection failed (a server limiting its clients):
		// carry on with fewer, try again later.
		d.extraRetryAt = time.Now().Add(30 * time.Second)
		d.log.Debug("extra NBD connection failed", "err", err)
	case err != nil:
		d.log.Warn("NBD connection failed", "err", err)
	default:
		d.conns = append(d.conns, c)
		if d.lost > d.reconnects.Load() {
			d.reconnects.Add(1)
			d.log.Info("NBD source reconnected", "connections", len(d.conns))
		}
		d.maybeDialLocked(false)
	}
}

// conn returns a live connection, dialling when there is none.
func (d *NBD) conn(ctx context.Context) (*nbdConn, error) {
	for {
		d.mu.Lock()
		if d.closed {
			d.mu.Unlock()
			return nil, permanent(ErrClosed)
		}
		live := d.conns[:0]
		for _, c := range d.conns {
			if c.isDead() {
				d.lost++
				continue
			}
			live = append(live, c)
		}
		clear(d.conns[len(live):])
		d.conns = live
		if len(live) > 0 {
			d.rr++
			c := live[d.rr%len(live)]
			d.maybeDialLocked(false)
			d.mu.Unlock()
			return c, nil
		}
		done := d.maybeDialLocked(true)
		d.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		d.mu.Lock()
		err, n := d.dialErr, len(d.conns)
		d.mu.Unlock()
		if n == 0 && err != nil {
			return nil, err
		}
	}
}

func (d *NBD) onRetry(attempt int, err error) {
	d.retries.Add(1)
	d.log.Debug("NBD request failed; retrying", "attempt", attempt, "err", err)
}

// call runs one request with retries; mk builds a fresh request for each
// attempt and got receives the one that succeeded.
func (d *NBD) call(ctx context.Context, what string, mk func() *nbdReq, got func(*nbdReq)) error {
	err := retry(ctx, d.opts.Retry, what, func(ctx context.Context) error {
		c, err := d.conn(ctx)
		if err != nil {
			return err
		}
		d.requests.Add(1)
		req := mk()
		if err := c.do(ctx, req); err != nil {
			return err
		}
		if got != nil {
			got(req)
		}
		return nil
	}, d.onRetry)
	if err != nil {
		d.failures.Add(1)
	}
	return err
}

func (d *NBD) ReadAt(p []byte, off int64) (int, error) {
	return d.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext reads len(p) bytes at off. Reads are aligned to the
// server's minimum block size (through a bounce buffer when needed) and
// split at its maximum, the pieces in flight together.
func (d *NBD) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("blockdev: read %s at negative offset %d", d.uri, off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off >= d.info.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > d.info.size-off {
		p, eof = p[:d.info.size-off], io.EOF
	}
	mb := int64(d.info.minBlock)
	if off%mb != 0 || int64(len(p))%mb != 0 {
		aoff := off / mb * mb
		aend := min((off+int64(len(p))+mb-1)/mb*mb, d.info.size)
		bounce := make([]byte, aend-aoff)
		if err := d.readAligned(ctx, bounce, aoff); err != nil {
			return 0, err
		}
		copy(p, bounce[off-aoff:])
		return len(p), eof
	}
	if err := d.readAligned(ctx, p, off); err != nil {
		return 0, err
	}
	return len(p), eof
}

func (d *NBD) readAligned(ctx context.Context, p []byte, off int64) error {
	if int64(len(p)) <= d.reqMax {
		return d.readPiece(ctx, p, off)
	}
	n := (int64(len(p)) + d.reqMax - 1) / d.reqMax
	errs := make(chan error, n)
	for i := range n {
		lo := i * d.reqMax
		hi := min(lo+d.reqMax, int64(len(p)))
		go func() { errs <- d.readPiece(ctx, p[lo:hi], off+lo) }()
	}
	var first error
	for range n {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (d *NBD) readPiece(ctx context.Context, p []byte, off int64) error {
	return d.call(ctx, fmt.Sprintf("blockdev: read %s at %d+%d", d.uri, off, len(p)),
		func() *nbdReq { return &nbdReq{cmd: nbdwire.CmdRead, off: uint64(off), length: uint32(len(p)), buf: p} }, nil)
}

// Map describes [off, off+n) with BLOCK_STATUS base:allocation.
// ErrNotSupported when the server offers no such context.
func (d *NBD) Map(off, n int64) ([]Extent, error) {
	return d.MapContext(context.Background(), off, n)
}

// MapContext is Map with a context. The export is asked about whole
// windows of mapWindow bytes, kept for mapTTL: a copier mapping region
// after region costs one round trip per window, not one per copy (a
// source is read-only; its map only ages out in case it is not).
func (d *NBD) MapContext(ctx context.Context, off, n int64) ([]Extent, error) {
	if !d.info.hasMeta {
		return nil, ErrNotSupported
	}
	if off < 0 || n <= 0 || off >= d.info.size {
		return nil, fmt.Errorf("blockdev: map %s at %d+%d: out of range", d.uri, off, n)
	}
	n = min(n, d.info.size-off)
	w, err := d.mapWindowAt(ctx, off/mapWindow*mapWindow)
	if err != nil {
		return nil, err
	}
	if w.end > off {
		return trimExtents(w.exts, off-w.start, min(n, w.end-off)), nil
	}
	// The server described less than the window: ask about off itself.
	return d.mapDirect(ctx, off, n)
}

const (
	mapWindow     = 64 << 20
	mapTTL        = 5 * time.Second
	mapCacheSlots = 16
)

// mapEntry is one window's map: extents describing [start, end).
type mapEntry struct {
	start, end int64
	exts       []Extent
	at         time.Time
	ready      chan struct{} // closed when the query is done
	err        error
}

// mapWindowAt returns the map of the window at start, querying the server
// once for all the callers that want it at the same time.
func (d *NBD) mapWindowAt(ctx context.Context, start int64) (*mapEntry, error) {
	d.mapMu.Lock()
	e := d.mapCache[start]
	if e != nil {
		select {
		case <-e.ready:
			if e.err != nil || time.Since(e.at) > mapTTL {
				e = nil
			}
		default:
		}
	}
	if e == nil {
		if len(d.mapCache) >= mapCacheSlots {
			for k, old := range d.mapCache { // evict a finished entry
				select {
				case <-old.ready:
					delete(d.mapCache, k)
				default:
					continue
				}
				break
			}
		}
		e = &mapEntry{start: start, ready: make(chan struct{})}
		d.mapCache[start] = e
		d.mapMu.Unlock()
		e.exts, e.err = d.mapDirect(ctx, start, min(mapWindow, d.info.size-start))
		e.at = time.Now()
		e.end = start
		for _, x := range e.exts {
			e.end += x.Length
		}
		close(e.ready)
		return e, e.err
	}
	d.mapMu.Unlock()
	select {
	case <-e.ready:
		return e, e.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// mapDirect asks the server about [off, off+n) (n > 0, within the export).
func (d *NBD) mapDirect(ctx context.Context, off, n int64) ([]Extent, error) {
	mb := int64(d.info.minBlock)
	aoff := off / mb * mb
	aend := min((off+n+mb-1)/mb*mb, d.info.size, aoff+nbdMaxBlockStatusBytes)
	var exts []Extent
	err := d.call(ctx, fmt.Sprintf("blockdev: block status %s at %d+%d", d.uri, aoff, aend-aoff),
		func() *nbdReq {
			return &nbdReq{cmd: nbdwire.CmdBlockStatus, off: uint64(aoff), length: uint32(aend - aoff)}
		},
		func(r *nbdReq) { exts = r.exts })
	if err != nil {
		return nil, err
	}
	out := trimExtents(exts, off-aoff, min(n, aend-off))
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: %s: BLOCK_STATUS at %d described nothing past %d", ErrProtocol, d.uri, aoff, off)
	}
	return out, nil
}

// trimExtents drops skip bytes from the front and keeps at most n bytes.
func trimExtents(exts []Extent, skip, n int64) []Extent {
	var out []Extent
	for _, e := range exts {
		if skip >= e.Length {
			skip -= e.Length
			continue
		}
		e.Length -= skip
		skip = 0
		if e.Length > n {
			e.Length = n
		}
		if e.Length > 0 {
			out = append(out, e)
		}
		n -= e.Length
		if n == 0 {
			break
		}
	}
	return out
}

// Close disconnects every connection. Idempotent; calls in flight fail.
func (d *NBD) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	conns := d.conns
	d.conns = nil
	d.mu.Unlock()
	d.closeCancel()
	d.dials.Wait()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(c.close)
	}
	wg.Wait()
	return nil
}
