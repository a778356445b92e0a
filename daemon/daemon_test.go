package daemon

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nbdclone/nbdclone/internal/testutil"
)

type testDaemon struct {
	*Daemon
	control, nbd, state string
	runErr              chan error
}

// startDaemon runs a daemon on temp sockets; build substitutes the target
// builder when not nil.
func startDaemon(t *testing.T, state string, build buildFunc, mutate func(*Config)) *testDaemon {
	t.Helper()
	sock := testutil.ShortDir(t)
	cfg := Config{
		Listen:   []string{"unix:" + filepath.Join(sock, "nbd.sock")},
		Control:  filepath.Join(sock, "run", "control.sock"),
		StateDir: state,
		Logger:   testLogger(t),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if build != nil {
		d.reg.build = build
	}
	td := &testDaemon{Daemon: d, control: cfg.Control, nbd: filepath.Join(sock, "nbd.sock"), state: state, runErr: make(chan error, 1)}
	go func() { td.runErr <- d.Run(context.Background()) }()
	select {
	case <-d.Ready():
	case err := <-td.runErr:
		t.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("daemon not ready in 10s")
	}
	t.Cleanup(func() { td.stop(t) })
	return td
}

func (td *testDaemon) stop(t *testing.T) {
	t.Helper()
	if err := td.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case err := <-td.runErr:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
		td.runErr <- nil
	default:
	}
	td.Close() // idempotent
}

func dial(t *testing.T, path string) *Client {
	t.Helper()
	c, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestDaemonControlAPI(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	reg := prometheus.NewRegistry()
	td := startDaemon(t, t.TempDir(), f.build, func(c *Config) {
		c.Metrics = "tcp:127.0.0.1:0"
		c.Registerer = reg
	})
	for path, mode := range map[string]os.FileMode{td.control: 0o600, td.nbd: 0o660} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v, %v; want a socket of mode %o", path, fi.Mode(), err, mode)
		}
	}
	if fi, err := os.Stat(filepath.Dir(td.control)); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("control socket dir: %v %v", fi.Mode(), err)
	}

	c := dial(t, td.control)
	dev, err := c.Create(ctx, "c", "0 64 clone md dest src 8", "/data")
	if err != nil {
		t.Fatal(err)
	}
	want := "nbd+unix:///c?socket=" + td.nbd
	if dev.Name != "c" || dev.State != StateActive || dev.SizeBytes != 64*512 || len(dev.URIs) != 1 || dev.URIs[0] != want {
		t.Errorf("created %+v", dev)
	}
	_, err = c.Create(ctx, "c", "0 64 fake", "")
	mustErr(t, err, ErrExists, "device c already exists")
	_, err = c.Create(ctx, "x", "0 64 fake fail", "")
	mustErr(t, err, ErrInvalid, "Region size is not a power of 2")
	_, err = c.Create(ctx, "x/y", "0 64 fake", "")
	mustErr(t, err, ErrInvalid, "")

	line, err := c.Status(ctx, "c")
	if err != nil || line != "0 64 clone 8 1/2 8 0/8 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw" {
		t.Errorf("status %q %v", line, err)
	}
	st, err := c.Info(ctx, "c")
	if err != nil || st.Info == nil || st.Info.Clone.Regions != 8 || st.URIs[0] != want {
		t.Errorf("info %+v %v", st, err)
	}
	// The table comes back with its paths resolved against the caller's
	// directory.
	canon := "0 64 clone " + filepath.Join("/data", "md") + " " + filepath.Join("/data", "dest") + " " + filepath.Join("/data", "src") + " 8"
	if dev.Table != canon {
		t.Errorf("created table %q, want %q", dev.Table, canon)
	}
	if line, err := c.Table(ctx, "c", false); err != nil || line != canon {
		t.Errorf("table %q %v, want %q", line, err, canon)
	}
	if line, err := c.Table(ctx, "c", true); err != nil || line != "" {
		t.Errorf("inactive table %q %v", line, err)
	}
	mustErr(t, c.Message(ctx, "c", "0", []string{"nope"}), ErrInvalid, "Unsupported message")
	mustErr(t, c.Message(ctx, "c", "8", []string{"ok"}), ErrInvalid, "Invalid sector")
	if err := c.Message(ctx, "c", "0", []string{"ok"}); err != nil {
		t.Error(err)
	}
	_, err = c.Status(ctx, "nope")
	mustErr(t, err, ErrNotFound, "device nope does not exist")

	// Metrics read Info at scrape time.
	resp, err := http.Get("http://" + td.MetricsAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{
		`nbdclone_regions{device="c"} 8`,
		`nbdclone_hydrated_regions{device="c"} 0`,
		`nbdclone_region_size_bytes{device="c"} 4096`,
		`nbdclone_metadata_mode{device="c",mode="rw"} 1`,
		`nbdclone_metadata_mode{device="c",mode="ro"} 0`,
		`nbdclone_hydrated_bytes_total{cause="discard",device="c"} 0`,
		`nbdclone_connections{device="c"} 0`,
		`nbdclone_device_suspended{device="c"} 0`,
		"# HELP nbdclone_copy_errors_total ",
	} {
		if !strings.Contains(string(body), m) {
			t.Errorf("metrics lack %q", m)
		}
	}

	// suspend / load / resume.
	if err := c.Suspend(ctx, "c", time.Second); err != nil {
		t.Fatal(err)
	}
	if devs, err := c.List(ctx); err != nil || len(devs) != 1 || devs[0].State != StateSuspended {
		t.Errorf("list %+v %v", devs, err)
	}
	if err := c.Load(ctx, "c", "0 64 fake", ""); err != nil {
		t.Fatal(err)
	}
	mustErr(t, c.Load(ctx, "c", "0 65 fake", ""), ErrInvalid, "table length differs from the live table: NBD clients cannot see a size change (live 64 sectors, new 65)")
	if line, err := c.Table(ctx, "c", true); err != nil || line != "0 64 fake" {
		t.Errorf("inactive table %q %v", line, err)
	}
	if err := c.Resume(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if info, err := c.Wait(ctx, "c"); err != nil || info.Type != "fake" {
		t.Errorf("wait %+v %v", info, err)
	}
	if err := c.Remove(ctx, "c", false); err != nil {
		t.Fatal(err)
	}
	mustErr(t, c.Remove(ctx, "c", false), ErrNotFound, "device c does not exist")
	if devs, err := c.List(ctx); err != nil || len(devs) != 0 {
		t.Errorf("list %+v %v", devs, err)
	}

	// Unknown routes answer JSON errors too.
	resp, err = c.hc.Get("http://nbdclone/v2/nothing")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown route: %s", resp.Status)
	}
}

