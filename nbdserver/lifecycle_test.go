package nbdserver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

func TestOptionsValidate(t *testing.T) {
	var o Options
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if o.Logger == nil || o.MaxInFlight != DefaultMaxInFlight || o.MaxPayload != DefaultMaxPayload ||
		o.MaxInFlightBytes != 4*DefaultMaxPayload || o.ShutdownGrace != DefaultShutdownGrace {
		t.Errorf("defaults: %+v", o)
	}
	bad := []Options{
		{MaxInFlight: -1},
		{MaxInFlight: maxMaxInFlight + 1},
		{MaxPayload: -5},
		{MaxPayload: minMaxPayload - 1},
		{MaxPayload: maxMaxPayload + 1},
		{MaxPayload: 1 << 20, MaxInFlightBytes: 1<<20 - 1},
		{ShutdownGrace: -time.Second},
	}
	for _, o := range bad {
		if err := o.Validate(); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("%+v: %v, want ErrInvalidOptions", o, err)
		}
		if _, err := NewServer(newMemExports(t), o); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("NewServer(%+v): %v", o, err)
		}
	}
	good := []Options{
		{MaxInFlight: 1, MaxPayload: minMaxPayload},
		{MaxInFlight: maxMaxInFlight, MaxPayload: maxMaxPayload, MaxInFlightBytes: maxMaxPayload},
	}
	for _, o := range good {
		if err := o.Validate(); err != nil {
			t.Errorf("%+v: %v", o, err)
		}
	}
	if _, err := NewServer(nil, Options{}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("nil exports: %v", err)
	}
}

func TestBufferPool(t *testing.T) {
	var p bufferPool
	for _, n := range []int{1, 511, 4096, 4097, 65536, 1<<20 + 1, 32 << 20} {
		bp := p.get(n)
		if len(*bp) != n {
			t.Fatalf("get(%d): len %d", n, len(*bp))
		}
		c := cap(*bp)
		if c&(c-1) != 0 || c < n || c < 1<<minBufferShift || (c > 1<<minBufferShift && c >= 2*n) {
			t.Fatalf("get(%d): cap %d is not the smallest power-of-two class", n, c)
		}
		p.put(bp)
	}
	// Foreign buffers are dropped, not pooled with a wrong class.
	odd := make([]byte, 5000)
	p.put(&odd)
	p.put(nil)
	if bp := p.get(5000); cap(*bp) != 8192 {
		t.Fatalf("cap %d", cap(*bp))
	}
}

func TestErrorMessage(t *testing.T) {
	long := make([]byte, 5000)
	for i := range long {
		long[i] = 'a'
	}
	long[nbdwire.MaxStringLen-1] = 0xe2 // first byte of a 3-byte rune the cut splits
	for in, check := range map[string]func(string) bool{
		"plain":         func(s string) bool { return s == "plain" },
		"nul\x00inside": func(s string) bool { return s == "nulinside" },
		"bad\xffutf8":   func(s string) bool { return s == "badutf8" },
		string(long):    func(s string) bool { return len(s) == nbdwire.MaxStringLen-1 },
	} {
		if got := errorMessage(in); !check(got) {
			t.Errorf("errorMessage(%.20q...) = %.20q... (len %d)", in, got, len(got))
		}
	}
}

func TestConnections(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	connect(t, srv.sock, "disk", false)
	connect(t, srv.sock, "disk", true)
	connect(t, srv.sock, "ro", false)
	negotiating := dialRaw(t, srv.sock)
	negotiating.handshake(nbdwire.FlagCFixedNewstyle)
	// connect returns after the GO's ACK, which the server sends after
	// counting the connection: no waiting needed.
	want := map[string]int{"disk": 2, "ro": 1}
	if got := srv.Connections(); !maps.Equal(got, want) {
		t.Fatalf("Connections %v, want %v", got, want)
	}
}

func TestDisconnectWaitsForRequestsInFlight(t *testing.T) {
	e, disk, ro := twoExports(t)
	gate := make(chan struct{})
	entered := make(chan struct{})
	var once sync.Once
	disk.hook = func(ctx context.Context, op string, off, n int64) error {
		once.Do(func() { close(entered) })
		<-gate
		return ctx.Err()
	}
	ro.fill([]byte("other"))
	srv := startServer(t, e, Options{ShutdownGrace: time.Hour})
	openGate := sync.OnceFunc(func() { close(gate) })
	t.Cleanup(openGate)
	rc := connect(t, srv.sock, "disk", false)
	rc2 := connect(t, srv.sock, "disk", true)
	other := connect(t, srv.sock, "ro", false)
	rc.request(nbdwire.CmdWrite, 0, 1, 0, 5, []byte("hello"))
	<-entered

	disconnected := make(chan int)
	go func() { disconnected <- srv.Disconnect("disk") }()
	waitFor(t, "Disconnect to begin", func() bool {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		for c := range srv.conns {
			if c.exportName == "disk" && !c.stopping() {
				return false
			}
		}
		return true
	})
	// The connections stopped reading, but the request in flight completes
	// and is answered before the close (the grace is an hour).
	openGate()
	rc.expectSimple(1, 0)
	rc.expectEOF()
	rc2.expectEOF()
	if n := <-disconnected; n != 2 {
		t.Fatalf("Disconnect = %d, want 2", n)
	}
	if string(disk.snapshot()[:5]) != "hello" {
		t.Fatal("the request in flight was lost")
	}
	// Disconnect returned: both connections are released, others untouched.
	if got := e.releases.Load(); got != 2 {
		t.Fatalf("releases %d", got)
	}
	if got := srv.Connections(); !maps.Equal(got, map[string]int{"ro": 1}) {
		t.Fatalf("Connections %v", got)
	}
	other.request(nbdwire.CmdRead, 0, 2, 0, 5, nil)
	if errno, _, data := other.readSimple(5); errno != 0 || string(data) != "other" {
		t.Fatalf("other export: %d %q", errno, data)
	}
	if n := srv.Disconnect("nope"); n != 0 {
		t.Fatalf("Disconnect(nope) = %d", n)
	}
}

