package nbdserver

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// Defaults and bounds of Options.
const (
	DefaultMaxInFlight   = 64
	DefaultMaxPayload    = 32 << 20 // the spec's interoperable maximum for READ/WRITE
	DefaultShutdownGrace = 5 * time.Second

	maxMaxInFlight = 1024
	// minMaxPayload: the spec makes every server accept unfragmented reads
	// of 64 KiB, and clients assume at least that.
	minMaxPayload = 64 << 10
	maxMaxPayload = 1 << maxBufferShift
)

// Options configure a Server. The zero value is valid: every zero field
// takes its default.
type Options struct {
	// Logger receives connection events and protocol violations; nil
	// discards them. Per-request errors are logged at debug level only.
	Logger *slog.Logger
	// MaxInFlight is the number of requests a connection may have in flight
	// (read from the socket, not yet replied to). When it is reached the
	// server stops reading that connection until a request completes.
	// 0 means DefaultMaxInFlight.
	MaxInFlight int
	// MaxPayload is the largest READ or WRITE length accepted, advertised as
	// the maximum block size. Longer ones fail with EINVAL (a WRITE's payload
	// is still consumed). 0 means DefaultMaxPayload.
	MaxPayload int
	// MaxInFlightBytes bounds the READ and WRITE payload bytes a connection
	// holds in memory at once, so MaxInFlight × MaxPayload is never
	// allocated by one client. A single request may always run alone.
	// 0 means 4 × MaxPayload.
	MaxInFlightBytes int
	// ShutdownGrace is how long Disconnect, Close and a cancelled Serve wait
	// for a connection's requests in flight before closing it anyway and
	// cancelling their context. 0 means DefaultShutdownGrace.
	ShutdownGrace time.Duration
	// TLS is how TLS is offered (NBD_OPT_STARTTLS); the zero value, TLSOff,
	// offers none.
	TLS TLSMode
	// TLSConfig is the server side of TLS: its certificate, and whether
	// (and against which CAs) client certificates are verified. Required
	// unless TLS is TLSOff. The server uses a clone with at least TLS 1.2.
	TLSConfig *tls.Config
}

// TLSMode is how a server offers TLS (doc/proto.md, "TLS support").
type TLSMode int

const (
	// TLSOff is the spec's NOTLS mode: NBD_OPT_STARTTLS is refused with
	// NBD_REP_ERR_POLICY.
	TLSOff TLSMode = iota
	// TLSOn offers TLS without requiring it (SELECTIVETLS with no TLS-only
	// export): a client may upgrade, or not.
	TLSOn
	// TLSRequire is the spec's FORCEDTLS mode: until the client has
	// upgraded, every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT fails
	// with NBD_REP_ERR_TLS_REQD (so nothing is listed or described), and
	// NBD_OPT_EXPORT_NAME ends the connection.
	TLSRequire
)

func (m TLSMode) String() string {
	switch m {
	case TLSOff:
		return "off"
	case TLSOn:
		return "on"
	case TLSRequire:
		return "require"
	default:
		return fmt.Sprintf("TLSMode(%d)", int(m))
	}
}

// ParseTLSMode parses "off", "on" or "require".
func ParseTLSMode(s string) (TLSMode, error) {
	for _, m := range []TLSMode{TLSOff, TLSOn, TLSRequire} {
		if s == m.String() {
			return m, nil
		}
	}
	return TLSOff, fmt.Errorf("%w: TLS mode %q: want off, on or require", ErrInvalidOptions, s)
}

