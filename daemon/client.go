package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/nbdclone/nbdclone/target"
)

// Client talks to a daemon's control socket. Its errors carry the daemon's
// text (what the CLI prints) and wrap the matching sentinel (ErrNotFound,
// ErrInvalid, ...); a *target.DMError cause is not carried over the wire,
// only its text. Safe for concurrent use.
type Client struct {
	path string
	hc   *http.Client
}

// Dial returns a client for the control socket at controlPath, after
// checking that a daemon listens there.
func Dial(controlPath string) (*Client, error) {
	c := &Client{path: controlPath}
	c.hc = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", controlPath)
		},
		MaxIdleConns:    4,
		IdleConnTimeout: 30 * time.Second,
	}}
	conn, err := net.DialTimeout("unix", controlPath, 5*time.Second)
	if err != nil {
		return nil, c.unreachable(err)
	}
	conn.Close()
	return c, nil
}

// Path is the control socket path.
func (c *Client) Path() string { return c.path }

// Close releases idle connections.
func (c *Client) Close() error {
	c.hc.CloseIdleConnections()
	return nil
}

func (c *Client) unreachable(err error) error {
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return &opError{kind: ErrUnreachable, cause: err,
			msg: fmt.Sprintf("cannot reach the nbdclone daemon at %s: is `nbdclone serve` running?", c.path)}
	}
	return &opError{kind: ErrUnreachable, cause: err,
		msg: fmt.Sprintf("cannot reach the nbdclone daemon at %s: %v", c.path, errors.Unwrap(err))}
}

// Create is dmsetup create: build the table, resume it and export it as
// name. dir resolves relative paths in the table (the caller's working
// directory); "" leaves them relative to the daemon's.
func (c *Client) Create(ctx context.Context, name, table, dir string) (Device, error) {
	var dev Device
	err := c.do(ctx, http.MethodPost, "/v1/devices", createRequest{Name: name, Table: table, Dir: dir}, &dev)
	return dev, err
}

// Load is dmsetup load: table becomes the device's inactive table, swapped
// in by the next Resume.
func (c *Client) Load(ctx context.Context, name, table, dir string) error {
	return c.do(ctx, http.MethodPost, devPath(name, "load"), loadRequest{Table: table, Dir: dir}, nil)
}

// Suspend is dmsetup suspend: new I/O waits, I/O in flight drains (for at
// most timeout; 0 is the daemon's default of 30 s), the target commits.
func (c *Client) Suspend(ctx context.Context, name string, timeout time.Duration) error {
	return c.do(ctx, http.MethodPost, devPath(name, "suspend"), suspendRequest{TimeoutMillis: timeout.Milliseconds()}, nil)
}

// Resume is dmsetup resume: swap in the loaded table, if any, and let I/O
// through.
func (c *Client) Resume(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, devPath(name, "resume"), struct{}{}, nil)
}

// Message is dmsetup message NAME SECTOR ARGS...; sector must be "0".
func (c *Client) Message(ctx context.Context, name, sector string, args []string) error {
	return c.do(ctx, http.MethodPost, devPath(name, "message"), messageRequest{Sector: sector, Args: args}, nil)
}

// Status is dmsetup status NAME: "0 <len> <type> <status>". For a clone the
// target commits metadata first, as dm-clone does.
func (c *Client) Status(ctx context.Context, name string) (string, error) {
	return c.text(ctx, devPath(name, "status"))
}

// Info is the JSON status: the device and its target's Info snapshot. It
// never commits metadata.
func (c *Client) Info(ctx context.Context, name string) (DeviceStatus, error) {
	var st DeviceStatus
	err := c.do(ctx, http.MethodGet, devPath(name, "status")+"?format=json", nil, &st)
	return st, err
}

// Table is dmsetup table NAME (inactive: dmsetup table --inactive; "" when
// no table is loaded).
func (c *Client) Table(ctx context.Context, name string, inactive bool) (string, error) {
	p := devPath(name, "table")
	if inactive {
		p += "?inactive=1"
	}
	return c.text(ctx, p)
}

// Remove is dmsetup remove. Without force it fails with ErrBusy while NBD
// clients are connected; with force they are disconnected.
func (c *Client) Remove(ctx context.Context, name string, force bool) error {
	p := devPath(name, "")
	if force {
		p += "?force=1"
	}
	return c.do(ctx, http.MethodDelete, p, nil, nil)
}

// Get returns one device as List shows it.
func (c *Client) Get(ctx context.Context, name string) (Device, error) {
	var dev Device
	err := c.do(ctx, http.MethodGet, devPath(name, ""), nil, &dev)
	return dev, err
}

// List returns every device, sorted by name.
func (c *Client) List(ctx context.Context) ([]Device, error) {
	var devs []Device
	err := c.do(ctx, http.MethodGet, "/v1/devices", nil, &devs)
	return devs, err
}

// Wait blocks until the device is hydrated (at once for non-clone tables)
// and returns its Info then. It fails when hydration cannot finish
// (metadata in Fail mode, hydration stopped on errors) or the device is
// removed; cancel ctx to give up.
func (c *Client) Wait(ctx context.Context, name string) (target.Info, error) {
	var info target.Info
	err := c.do(ctx, http.MethodPost, devPath(name, "wait"), struct{}{}, &info)
	return info, err
}

func devPath(name, op string) string {
	p := "/v1/devices/" + url.PathEscape(name)
	if op != "" {
		p += "/" + op
	}
	return p
}

func (c *Client) text(ctx context.Context, path string) (string, error) {
	var buf bytes.Buffer
	if err := c.do(ctx, http.MethodGet, path, nil, &buf); err != nil {
		return "", err
	}
	return strings.TrimRight(buf.String(), "\n"), nil
}

// do sends one request. out is a *bytes.Buffer for text replies, a pointer
// to decode JSON into, or nil.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://nbdclone"+path, body)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return c.unreachable(op)
		}
		return &opError{kind: ErrUnreachable, cause: err,
			msg: fmt.Sprintf("lost the nbdclone daemon at %s: %v", c.path, err)}
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	switch o := out.(type) {
	case nil:
		io.Copy(io.Discard, resp.Body)
		return nil
	case *bytes.Buffer:
		_, err = o.ReadFrom(resp.Body)
	default:
		err = json.NewDecoder(resp.Body).Decode(out)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: reading the daemon's reply: %w", ErrInternal, err)
	}
	return nil
}

func decodeError(resp *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, maxRequestBody))
	var e errorResponse
	if err := json.Unmarshal(data, &e); err != nil || e.Error == "" {
		return newErr(ErrInternal, "the daemon answered %s: %s", resp.Status, strings.TrimSpace(string(data)))
	}
	kind := ErrInternal
	for _, k := range errorKinds {
		if k.kind == e.Kind {
			kind = k.err
			break
		}
	}
	return &opError{kind: kind, msg: e.Error}
}
