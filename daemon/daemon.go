package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nbdclone/nbdclone/nbdserver"
	"github.com/nbdclone/nbdclone/target"
)

// Daemon is the nbdclone daemon: NBD listeners, the control socket and the
// device registry.
type Daemon struct {
	cfg       Config
	log       *slog.Logger
	reg       *registry
	srv       *nbdserver.Server
	collector *collector
	att       *attacher   // /dev/nbdX attachments (attach.go)
	auto      *autoLinear // events and auto_linear swaps (autolinear.go)
	events    *eventRunner
	bus       *eventBus   // every event, fanned out (events.go)
	mon       *monitor    // hydration events, rate and ETA (monitor.go)
	mem       *memLimiter // the runtime's soft memory limit (memlimit.go)

	ready chan struct{} // closed once every listener is up and devices are restored
	done  chan struct{} // closed when Run returns

	mu sync.Mutex
	// Guarded by mu.
	started  bool
	cancel   context.CancelFunc // ends Run
	nbdAddrs []listenAddr       // resolved NBD listener addresses, for URIs
	metrics  net.Addr

	wg sync.WaitGroup // every goroutine Run starts
}

// New checks cfg (after defaults) and prepares a daemon; Run starts it.
func New(cfg Config) (*Daemon, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	d := &Daemon{
		cfg:   cfg,
		log:   cfg.Logger,
		ready: make(chan struct{}),
		done:  make(chan struct{}),
		mem:   newMemLimiter(cfg.Logger),
	}
	tlsMode, tlsConfig, err := cfg.TLS.server()
	if err != nil {
		return nil, err
	}
	d.reg = newRegistry(cfg.Logger, stateDir{dir: cfg.StateDir}, target.Build)
	d.reg.uris = d.uris
	d.reg.sources.capacity = cfg.SourceCache
	srv, err := nbdserver.NewServer(d.reg, nbdserver.Options{
		Logger:    cfg.Logger.With("component", "nbd"),
		TLS:       tlsMode,
		TLSConfig: tlsConfig,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: nbd server: %w", ErrInternal, err)
	}
	d.srv = srv
	d.reg.disconnect = srv.Disconnect
	d.collector = newCollector(d.reg)
	d.hookUp()
	return d, nil
}

// Ready is closed once Run listens on every socket and has restored the
// devices of the state directory.
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// NBDAddrs are the NBD listeners' addresses (TCP ports resolved), once
// Ready.
func (d *Daemon) NBDAddrs() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]string, len(d.nbdAddrs))
	for i, a := range d.nbdAddrs {
		out[i] = a.String()
	}
	return out
}

// MetricsAddr is the metrics listener's address once Ready, or nil.
func (d *Daemon) MetricsAddr() net.Addr {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.metrics
}

// uris are the NBD URIs a device is exported at.
func (d *Daemon) uris(name string) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]string, 0, len(d.nbdAddrs))
	for _, a := range d.nbdAddrs {
		if !a.allows(name) {
			continue
		}
		uri := exportURI(a, name)
		if d.cfg.TLS.Mode == nbdserver.TLSRequire.String() {
			// The nbds schemes make clients start TLS.
			uri = "nbds" + strings.TrimPrefix(uri, "nbd")
		}
		out = append(out, uri)
	}
	return out
}

func exportURI(a listenAddr, name string) string {
	if a.network == "unix" {
		return "nbd+unix:///" + url.PathEscape(name) + "?socket=" + a.addr
	}
	host, port, _ := net.SplitHostPort(a.addr)
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "localhost"
	}
	return "nbd://" + net.JoinHostPort(host, port) + "/" + url.PathEscape(name)
}

// Close stops a running daemon and waits for Run to return. Idempotent.
func (d *Daemon) Close() error {
	d.mu.Lock()
	started, cancel := d.started, d.cancel
	d.mu.Unlock()
	if !started {
		return nil
	}
	cancel()
	<-d.done
	return nil
}

// goFunc runs fn on a goroutine that Run waits for.
func (d *Daemon) goFunc(fn func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		fn()
	}()
}