// Validate fills zero fields with their defaults and reports the first
// field out of range. NewServer calls it on its own copy.
func (o *Options) Validate() error {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MaxInFlight == 0 {
		o.MaxInFlight = DefaultMaxInFlight
	}
	if o.MaxPayload == 0 {
		o.MaxPayload = DefaultMaxPayload
	}
	if o.MaxInFlightBytes == 0 {
		o.MaxInFlightBytes = 4 * o.MaxPayload
	}
	if o.ShutdownGrace == 0 {
		o.ShutdownGrace = DefaultShutdownGrace
	}
	switch {
	case o.MaxInFlight < 1 || o.MaxInFlight > maxMaxInFlight:
		return fmt.Errorf("%w: MaxInFlight %d is not in [1, %d]", ErrInvalidOptions, o.MaxInFlight, maxMaxInFlight)
	case o.MaxPayload < minMaxPayload || o.MaxPayload > maxMaxPayload:
		return fmt.Errorf("%w: MaxPayload %d is not in [%d, %d]", ErrInvalidOptions, o.MaxPayload, minMaxPayload, maxMaxPayload)
	case o.MaxInFlightBytes < o.MaxPayload:
		return fmt.Errorf("%w: MaxInFlightBytes %d is less than MaxPayload %d", ErrInvalidOptions, o.MaxInFlightBytes, o.MaxPayload)
	case o.ShutdownGrace < 0:
		return fmt.Errorf("%w: ShutdownGrace %v is negative", ErrInvalidOptions, o.ShutdownGrace)
	case o.TLS < TLSOff || o.TLS > TLSRequire:
		return fmt.Errorf("%w: unknown %v", ErrInvalidOptions, o.TLS)
	case o.TLS != TLSOff && o.TLSConfig == nil:
		return fmt.Errorf("%w: TLS %v needs a TLSConfig", ErrInvalidOptions, o.TLS)
	case o.TLS != TLSOff && len(o.TLSConfig.Certificates) == 0 && o.TLSConfig.GetCertificate == nil && o.TLSConfig.GetConfigForClient == nil:
		return fmt.Errorf("%w: TLS %v needs a server certificate", ErrInvalidOptions, o.TLS)
	}
	if o.TLSConfig != nil {
		// The spec: TLS 1.2 at least, older versions never by default.
		cfg := o.TLSConfig.Clone()
		cfg.MinVersion = max(cfg.MinVersion, tls.VersionTLS12)
		o.TLSConfig = cfg
	}
	return nil
}

// ListenerOptions configure what one listener serves.
type ListenerOptions struct {
	// Exports, when not nil, is the only export names this listener
	// serves: the others are not listed, described or opened through it,
	// exactly as if they did not exist.
	Exports []string
	// TLS, when not nil, replaces Options.TLS on this listener: TLSOff for
	// an in-process listener whose peers are trusted, say. Modes other
	// than TLSOff need Options.TLSConfig.
	TLS *TLSMode
}

// Server serves Exports over NBD on any number of listeners.
type Server struct {
	exports Exports
	opts    Options // validated
	log     *slog.Logger
	buffers bufferPool
	pipes   pipePool // for spliced READ replies (splice.go)

	// wg tracks every goroutine the server starts (see goFunc); Close waits
	// for it.
	wg sync.WaitGroup

	mu sync.Mutex
	// Guarded by mu.
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{} // every open connection, negotiating or transmitting
	nextID    uint64
}

// NewServer returns a server for exports. It serves nothing until Serve.
func NewServer(exports Exports, opts Options) (*Server, error) {
	if exports == nil {
		return nil, fmt.Errorf("%w: nil Exports", ErrInvalidOptions)
	}
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	return &Server{
		exports:   exports,
		opts:      opts,
		log:       opts.Logger,
		pipes:     pipePool{log: opts.Logger, size: pipeSize},
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
	}, nil
}

// goFunc starts f as a goroutine Close waits for. It refuses (false) once
// Close has begun, so nothing starts after Close's Wait.
func (s *Server) goFunc(f func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Go(f)
	return true
}

// Serve accepts connections on l until ctx is cancelled, l is closed or
// Close is called; it returns nil in those cases, and closes l in every
// case. When ctx is cancelled, Serve also shuts down the connections it
// accepted (as Disconnect does) and returns once they are gone; when l is
// closed by someone else, its connections live on until the client leaves,
// Disconnect or Close. Serve may run on several listeners at once.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	return s.ServeListener(ctx, l, ListenerOptions{})
}

