package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nbdclone/nbdclone/nbdserver"
)

// Defaults.
const (
	DefaultListen   = "unix:/run/nbdclone/nbd.sock"
	DefaultControl  = "/run/nbdclone/control.sock"
	DefaultStateDir = "/var/lib/nbdclone"
	// DefaultSuspendTimeout bounds the wait for in-flight I/O to drain when a
	// suspend (or a resume that has to suspend first) does not say otherwise.
	DefaultSuspendTimeout = 30 * time.Second
	// ControlEnv names the environment variable the CLI reads for the
	// control socket path.
	ControlEnv = "NBDCLONE_CONTROL"
)

// Config configures a Daemon. The zero value of each field means its default.
type Config struct {
	// Listen are the NBD listeners: "unix:PATH" or "tcp:HOST:PORT".
	// Default [DefaultListen]; TCP only when asked.
	Listen []string
	// Control is the control socket path. Default DefaultControl.
	Control string
	// StateDir holds one JSON file per device. Default DefaultStateDir.
	StateDir string
	// Metrics is "" (no metrics endpoint) or "tcp:HOST:PORT", where /metrics
	// is served from Gatherer.
	Metrics string
	// Pprof also serves Go's profiler at /debug/pprof/ on the metrics
	// listener (it needs Metrics).
	Pprof bool
	// Logger; default discards.
	Logger *slog.Logger
	// Registerer receives the daemon's collector. Default: a new registry.
	Registerer prometheus.Registerer
	// Gatherer is what /metrics serves. Default: Registerer, when it is also
	// a Gatherer (as *prometheus.Registry is).
	Gatherer prometheus.Gatherer
	// ShutdownTimeout bounds the drain of each device at shutdown. Default
	// DefaultSuspendTimeout.
	ShutdownTimeout time.Duration
	// OnEvent is a shell command run for each daemon event (autolinear.go),
	// with NBDCLONE_EVENT, NBDCLONE_DEVICE, NBDCLONE_NBD, NBDCLONE_TABLE
	// and NBDCLONE_DETAIL in its environment. "" runs nothing.
	OnEvent string
	// TLS is TLS for NBD clients on every NBD listener.
	TLS TLSConfig
	// SourceCache is the size in bytes of the read cache each shared clone
	// source gets (clones naming the same path or URI share one reader);
	// 0 shares the reader without caching.
	SourceCache int64
}

// TLSConfig is TLS for NBD clients (NBD_OPT_STARTTLS).
type TLSConfig struct {
	// Mode is "off" (the default: STARTTLS is refused), "on" (offered,
	// not required) or "require" (until a client has started TLS, every
	// option but STARTTLS and ABORT is refused, so nothing is listed).
	Mode string
	// Cert and Key are PEM files: the server certificate (with its chain)
	// and its private key. Required unless Mode is off.
	Cert, Key string
	// CA is a PEM file of the CA certificates client certificates must
	// chain to. Required with VerifyPeer, used only with it.
	CA string
	// VerifyPeer requires every client to present a certificate signed by
	// CA; a client without one fails the TLS handshake.
	VerifyPeer bool
}

func (t TLSConfig) validate() []error {
	var errs []error
	mode, err := nbdserver.ParseTLSMode(t.Mode)
	if err != nil {
		return []error{fmt.Errorf("tls: mode %q: want off, on or require", t.Mode)}
	}
	if mode == nbdserver.TLSOff {
		if t.Cert != "" || t.Key != "" || t.CA != "" || t.VerifyPeer {
			errs = append(errs, errors.New("tls: certificates or peer verification given with TLS off (use --tls on or --tls require)"))
		}
		return errs
	}
	if t.Cert == "" || t.Key == "" {
		errs = append(errs, fmt.Errorf("tls: mode %s needs a server certificate and key (--tls-cert, --tls-key)", t.Mode))
	}
	if t.VerifyPeer && t.CA == "" {
		errs = append(errs, errors.New("tls: peer verification needs the CA that signs client certificates (--tls-ca)"))
	}
	if t.CA != "" && !t.VerifyPeer {
		errs = append(errs, errors.New("tls: --tls-ca is only used with --tls-verify-peer"))
	}
	return errs
}