// Run listens, restores the devices of the state directory and serves
// until ctx ends (or Close), then shuts down: listeners close, every device
// is drained and suspended (committing metadata), targets close, and every
// goroutine is waited for. It returns nil after a clean shutdown.
func (d *Daemon) Run(ctx context.Context) (err error) {
	d.mu.Lock()
	if d.started {
		d.mu.Unlock()
		return fmt.Errorf("%w: Run called twice", ErrInvalid)
	}
	d.started = true
	ctx, cancel := context.WithCancel(ctx)
	d.cancel = cancel
	d.mu.Unlock()
	defer close(d.done)
	defer cancel()

	// The control socket first: it tells whether another daemon runs, before
	// anything touches the state directory or its metadata stores.
	controlAddr, _ := parseListen("unix:" + d.cfg.Control)
	control, err := listen(controlAddr, 0o600)
	if err != nil {
		return err
	}
	var listeners []socketListener
	defer func() {
		control.closeAndUnlink()
		for _, l := range listeners {
			l.closeAndUnlink()
		}
	}()
	for _, s := range d.cfg.Listen {
		a, _ := parseListen(s)
		l, err := listen(a, 0o660)
		if err != nil {
			return err
		}
		listeners = append(listeners, l)
	}
	var metricsL socketListener
	if d.cfg.Metrics != "" {
		a, _ := parseListen(d.cfg.Metrics)
		if metricsL, err = listen(a, 0); err != nil {
			return err
		}
		listeners = append(listeners, metricsL)
	}
	if err := d.cfg.Registerer.Register(d.collector); err != nil {
		return fmt.Errorf("%w: registering metrics: %w", ErrInternal, err)
	}
	defer d.cfg.Registerer.Unregister(d.collector)

	d.mu.Lock()
	for _, l := range listeners {
		if l.Listener == metricsL.Listener {
			d.metrics = l.Addr()
			continue
		}
		a := l.addr
		if a.network == "tcp" {
			a.addr = l.Addr().String()
		}
		d.nbdAddrs = append(d.nbdAddrs, a)
	}
	d.mu.Unlock()

	if err := d.reg.state.ensure(); err != nil {
		return err
	}
	d.mem.start()
	defer d.mem.stop()
	if err := d.reg.restore(ctx); err != nil {
		d.shutdown(nil, nil, nil)
		if ctx.Err() != nil {
			return nil // stopped while restoring
		}
		return err
	}
	d.mem.update(d.reg.all())

	// Serve.
	fatal := make(chan error, len(listeners)+1)
	controlCtx, cancelControl := context.WithCancelCause(context.WithoutCancel(ctx))
	defer cancelControl(nil)
	controlSrv := &http.Server{
		Handler:           d.controlHandler(),
		BaseContext:       func(net.Listener) context.Context { return controlCtx },
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelDebug),
	}
	d.goFunc(func() {
		if err := controlSrv.Serve(control); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fatal <- fmt.Errorf("%w: control socket: %w", ErrInternal, err)
		}
	})
	nbdCtx, cancelNBD := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelNBD()
	for _, l := range listeners {
		if l.Listener == metricsL.Listener {
			continue
		}
		d.goFunc(func() {
			if err := d.srv.ServeListener(nbdCtx, l.Listener, nbdserver.ListenerOptions{Exports: l.addr.exports}); err != nil && nbdCtx.Err() == nil && ctx.Err() == nil {
				fatal <- fmt.Errorf("%w: NBD listener %s: %w", ErrInternal, l.addr, err)
			}
		})
	}
	var metricsSrv *http.Server
	if metricsL.Listener != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(d.cfg.Gatherer, promhttp.HandlerOpts{
			ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
		}))
		if d.cfg.Pprof {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		d.goFunc(func() {
			if err := metricsSrv.Serve(metricsL); err != nil && !errors.Is(err, http.ErrServerClosed) {
				fatal <- fmt.Errorf("%w: metrics listener: %w", ErrInternal, err)
			}
		})
	}
	d.startHooks(ctx, nbdCtx)
	close(d.ready)
	logArgs := []any{"control", d.cfg.Control, "listen", d.NBDAddrs(), "state", d.cfg.StateDir, "devices", len(d.reg.all())}
	if a := d.MetricsAddr(); a != nil {
		logArgs = append(logArgs, "metrics", "http://"+a.String()+"/metrics")
	}
	d.log.Info("nbdclone daemon serving", logArgs...)

	select {
	case <-ctx.Done():
	case err = <-fatal:
		d.log.Error("serving failed; shutting down", "err", err)
	}

	// Shut down (invariant 7): no new control requests (long polls end),
	// no new connections, devices drained and suspended, clients
	// disconnected, targets closed.
	d.log.Info("nbdclone daemon shutting down")
	cancelControl(newErr(ErrClosed, "the nbdclone daemon is shutting down"))
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	if err := controlSrv.Shutdown(sctx); err != nil {
		controlSrv.Close()
	}
	scancel()
	control.closeAndUnlink()
	for _, l := range listeners {
		if l.Listener != metricsL.Listener {
			l.closeAndUnlink()
		}
	}
	d.shutdown(cancelNBD, metricsSrv, &err)
	d.wg.Wait()
	d.log.Info("nbdclone daemon stopped")
	return err
}

// shutdown drains, suspends and closes every device, then disconnects NBD
// clients; errs (if not nil) receives the first error when it holds none.
func (d *Daemon) shutdown(cancelNBD context.CancelFunc, metricsSrv *http.Server, errp *error) {
	// Generous: each device's drain is bounded by ShutdownTimeout, but a
	// target's own Suspend (waiting for copies in flight) is not.
	ctx, cancel := context.WithTimeout(context.Background(), 10*d.cfg.ShutdownTimeout)
	defer cancel()
	if err := d.reg.shutdown(ctx, d.cfg.ShutdownTimeout); err != nil {
		d.log.Error("shutting devices down", "err", err)
		if errp != nil && *errp == nil {
			*errp = fmt.Errorf("%w: shutting devices down: %w", ErrInternal, err)
		}
	}
	if cancelNBD != nil {
		cancelNBD()
	}
	if err := d.srv.Close(); err != nil {
		d.log.Error("closing the NBD server", "err", err)
	}
	if metricsSrv != nil {
		metricsSrv.Close()
	}
}

// Metrics returns the daemon's collector, for callers that serve metrics
// themselves; it is registered on Config.Registerer while Run runs.
func (d *Daemon) Metrics() prometheus.Collector { return d.collector }