// ServeListener is Serve with options for this listener.
func (s *Server) ServeListener(ctx context.Context, l net.Listener, lo ListenerOptions) error {
	tlsMode := s.opts.TLS
	if lo.TLS != nil {
		tlsMode = *lo.TLS
		if tlsMode < TLSOff || tlsMode > TLSRequire || (tlsMode != TLSOff && s.opts.TLSConfig == nil) {
			l.Close()
			return fmt.Errorf("%w: listener TLS %v without a TLSConfig", ErrInvalidOptions, tlsMode)
		}
	}
	var allow func(string) bool
	if lo.Exports != nil {
		allowed := make(map[string]bool, len(lo.Exports))
		for _, name := range lo.Exports {
			allowed[name] = true
		}
		allow = func(name string) bool { return allowed[name] }
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	// Serve runs in its caller's goroutine, but Close waits for it too: when
	// Close returns, every Serve has returned.
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()

	// Accept does not take a context; closing the listener is what
	// interrupts it.
	serveDone := make(chan struct{})
	defer close(serveDone)
	if !s.goFunc(func() {
		select {
		case <-ctx.Done():
			l.Close()
		case <-serveDone:
		}
	}) {
		return ErrServerClosed
	}

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			switch {
			case ctx.Err() != nil:
				s.shutdownConns(func(c *conn) bool { return c.listener == l })
				return nil
			case s.isClosed(), errors.Is(err, net.ErrClosed):
				return nil
			case isTemporaryAcceptError(err):
				// Out of file descriptors and the like: wait for some to be
				// released rather than spin or give up.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("nbdserver: accept failed; retrying", "addr", l.Addr().String(), "err", err, "retry_in", backoff)
				t := time.NewTimer(backoff)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
				}
				continue
			default:
				return fmt.Errorf("nbdserver: accept on %s: %w", l.Addr(), err)
			}
		}
		backoff = 0
		s.startConn(ctx, nc, l, allow, tlsMode)
	}
}

func isTemporaryAcceptError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// startConn registers nc and starts its goroutine, or closes nc if the
// server is closing.
func (s *Server) startConn(serveCtx context.Context, nc net.Conn, l net.Listener, allow func(string) bool, tlsMode TLSMode) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		nc.Close()
		return
	}
	s.nextID++
	c := newConn(s, serveCtx, nc, l, s.nextID)
	c.allow = allow
	c.tlsMode = tlsMode
	s.conns[c] = struct{}{}
	s.wg.Go(c.run) // s.closed is false under mu: this is goFunc, inlined
	s.mu.Unlock()
}