// server loads the files and returns the NBD server's TLS mode and
// configuration (nil when off).
func (t TLSConfig) server() (nbdserver.TLSMode, *tls.Config, error) {
	mode, err := nbdserver.ParseTLSMode(t.Mode)
	if err != nil || mode == nbdserver.TLSOff {
		return mode, nil, err
	}
	cert, err := tls.LoadX509KeyPair(t.Cert, t.Key)
	if err != nil {
		return mode, nil, newErr(ErrInvalid, "tls: server certificate %s and key %s: %v", t.Cert, t.Key, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if t.VerifyPeer {
		pem, err := os.ReadFile(t.CA)
		if err != nil {
			return mode, nil, newErr(ErrInvalid, "tls: CA: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return mode, nil, newErr(ErrInvalid, "tls: CA %s holds no PEM certificate", t.CA)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return mode, cfg, nil
}

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	if len(c.Listen) == 0 {
		c.Listen = []string{DefaultListen}
	}
	if c.Control == "" {
		c.Control = DefaultControl
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registerer == nil {
		reg := prometheus.NewRegistry()
		c.Registerer = reg
		if c.Gatherer == nil {
			c.Gatherer = reg
		}
	}
	if c.Gatherer == nil {
		if g, ok := c.Registerer.(prometheus.Gatherer); ok {
			c.Gatherer = g
		}
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = DefaultSuspendTimeout
	}
	if c.TLS.Mode == "" {
		c.TLS.Mode = nbdserver.TLSOff.String()
	}
	return c
}

// Validate checks a Config after WithDefaults.
func (c Config) Validate() error {
	var errs []error
	if len(c.Listen) == 0 {
		errs = append(errs, errors.New("no NBD listener"))
	}
	seen := map[string]bool{}
	for _, l := range c.Listen {
		a, err := parseListen(l)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if seen[a.String()] {
			errs = append(errs, fmt.Errorf("listener %q given twice", l))
		}
		seen[a.String()] = true
	}
	if c.Control == "" {
		errs = append(errs, errors.New("no control socket path"))
	}
	if seen["unix:"+filepath.Clean(c.Control)] {
		errs = append(errs, fmt.Errorf("control socket %s is also an NBD listener", c.Control))
	}
	if c.StateDir == "" {
		errs = append(errs, errors.New("no state directory"))
	}
	if c.Metrics != "" {
		a, err := parseListen(c.Metrics)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("metrics: %w", err))
		case a.network != "tcp" || a.exports != nil:
			errs = append(errs, fmt.Errorf("metrics address %q: want tcp:HOST:PORT", c.Metrics))
		}
		if c.Gatherer == nil {
			errs = append(errs, errors.New("metrics: Registerer is not a prometheus.Gatherer and no Gatherer is set"))
		}
	}
	if c.Pprof && c.Metrics == "" {
		errs = append(errs, errors.New("pprof: needs --metrics (it is served on the metrics listener)"))
	}
	if c.Logger == nil {
		errs = append(errs, errors.New("no logger"))
	}
	if c.Registerer == nil {
		errs = append(errs, errors.New("no prometheus registerer"))
	}
	if c.SourceCache < 0 {
		errs = append(errs, errors.New("negative source cache size"))
	}
	if c.ShutdownTimeout < 0 {
		errs = append(errs, errors.New("negative shutdown timeout"))
	}
	errs = append(errs, c.TLS.validate()...)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: config: %w", ErrInvalid, err)
	}
	return nil
}

// listenAddr is one parsed "unix:PATH" or "tcp:HOST:PORT", with an
// optional "?exports=A,B" allowlist.
type listenAddr struct {
	network string // "unix" or "tcp"
	addr    string // a clean path, or HOST:PORT
	// exports, if not nil, are the only exports this listener lists and
	// opens; every other name is unknown on it.
	exports []string
}

func (a listenAddr) String() string { return a.network + ":" + a.addr }

// allows reports whether the listener serves export name.
func (a listenAddr) allows(name string) bool {
	return a.exports == nil || slices.Contains(a.exports, name)
}

func parseListen(s string) (listenAddr, error) {
	spec, list, hasList := strings.Cut(s, "?exports=")
	a, err := parseListenAddr(spec)
	if err != nil || !hasList {
		return a, err
	}
	a.exports = []string{}
	for _, name := range strings.Split(list, ",") {
		if name == "" {
			return listenAddr{}, fmt.Errorf("listen address %q: empty export name in ?exports=", s)
		}
		a.exports = append(a.exports, name)
	}
	return a, nil
}

func parseListenAddr(s string) (listenAddr, error) {
	network, addr, ok := strings.Cut(s, ":")
	if !ok {
		return listenAddr{}, fmt.Errorf("listen address %q: want unix:PATH or tcp:HOST:PORT", s)
	}
	switch network {
	case "unix":
		if addr == "" {
			return listenAddr{}, fmt.Errorf("listen address %q: empty socket path", s)
		}
		return listenAddr{network: "unix", addr: filepath.Clean(addr)}, nil
	case "tcp":
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			return listenAddr{}, fmt.Errorf("listen address %q: %w", s, err)
		}
		if p, err := strconv.ParseUint(port, 10, 16); err != nil || (p == 0 && port != "0") {
			return listenAddr{}, fmt.Errorf("listen address %q: bad port %q", s, port)
		}
		return listenAddr{network: "tcp", addr: addr}, nil
	default:
		return listenAddr{}, fmt.Errorf("listen address %q: unknown network %q (want unix or tcp)", s, network)
	}
}