func TestDisconnectGraceCancelsStuckRequests(t *testing.T) {
	e, disk, _ := twoExports(t)
	entered := make(chan struct{})
	cancelled := make(chan error, 1)
	disk.hook = func(ctx context.Context, op string, off, n int64) error {
		close(entered)
		<-ctx.Done() // a backend stuck until cancelled
		cancelled <- ctx.Err()
		return ctx.Err()
	}
	srv := startServer(t, e, Options{ShutdownGrace: time.Millisecond})
	rc := connect(t, srv.sock, "disk", false)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 512, nil)
	<-entered
	if n := srv.Disconnect("disk"); n != 1 {
		t.Fatalf("Disconnect = %d", n)
	}
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Fatalf("ctx error %v", err)
	}
	if e.releases.Load() != 1 {
		t.Fatal("not released when Disconnect returned")
	}
	// The reply may or may not beat the close; nothing else may arrive.
	b, _ := io.ReadAll(rc.r)
	if len(b) != 0 && (len(b) != nbdwire.SimpleReplyHeaderLen || be.Uint32(b[4:]) == 0) {
		t.Fatalf("after the grace: % x", b)
	}
}

func TestCloseIsIdempotentAndWaits(t *testing.T) {
	e, disk, _ := twoExports(t)
	entered := make(chan struct{})
	disk.hook = func(ctx context.Context, op string, off, n int64) error {
		close(entered)
		<-ctx.Done()
		return ctx.Err()
	}
	srv := startServer(t, e, Options{ShutdownGrace: time.Millisecond})
	rc := connect(t, srv.sock, "disk", false)
	negotiating := dialRaw(t, srv.sock)
	negotiating.handshake(nbdwire.FlagCFixedNewstyle)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 512, nil)
	<-entered

	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			if err := srv.Close(); err != nil {
				t.Error(err)
			}
			// Every call waits: the request, its connection and the
			// server's other goroutines are gone.
			if disk.inFlight.Load() != 0 || e.releases.Load() != 1 {
				t.Error("Close returned before its connection was torn down")
			}
		})
	}
	wg.Wait()
	checkNoServerGoroutines(t)
	negotiating.expectEOF()
	if e.releases.Load() != 1 {
		t.Fatal("export not released by Close")
	}
	l, err := net.Listen("unix", testutil.Sock(t, "late.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(context.Background(), l); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Serve after Close left its listener open: %v", err)
	}
}

func TestServeContextCancelShutsItsConnections(t *testing.T) {
	before := runtime.NumGoroutine()
	e, disk, _ := twoExports(t)
	disk.fill([]byte("x"))
	srv, err := NewServer(e, Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	sockA, sockB := testutil.Sock(t, "a.sock"), testutil.Sock(t, "b.sock")
	la, err := net.Listen("unix", sockA)
	if err != nil {
		t.Fatal(err)
	}
	lb, err := net.Listen("unix", sockB)
	if err != nil {
		t.Fatal(err)
	}
	ctxA, cancelA := context.WithCancel(context.Background())
	servedA, servedB := make(chan error, 1), make(chan error, 1)
	go func() { servedA <- srv.Serve(ctxA, la) }()
	go func() { servedB <- srv.Serve(context.Background(), lb) }()

	a := connect(t, sockA, "disk", false)
	b := connect(t, sockB, "disk", false)
	cancelA()
	if err := <-servedA; err != nil {
		t.Fatalf("Serve A: %v", err)
	}
	// Serve A returned after shutting down the connection it accepted.
	a.expectEOF()
	if got := srv.Connections(); got["disk"] != 1 {
		t.Fatalf("Connections %v", got)
	}
	b.request(nbdwire.CmdRead, 0, 1, 0, 1, nil)
	if errno, _, data := b.readSimple(1); errno != 0 || string(data) != "x" {
		t.Fatalf("listener B: %d %q", errno, data)
	}
	if _, err := net.Dial("unix", sockA); err == nil {
		t.Fatal("listener A still accepts")
	}

	// Closing B's listener from outside ends Serve B with nil; its
	// connection lives on until Close.
	lb.Close()
	if err := <-servedB; err != nil {
		t.Fatalf("Serve B: %v", err)
	}
	b.request(nbdwire.CmdRead, 0, 2, 0, 1, nil)
	if errno, _, _ := b.readSimple(1); errno != 0 {
		t.Fatalf("after its listener closed: errno %d", errno)
	}
	srv.Close()
	b.expectEOF()
	checkNoServerGoroutines(t)
	if e.opens.Load() != 2 || e.releases.Load() != 2 {
		t.Fatalf("opens %d releases %d", e.opens.Load(), e.releases.Load())
	}
	a.nc.Close()
	b.nc.Close()
	checkGoroutineCount(t, before)
}