// removeConn forgets c once it is fully torn down.
func (s *Server) removeConn(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// markTransmitting records that c serves export name, for Disconnect and
// Connections.
func (s *Server) markTransmitting(c *conn, name string) {
	s.mu.Lock()
	c.exportName = name
	c.transmitting = true
	s.mu.Unlock()
}

// shutdownConns shuts down every connection match selects and waits until
// they are gone; it returns how many there were.
func (s *Server) shutdownConns(match func(*conn) bool) int {
	s.mu.Lock()
	var victims []*conn
	for c := range s.conns {
		if match(c) {
			victims = append(victims, c)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.beginShutdown()
	}
	for _, c := range victims {
		<-c.done
	}
	return len(victims)
}

// Disconnect closes every connection in the transmission phase with the
// named export and returns how many there were. Each stops reading new
// requests at once, has up to ShutdownGrace to finish those in flight (their
// replies are sent), and is then closed; Disconnect returns when all of them
// are closed and released. Remove the export from Exports first, or a client
// may open it again right away.
func (s *Server) Disconnect(name string) int {
	return s.shutdownConns(func(c *conn) bool { return c.transmitting && c.exportName == name })
}

// Connections returns the number of open connections per export name, in
// the transmission phase. Exports without connections are absent.
func (s *Server) Connections() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	counts := make(map[string]int)
	for c := range s.conns {
		if c.transmitting {
			counts[c.exportName]++
		}
	}
	return counts
}

// Close stops accepting on every listener, shuts every connection down as
// Disconnect does, and waits for every goroutine the server started and for
// every Serve call to return. It is idempotent; every call waits.
func (s *Server) Close() error {
	s.mu.Lock()
	var listeners []net.Listener
	var conns []*conn
	if !s.closed {
		s.closed = true
		for l := range s.listeners {
			listeners = append(listeners, l)
		}
		for c := range s.conns {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, l := range listeners {
		l.Close()
	}
	for _, c := range conns {
		c.beginShutdown()
	}
	s.wg.Wait()
	s.pipes.close()
	return nil
}

// conn is one client connection, from greeting to close. Its goroutine
// (run) negotiates, then becomes the reader of the transmission phase; each
// request runs in a worker goroutine of its own, at most MaxInFlight at a
// time.
type conn struct {
	s *Server
	// raw is the accepted socket; shutdown sets its deadlines, from any
	// goroutine.
	raw net.Conn
	// nc is what the protocol runs over: raw, or a *tls.Conn over it after
	// NBD_OPT_STARTTLS. Only the connection's goroutine changes it, during
	// negotiation, before any worker exists.
	nc       net.Conn
	r        *bufio.Reader // every read of nc goes through r
	listener net.Listener  // that accepted nc, for Serve's shutdown
	log      *slog.Logger
	// allow, when not nil, is the listener's export allowlist.
	allow func(name string) bool
	// tlsMode is the listener's TLS mode.
	tlsMode TLSMode
	// tlsWriter batches reply writes over TLS, where a writev would become
	// one TLS record per buffer. Used only by the current reply writer.
	tlsWriter *bufio.Writer

	// ctx is passed to Export methods; cancelled when the connection closes.
	ctx    context.Context
	cancel context.CancelFunc

	// stop is closed when the connection must stop reading requests:
	// Disconnect, Close, a cancelled Serve, or a failed reply write.
	stop     chan struct{}
	stopOnce sync.Once
	// done is closed when the connection is closed, its workers have
	// returned and its export is released.
	done chan struct{}

	// Set by markTransmitting; guarded by s.mu.
	exportName   string
	transmitting bool

	// Transmission phase state, fixed before the first worker starts.
	exp        Export
	size       uint64
	flags      ExportFlags
	structured bool
	// metaContexts are the contexts selected for exp; context ID i+1 is
	// metaContexts[i]. Non-empty only if exp is an Extenter.
	metaContexts []string
	// sock is the plain socket READ replies are spliced into and WRITE
	// payloads spliced from; splicer and spliceWriter are the export, if
	// it splices them. sock nil: no splicing (TLS); an interface nil: the
	// export has no files behind it.
	sock         syscall.RawConn
	splicer      Splicer
	spliceWriter SpliceWriter
	writeMisses  int // payloads in a row that did not fit their pipes (the reader's)

	adm     admission
	workers sync.WaitGroup // request workers; waited for before release
	// work hands requests to idle workers; the read loop is its only
	// sender and closes it when reading stops. Workers live as long as the
	// connection, so their stacks are grown once, not per request.
	work     chan workItem
	nworkers int // workers started; only the read loop touches it

	// Replies are queued, not waited for: whoever finds no write in
	// progress becomes the writer and sends everything queued in one
	// writev, then anything queued meanwhile, so replies never interleave
	// and a busy connection makes one syscall for many replies. The writer
	// gives back what each written reply held (its pooled buffer, its
	// admission), so a request stays in flight until its reply is out.
	wmu sync.Mutex
	// Guarded by wmu:
	writing bool
	pending net.Buffers // queued reply buffers, in order
	arena   []byte      // copies of the pending replies' headers
	owed    []owed      // what the pending replies hold, in order
	// The previous batch's slices, reused for the next one.
	spare      net.Buffers
	spareArena []byte
	spareOwed  []owed
	unsent     net.Buffers // the batch being written (WriteTo consumes it); writer only
	// werr is the first reply write error. After it, no reply can be
	// framed correctly any more, so none is attempted.
	werr error
}

// owed is what a queued reply holds until it is written.
type owed struct {
	pooled *[]byte // a read buffer the reply's data is in, or nil
	held   int64   // the request's admitted payload bytes
	// pipe, when not nil, holds the reply's data: spliced bytes, in the
	// pipes chained from it, that go on the wire right after the batch's
	// first at buffers, the last of which is the reply's header.
	pipe *pipe
	at   int
}

// workItem is one request handed to a worker.
type workItem struct {
	req     nbdwire.Request
	rej     rejection
	payload *[]byte
	pipes   *pipe // a WRITE's payload, when it went into pipes instead
	held    int64
}

func newConn(s *Server, serveCtx context.Context, nc net.Conn, l net.Listener, id uint64) *conn {
	// Export calls must outlive a cancelled Serve context for the grace
	// period, but keep its values.
	ctx, cancel := context.WithCancel(context.WithoutCancel(serveCtx))
	return &conn{
		s:        s,
		tlsMode:  s.opts.TLS,
		raw:      nc,
		nc:       nc,
		r:        bufio.NewReaderSize(nc, 32<<10),
		listener: l,
		log:      s.log.With("conn", id, "remote", remoteAddr(nc)),
		ctx:      ctx,
		cancel:   cancel,
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
		adm: admission{
			maxRequests: s.opts.MaxInFlight,
			maxBytes:    int64(s.opts.MaxInFlightBytes),
		},
	}
}

func remoteAddr(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return nc.LocalAddr().Network() // unix peers are unnamed
}

// beginShutdown makes the reader stop: new requests are not read, those in
// flight finish within the grace period. Safe to call any number of times,
// from any goroutine, in any phase.
func (c *conn) beginShutdown() {
	c.stopOnce.Do(func() { close(c.stop) })
	// A deadline in the past interrupts a blocked read now and fails every
	// later one (a TLS handshake too); it is never reset.
	c.raw.SetReadDeadline(time.Unix(1, 0))
}

func (c *conn) stopping() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

func (c *conn) run() {
	defer func() {
		c.cancel()
		c.nc.Close()
		c.s.removeConn(c)
		close(c.done)
	}()
	c.log.Debug("nbdserver: connection opened")
	o, err := c.negotiate()
	if err != nil {
		if errors.Is(err, errAbort) {
			c.log.Debug("nbdserver: client aborted negotiation")
		} else if c.stopping() || isClosedConn(err) {
			c.log.Debug("nbdserver: connection closed during negotiation", "err", err)
		} else {
			c.log.Info("nbdserver: negotiation failed", "err", err)
		}
		return
	}
	c.log = c.log.With("export", o.name)
	c.log.Debug("nbdserver: transmission started", "structured_replies", c.structured)
	c.transmit()
	o.release()
	c.log.Debug("nbdserver: connection closed")
}

// isClosedConn reports whether err just says the peer went away.
func isClosedConn(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE)
}

// admission bounds a connection's requests in flight by count and by
// payload bytes. Only the reader acquires, so a large request waiting for
// room cannot be overtaken by small ones.
type admission struct {
	maxRequests int
	maxBytes    int64

	// inFlight mirrors requests for readers that must not take mu: a
	// reply's writer asks whether other replies may be about to queue.
	inFlight atomic.Int32

	mu sync.Mutex
	// Guarded by mu.
	requests int
	bytes    int64
	// changed is closed (and dropped) when requests or bytes decrease;
	// made on demand so releases nobody waits for cost nothing.
	changed chan struct{}
}

// acquire admits one request holding n payload bytes, waiting for room. It
// returns false, admitting nothing, if stop is closed first.
func (a *admission) acquire(stop <-chan struct{}, n int64) bool {
	for {
		a.mu.Lock()
		if a.requests < a.maxRequests && (a.bytes+n <= a.maxBytes || a.requests == 0) {
			a.requests++
			a.bytes += n
			a.inFlight.Add(1)
			a.mu.Unlock()
			return true
		}
		changed := a.changedLocked()
		a.mu.Unlock()
		select {
		case <-changed:
		case <-stop:
			return false
		}
	}
}

// release ends a request admitted with n bytes.
func (a *admission) release(n int64) {
	a.mu.Lock()
	a.requests--
	a.bytes -= n
	a.inFlight.Add(-1)
	if a.changed != nil {
		close(a.changed)
		a.changed = nil
	}
	a.mu.Unlock()
}

// idle reports whether no request is in flight; if some are, the channel
// is closed when one completes.
func (a *admission) idle() (bool, <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.requests == 0 {
		return true, nil
	}
	return false, a.changedLocked()
}

func (a *admission) changedLocked() chan struct{} {
	if a.changed == nil {
		a.changed = make(chan struct{})
	}
	return a.changed
}
