package blockdev

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// HTTPOptions configure an http(s) source. Zero values mean the defaults.
type HTTPOptions struct {
	// Client, if set, is used as is (tests); otherwise one is made from
	// the fields below.
	Client *http.Client
	// TLSConfig for https; nil means the system roots (SSL_CERT_FILE and
	// SSL_CERT_DIR are honoured). Verification is always on unless the
	// caller's config turns it off.
	TLSConfig *tls.Config
	// Connections is the most connections to the host (and requests in
	// flight). Default 16.
	Connections int
	// RequestBytes is the largest range fetched by one request.
	// Default 4 MiB.
	RequestBytes int64
	// WindowBytes is how many bytes a copier should keep in flight.
	// Default 64 MiB.
	WindowBytes int64
	// RequestTimeout bounds one request, its body included. Default 60 s.
	RequestTimeout time.Duration
	// Retry bounds each call (attempts, backoff, total time).
	Retry  RetryPolicy
	Logger *slog.Logger
}

func (o *HTTPOptions) setDefaults() {
	if o.Connections <= 0 {
		o.Connections = 16
	}
	if o.RequestBytes <= 0 {
		o.RequestBytes = 4 << 20
	}
	if o.WindowBytes <= 0 {
		o.WindowBytes = DefaultWindowBytes
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 60 * time.Second
	}
	o.Retry = o.Retry.withDefaults()
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// HTTP is an object behind an http(s) URL read with Range requests: a
// clone's source. The object is pinned when opened (ETag, or Last-Modified
// and size): every read asks the server for that version (If-Match or
// If-Unmodified-Since) and checks the reply's validators, so a changed
// object fails with ErrSourceChanged instead of mixing two versions.
type HTTP struct {
	url    string
	name   string // url without its query (presigned URLs carry secrets there)
	opts   HTTPOptions
	log    *slog.Logger
	client *http.Client
	own    *http.Transport // closed at Close when we made it

	size         int64
	etag         string
	lastModified string
	id           string

	closed                      atomic.Bool
	requests, retries, failures atomic.Uint64
}

var (
	_ Reader        = (*HTTP)(nil)
	_ ContextReader = (*HTTP)(nil)
	_ Identifier    = (*HTTP)(nil)
	_ Remote        = (*HTTP)(nil)
)

func isHTTPURL(spec string) bool {
	l := strings.ToLower(spec)
	return strings.HasPrefix(l, "http://") || strings.HasPrefix(l, "https://")
}

// redactURL drops the query and credentials of a URL for logs and errors.
func redactURL(spec string) string {
	u, err := url.Parse(spec)
	if err != nil {
		if i := strings.IndexAny(spec, "?#"); i >= 0 {
			return spec[:i]
		}
		return spec
	}
	if u.User != nil {
		u.User = url.User("xxxxx")
	}
	if u.RawQuery != "" {
		u.RawQuery = "…"
	}
	u.Fragment = ""
	return u.String()
}

// OpenHTTP opens an http(s) object: its size from HEAD (or a one-byte
// ranged GET where HEAD is refused, as with presigned URLs), its identity
// from ETag or Last-Modified. The server must support Range requests.
func OpenHTTP(ctx context.Context, rawURL string, opts HTTPOptions) (*HTTP, error) {
	opts.setDefaults()
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: %s", ErrBadURI, redactURL(rawURL))
	}
	h := &HTTP{url: rawURL, name: redactURL(rawURL), opts: opts}
	h.log = opts.Logger.With("source", h.name)
	h.client = opts.Client
	if h.client == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxConnsPerHost = opts.Connections
		t.MaxIdleConnsPerHost = opts.Connections
		t.MaxIdleConns = opts.Connections
		t.DisableCompression = true // a compressed range is useless to us
		t.ForceAttemptHTTP2 = true
		t.ResponseHeaderTimeout = opts.RequestTimeout
		if opts.TLSConfig != nil {
			t.TLSClientConfig = opts.TLSConfig.Clone()
		}
		h.own = t
		h.client = &http.Client{Transport: t}
	}
	err = retry(ctx, opts.Retry, "blockdev: open "+h.name, h.probe, func(int, error) { h.retries.Add(1) })
	if err != nil {
		h.closeTransport()
		return nil, err
	}
	switch {
	case h.etag != "":
		h.id = "etag:" + h.etag + ";size:" + strconv.FormatInt(h.size, 10)
	case h.lastModified != "":
		h.id = "last-modified:" + h.lastModified + ";size:" + strconv.FormatInt(h.size, 10)
	default:
		h.log.Warn("http source has neither ETag nor Last-Modified: a change of the object cannot be detected")
	}
	h.log.Info("http source opened", "size", h.size, "id", h.id)
	return h, nil
}