func TestDaemonSockets(t *testing.T) {
	state := t.TempDir()
	td := startDaemon(t, state, nil, nil)

	// A live control socket: a second daemon refuses to start.
	d2, err := New(Config{Listen: []string{"unix:" + filepath.Join(testutil.ShortDir(t), "n.sock")}, Control: td.control, StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	err = d2.Run(t.Context())
	mustErr(t, err, ErrExists, "another nbdclone daemon is listening on "+td.control)
	if _, err := os.Stat(td.control); err != nil {
		t.Fatal("the refused daemon removed the live socket")
	}
	td.stop(t)
	for _, p := range []string{td.control, td.nbd} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left after Close", p)
		}
	}

	// Stale sockets (nobody listening) are replaced.
	for _, p := range []string{td.control, td.nbd} {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		l.Close()
	}
	d3, err := New(Config{Listen: []string{"unix:" + td.nbd}, Control: td.control, StateDir: state, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d3.Run(context.Background()) }()
	select {
	case <-d3.Ready():
	case err := <-done:
		t.Fatalf("over stale sockets: %v", err)
	}
	dial(t, td.control)
	d3.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// No daemon: a clear error.
	_, err = Dial(td.control)
	mustErr(t, err, ErrUnreachable, "cannot reach the nbdclone daemon at "+td.control+": is `nbdclone serve` running?")

	// Something that is not a socket is never removed.
	os.WriteFile(td.control, nil, 0o600)
	d4, _ := New(Config{Listen: []string{"unix:" + td.nbd}, Control: td.control, StateDir: state})
	mustErr(t, d4.Run(t.Context()), ErrExists, td.control+" exists and is not a socket")
}

// TestDaemonRestart: devices come back from the state dir after a restart,
// and nothing leaks.
func TestDaemonRestart(t *testing.T) {
	ctx := t.Context()
	before := goroutines()
	state := t.TempDir()
	dir := t.TempDir()
	tempImage(t, dir, "a.img", 1<<20, 'a')

	td := startDaemon(t, state, nil, nil)
	c := dial(t, td.control)
	if _, err := c.Create(ctx, "a", "0 2048 linear a.img 0", dir); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Create(ctx, "b", "0 1024 linear a.img 1024", dir); err != nil {
		t.Fatal(err)
	}
	if err := c.Suspend(ctx, "b", 0); err != nil {
		t.Fatal(err)
	}
	// A long poll in flight ends with the daemon; the device, a clone only
	// the fake builder can build, comes back failed.
	f := newFakeFactory()
	td.reg.build = f.build
	if _, err := c.Create(ctx, "c", "0 8 clone md", "/"); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(ctx, "c", false); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Create(ctx, "c", "0 8 clone md", "/"); err != nil {
		t.Fatal(err)
	}
	waitErr := make(chan error, 1)
	go func() { _, err := c.Wait(ctx, "c"); waitErr <- err }()
	waitFor(t, func() bool { return len(f.all()) == 2 && f.all()[1].eventsRead() })
	td.stop(t)
	mustErr(t, <-waitErr, ErrClosed, "the nbdclone daemon is shutting down")
	c.Close()

	td2 := startDaemon(t, state, nil, nil)
	c2 := dial(t, td2.control)
	devs, err := c2.List(ctx)
	if err != nil || len(devs) != 3 {
		t.Fatalf("after restart: %+v %v", devs, err)
	}
	if d := devs[2]; d.Name != "c" || d.State != StateFailed || d.Error != "Invalid number of arguments" {
		t.Errorf("c after restart: %+v", d)
	}
	for _, d := range devs[:2] {
		if d.State != StateActive {
			t.Errorf("%s is %s after restart (a suspended device comes back resumed)", d.Name, d.State)
		}
	}
	if line, err := c2.Table(ctx, "b", false); err != nil || line != "0 1024 linear "+filepath.Join(dir, "a.img")+" 1024" {
		t.Errorf("table %q %v", line, err)
	}
	c2.Close()
	td2.stop(t)
	checkNoLeaks(t, before)
}

func goroutines() int { return runtime.NumGoroutine() }

// checkNoLeaks waits for goroutines started since before to end, and lists
// the daemon's and the NBD server's that did not.
func checkNoLeaks(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		var leaked []string
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			if strings.Contains(g, "testing.tRunner") || strings.Contains(g, "testing.(*T).Run") {
				continue
			}
			if strings.Contains(g, "nbdclone/daemon.") || strings.Contains(g, "nbdclone/nbdserver.") ||
				strings.Contains(g, "net/http.(*persistConn)") || strings.Contains(g, "net/http.(*conn).serve") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 && runtime.NumGoroutine() <= before+2 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines before, %d now; leaked:\n%s", before, runtime.NumGoroutine(), strings.Join(leaked, "\n\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestConfig(t *testing.T) {
	c := Config{}.WithDefaults()
	if c.Listen[0] != DefaultListen || c.Control != DefaultControl || c.StateDir != DefaultStateDir || c.Gatherer == nil {
		t.Errorf("defaults %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Error(err)
	}
	for _, bad := range []Config{
		{Listen: []string{"/path"}},
		{Listen: []string{"udp:1.2.3.4:5"}},
		{Listen: []string{"tcp:localhost"}},
		{Listen: []string{"tcp:localhost:99999"}},
		{Listen: []string{"unix:"}},
		{Listen: []string{"unix:/a", "unix:/a/"}},
		{Listen: []string{"unix:/a"}, Control: "/a"},
		{Metrics: "unix:/m"},
		{Metrics: "tcp:x"},
		{Registerer: prometheus.WrapRegistererWith(nil, prometheus.NewRegistry()), Metrics: "tcp:127.0.0.1:0"},
	} {
		err := bad.WithDefaults().Validate()
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%+v: %v", bad, err)
		}
	}
	if err := (Config{Listen: []string{"unix:/a", "tcp:127.0.0.1:10809", "tcp:[::1]:0"}, Metrics: "tcp::9100"}).WithDefaults().Validate(); err != nil {
		t.Error(err)
	}
	if _, err := New(Config{Listen: []string{"bogus"}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("New with a bad config: %v", err)
	}
}

func TestExportURI(t *testing.T) {
	for _, tc := range []struct {
		a    listenAddr
		want string
	}{
		{listenAddr{network: "unix", addr: "/run/nbdclone/nbd.sock"}, "nbd+unix:///d?socket=/run/nbdclone/nbd.sock"},
		{listenAddr{network: "tcp", addr: "127.0.0.1:10809"}, "nbd://127.0.0.1:10809/d"},
		{listenAddr{network: "tcp", addr: "0.0.0.0:10809"}, "nbd://localhost:10809/d"},
		{listenAddr{network: "tcp", addr: "[::1]:10809"}, "nbd://[::1]:10809/d"},
	} {
		if got := exportURI(tc.a, "d"); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.a, got, tc.want)
		}
	}
}

func TestGate(t *testing.T) {
	ctx := t.Context()
	g := newGate()
	if err := g.enter(ctx); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	n, err := g.close(cctx)
	cancel()
	if n != 1 || !errors.Is(err, context.DeadlineExceeded) || g.isClosed() {
		t.Fatalf("close with I/O in flight: %d %v closed=%v", n, err, g.isClosed())
	}
	closed := make(chan error)
	go func() { _, err := g.close(ctx); closed <- err }()
	waitFor(t, g.isClosed)
	g.leave()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	// Waiters wait for open, and fail on fail.
	cctx, cancel = context.WithTimeout(ctx, 10*time.Millisecond)
	if err := g.enter(cctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("enter on a closed gate: %v", err)
	}
	cancel()
	entered := make(chan error)
	go func() { entered <- g.enter(ctx) }()
	g.fail(errShutdown)
	if err := <-entered; !errors.Is(err, errShutdown) {
		t.Fatalf("enter on a failed gate: %v", err)
	}
	g.open()
	if err := g.enter(ctx); err != nil {
		t.Fatal(err)
	}
	g.leave()
	if g.inFlight() != 0 {
		t.Fatal("in flight")
	}
}

func TestDaemonTCPListener(t *testing.T) {
	f := newFakeFactory()
	td := startDaemon(t, t.TempDir(), f.build, func(c *Config) {
		c.Listen = append(c.Listen, "tcp:127.0.0.1:0")
	})
	c := dial(t, td.control)
	dev, err := c.Create(t.Context(), "d", "0 8 fake", "")
	if err != nil {
		t.Fatal(err)
	}
	if len(dev.URIs) != 2 || !strings.HasPrefix(dev.URIs[1], "nbd://127.0.0.1:") || strings.HasPrefix(dev.URIs[1], "nbd://127.0.0.1:0/") ||
		!strings.HasSuffix(dev.URIs[1], "/d") {
		t.Fatalf("URIs %q", dev.URIs)
	}
	addr := strings.TrimSuffix(strings.TrimPrefix(dev.URIs[1], "nbd://"), "/d")
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("NBD TCP listener: %v", err)
	}
	conn.Close()
}

func TestParseListenExports(t *testing.T) {
	for _, tc := range []struct {
		in      string
		exports []string
		bad     bool
	}{
		{in: "unix:/run/n.sock"},
		{in: "unix:/run/n.sock?exports=a", exports: []string{"a"}},
		{in: "tcp:127.0.0.1:10809?exports=a,b", exports: []string{"a", "b"}},
		{in: "tcp:127.0.0.1:10809?exports=", bad: true},
		{in: "unix:/run/n.sock?exports=a,,b", bad: true},
	} {
		a, err := parseListen(tc.in)
		if (err != nil) != tc.bad {
			t.Errorf("parseListen(%q): %v", tc.in, err)
			continue
		}
		if !tc.bad && !slices.Equal(a.exports, tc.exports) {
			t.Errorf("parseListen(%q): exports %v, want %v", tc.in, a.exports, tc.exports)
		}
		if !tc.bad && a.exports != nil && (a.allows("zzz") || !a.allows(tc.exports[0])) {
			t.Errorf("parseListen(%q): allows is wrong", tc.in)
		}
	}
}
