package main

import (
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"

	"github.com/nbdclone/nbdclone/daemon"
)

func (c *cli) serveCmd() *cobra.Command {
	var (
		listen    []string
		stateDir  string
		metrics   string
		pprof     bool
		logFormat string
		logLevel  string
		onEvent   string
		tlsCfg    daemon.TLSConfig
		srcCache  string
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the daemon: serve devices over NBD and the control socket",
		Long: `Run the nbdclone daemon in the foreground until SIGINT or SIGTERM.

It listens for NBD clients on every --listen address (unix:PATH, mode 0660,
or tcp:HOST:PORT; TCP only when asked), for the other nbdclone commands on
the control socket (--control, mode 0600), and, with --metrics, serves
Prometheus metrics at http://HOST:PORT/metrics. Socket directories are
created; a stale socket left by a dead daemon is replaced, a live one is an
error.

Every device is recorded in the state directory; on start, each is rebuilt
and resumed. A device that cannot be rebuilt is listed as failed by
"nbdclone ls" rather than stopping the daemon.

On SIGINT or SIGTERM the daemon stops accepting connections, drains and
suspends every device (committing metadata), disconnects NBD clients and
exits 0. Logs go to stderr.

TLS (NBD_OPT_STARTTLS) is off by default. --tls on offers it, --tls require
insists on it: until a client has started TLS it gets NBD_REP_ERR_TLS_REQD
for every option, so not even the export list is shown. Both need the
server's certificate and key (PEM); --tls-verify-peer also requires every
client to present a certificate signed by --tls-ca. libnbd clients connect
with nbds+unix:// or nbds:// URIs and ?tls-certificates=DIR (a directory
holding ca-cert.pem, and client-cert.pem and client-key.pem when the server
verifies peers).`,
		Example: `  nbdclone serve
  nbdclone serve --listen unix:/run/nbdclone/nbd.sock --listen tcp:127.0.0.1:10809 --metrics tcp:127.0.0.1:9810
  nbdclone serve --listen tcp:0.0.0.0:10809 --tls require --tls-cert server-cert.pem --tls-key server-key.pem \
      --tls-verify-peer --tls-ca ca-cert.pem`,
		Args: args(0, 0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := newLogger(c.env, logFormat, logLevel)
			if err != nil {
				return &usageError{cmd: cmd.CommandPath(), err: err}
			}
			for i, l := range listen {
				if p, ok := strings.CutPrefix(l, "unix:"); ok {
					listen[i] = "unix:" + c.absPath(p)
				}
			}
			for _, p := range []*string{&tlsCfg.Cert, &tlsCfg.Key, &tlsCfg.CA} {
				if *p != "" {
					*p = c.absPath(*p)
				}
			}
			cacheBytes, err := parseSize(srcCache)
			if err != nil {
				return &usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("serve: --source-cache: %w", err)}
			}
			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			d, err := daemon.New(daemon.Config{
				Listen:     listen,
				Control:    c.absPath(c.control),
				StateDir:   c.absPath(stateDir),
				Metrics:    metrics,
				Pprof:      pprof,
				Logger:     logger,
				Registerer: reg,
				Gatherer:   reg,
				OnEvent:    onEvent,
				TLS:        tlsCfg,

				SourceCache: cacheBytes,
			})
			if err != nil {
				return err
			}
			ran := make(chan struct{})
			defer close(ran)
			go notifyReady(d, ran, c.env.getenv, logger) // systemd Type=notify
			return d.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&listen, "listen", []string{daemon.DefaultListen}, "NBD listen address, unix:PATH or tcp:HOST:PORT, optionally ?exports=A,B to serve only those exports there (repeatable)")
	f.StringVar(&stateDir, "state", daemon.DefaultStateDir, "state directory: one file per device, restored on start")
	f.StringVar(&metrics, "metrics", "", "serve Prometheus metrics on tcp:HOST:PORT at /metrics (default off)")
	f.BoolVar(&pprof, "pprof", false, "also serve Go's profiler at /debug/pprof/ on the --metrics listener")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.StringVar(&onEvent, "on-event", "", "shell command run on each event (created, hydrated, hydration_stopped, suspended, swapped, removed, ...: see nbdclone events --help), with $NBDCLONE_EVENT, $NBDCLONE_DEVICE, $NBDCLONE_NBD, $NBDCLONE_TABLE, $NBDCLONE_DETAIL")
	f.StringVar(&srcCache, "source-cache", "0", "read cache per shared clone source (clones of one path or URI share one reader), e.g. 256M or 1G; 0 shares without caching")
	f.StringVar(&tlsCfg.Mode, "tls", "off", "TLS for NBD clients: off, on (offered) or require")
	f.StringVar(&tlsCfg.Cert, "tls-cert", "", "PEM server certificate (with its chain), for --tls on|require")
	f.StringVar(&tlsCfg.Key, "tls-key", "", "PEM private key of --tls-cert")
	f.StringVar(&tlsCfg.CA, "tls-ca", "", "PEM CA certificates that client certificates must chain to (with --tls-verify-peer)")
	f.BoolVar(&tlsCfg.VerifyPeer, "tls-verify-peer", false, "require a client certificate signed by --tls-ca")
	return cmd
}

func newLogger(e *env, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("serve: unknown log level %q (want debug, info, warn or error)", level)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(e.stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(e.stderr, opts)), nil
	default:
		return nil, fmt.Errorf("serve: unknown log format %q (want text or json)", format)
	}
}

// parseSize reads a byte count with an optional K, M, G or T suffix
// (powers of 1024; "KiB" and "KB" spellings too).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	upper := strings.ToUpper(t)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}} {
		for _, spelling := range []string{u.suffix + "IB", u.suffix + "B", u.suffix} {
			if strings.HasSuffix(upper, spelling) {
				upper, mult = strings.TrimSuffix(upper, spelling), u.mult
				break
			}
		}
		if mult != 1 {
			break
		}
	}
	upper = strings.TrimSuffix(upper, "B")
	n, err := strconv.ParseInt(strings.TrimSpace(upper), 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("bad size %q: want a number of bytes with an optional K, M, G or T suffix", s)
	}
	return n * mult, nil
}