func (h *HTTP) request(ctx context.Context, method string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, h.url, nil)
	if err != nil {
		return nil, permanent(fmt.Errorf("blockdev: %s: %w", h.name, err))
	}
	req.Header.Set("User-Agent", "nbdclone")
	return req, nil
}

// probe learns size and validators; HEAD first, a ranged GET where HEAD
// is refused or says nothing useful.
func (h *HTTP) probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, h.opts.RequestTimeout)
	defer cancel()
	req, err := h.request(ctx, http.MethodHead)
	if err != nil {
		return err
	}
	h.requests.Add(1)
	resp, err := h.client.Do(req)
	if err != nil {
		return fmt.Errorf("blockdev: HEAD %s: %w", h.name, err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK && resp.ContentLength > 0 && resp.Header.Get("Accept-Ranges") == "bytes" {
		h.size = resp.ContentLength
		h.etag, h.lastModified = resp.Header.Get("ETag"), resp.Header.Get("Last-Modified")
		return nil
	}
	if err := statusErr("HEAD", h.name, resp); err != nil && isTransientStatus(resp.StatusCode) {
		return err
	}
	// A ranged GET of the first byte: 206 with the total size proves
	// Range support.
	req, err = h.request(ctx, http.MethodGet)
	if err != nil {
		return err
	}
	req.Header.Set("Range", "bytes=0-0")
	h.requests.Add(1)
	resp, err = h.client.Do(req)
	if err != nil {
		return fmt.Errorf("blockdev: GET %s: %w", h.name, err)
	}
	defer drainClose(resp.Body)
	switch resp.StatusCode {
	case http.StatusPartialContent:
		_, _, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || total <= 0 {
			return permanent(fmt.Errorf("blockdev: GET %s: bad Content-Range %q", h.name, resp.Header.Get("Content-Range")))
		}
		h.size = total
		h.etag, h.lastModified = resp.Header.Get("ETag"), resp.Header.Get("Last-Modified")
		return nil
	case http.StatusOK:
		return permanent(fmt.Errorf("blockdev: %s: the server does not support Range requests", h.name))
	default:
		return statusErr("GET", h.name, resp)
	}
}

func isTransientStatus(code int) bool {
	switch code {
	case http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusInternalServerError,
		http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// statusErr is the error for an unexpected status: transient for
// overload and gateway errors, permanent otherwise.
func statusErr(method, name string, resp *http.Response) error {
	err := fmt.Errorf("blockdev: %s %s: %s", method, name, resp.Status)
	if isTransientStatus(resp.StatusCode) {
		return err
	}
	return permanent(err)
}

func drainClose(body io.ReadCloser) {
	// Reading a little of what is left lets the connection be reused.
	io.Copy(io.Discard, io.LimitReader(body, 64<<10))
	body.Close()
}

// parseContentRange parses "bytes first-last/total" (total may be "*": -1).
func parseContentRange(s string) (first, last, total int64, err error) {
	bad := fmt.Errorf("bad Content-Range %q", s)
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if first, err = strconv.ParseInt(a, 10, 64); err != nil {
		return 0, 0, 0, bad
	}
	if last, err = strconv.ParseInt(b, 10, 64); err != nil || last < first {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil {
			return 0, 0, 0, bad
		}
	}
	return first, last, total, nil
}

func (h *HTTP) Size() int64             { return h.size }
func (h *HTTP) LogicalBlockSize() int64 { return 512 }
func (h *HTTP) SourceID() string        { return h.id }

// Window is the in-flight byte count and request size that fill the link.
func (h *HTTP) Window() (int64, int64) { return h.opts.WindowBytes, h.opts.RequestBytes }

// RemoteStats returns the source's counters.
func (h *HTTP) RemoteStats() RemoteStats {
	return RemoteStats{Requests: h.requests.Load(), Retries: h.retries.Load(), Failures: h.failures.Load()}
}

func (h *HTTP) ReadAt(p []byte, off int64) (int, error) {
	return h.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext reads len(p) bytes at off with Range requests of at most
// RequestBytes, in flight together.
func (h *HTTP) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if h.closed.Load() {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, fmt.Errorf("blockdev: read %s at negative offset %d", h.name, off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off >= h.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > h.size-off {
		p, eof = p[:h.size-off], io.EOF
	}
	step := h.opts.RequestBytes
	if int64(len(p)) <= step {
		if err := h.readPiece(ctx, p, off); err != nil {
			return 0, err
		}
		return len(p), eof
	}
	n := (int64(len(p)) + step - 1) / step
	errs := make(chan error, n)
	for i := range n {
		lo := i * step
		hi := min(lo+step, int64(len(p)))
		go func() { errs <- h.readPiece(ctx, p[lo:hi], off+lo) }()
	}
	var first error
	for range n {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return 0, first
	}
	return len(p), eof
}

func (h *HTTP) readPiece(ctx context.Context, p []byte, off int64) error {
	what := fmt.Sprintf("blockdev: read %s at %d+%d", h.name, off, len(p))
	err := retry(ctx, h.opts.Retry, what, func(ctx context.Context) error { return h.get(ctx, p, off) },
		func(attempt int, err error) {
			h.retries.Add(1)
			h.log.Debug("http range request failed; retrying", "attempt", attempt, "err", err)
		})
	if err != nil {
		h.failures.Add(1)
	}
	return err
}

// get is one ranged GET of exactly p at off.
func (h *HTTP) get(ctx context.Context, p []byte, off int64) error {
	ctx, cancel := context.WithTimeout(ctx, h.opts.RequestTimeout)
	defer cancel()
	req, err := h.request(ctx, http.MethodGet)
	if err != nil {
		return err
	}
	last := off + int64(len(p)) - 1
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, last))
	// Ask for the pinned version only: a server with another one answers
	// 412 instead of sending its bytes.
	switch {
	case h.etag != "" && !strings.HasPrefix(h.etag, "W/"):
		req.Header.Set("If-Match", h.etag)
	case h.etag == "" && h.lastModified != "":
		req.Header.Set("If-Unmodified-Since", h.lastModified)
	}
	h.requests.Add(1)
	resp, err := h.client.Do(req)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("%w: GET %s: %w", ErrTimeout, h.name, err)
		}
		return fmt.Errorf("blockdev: GET %s: %w", h.name, err)
	}
	defer drainClose(resp.Body)
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusPreconditionFailed:
		return fmt.Errorf("%w: %s no longer matches %s (HTTP 412)", ErrSourceChanged, h.name, h.id)
	case http.StatusOK:
		if off != 0 || int64(len(p)) != h.size {
			return permanent(fmt.Errorf("blockdev: GET %s: the server ignored the Range header", h.name))
		}
	case http.StatusRequestedRangeNotSatisfiable:
		return fmt.Errorf("%w: %s: range %d-%d not satisfiable (the object shrank?)", ErrSourceChanged, h.name, off, last)
	default:
		return statusErr("GET", h.name, resp)
	}
	if err := h.checkValidators(resp); err != nil {
		return err
	}
	if resp.StatusCode == http.StatusPartialContent {
		first, l, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return fmt.Errorf("%w: GET %s: %w", ErrProtocol, h.name, err)
		}
		if total >= 0 && total != h.size {
			return fmt.Errorf("%w: %s is now %d bytes, was %d", ErrSourceChanged, h.name, total, h.size)
		}
		if first != off || l != last {
			return fmt.Errorf("%w: GET %s: asked for bytes %d-%d, got %d-%d", ErrProtocol, h.name, off, last, first, l)
		}
	}
	if _, err := io.ReadFull(resp.Body, p); err != nil {
		return fmt.Errorf("blockdev: GET %s: body: %w", h.name, err)
	}
	return nil
}

// checkValidators compares a reply's ETag and Last-Modified with the pin.
func (h *HTTP) checkValidators(resp *http.Response) error {
	if h.etag != "" {
		if got := resp.Header.Get("ETag"); got != "" && strings.TrimPrefix(got, "W/") != strings.TrimPrefix(h.etag, "W/") {
			return fmt.Errorf("%w: %s has ETag %s, was %s", ErrSourceChanged, h.name, got, h.etag)
		}
		return nil
	}
	if h.lastModified != "" {
		if got := resp.Header.Get("Last-Modified"); got != "" && got != h.lastModified {
			return fmt.Errorf("%w: %s was modified at %s, pinned %s", ErrSourceChanged, h.name, got, h.lastModified)
		}
	}
	return nil
}

func (h *HTTP) closeTransport() {
	if h.own != nil {
		h.own.CloseIdleConnections()
	}
}

// Close releases idle connections. Idempotent.
func (h *HTTP) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	h.closeTransport()
	return nil
}
