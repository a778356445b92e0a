package blockdev

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

func randomData(seed uint64, n int) []byte {
	b := make([]byte, n)
	var s [32]byte
	s[0] = byte(seed)
	rand.NewChaCha8(s).Read(b)
	return b
}

// fastRetry keeps tests of failures short.
var fastRetry = RetryPolicy{MaxAttempts: 5, Backoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond, Timeout: 20 * time.Second}

func openFake(t *testing.T, s *fakeNBD, opts NBDOptions) *NBD {
	t.Helper()
	if opts.Retry == (RetryPolicy{}) {
		opts.Retry = fastRetry
	}
	d, err := OpenNBD(context.Background(), s.uri(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestParseNBDURI(t *testing.T) {
	tests := []struct {
		uri                      string
		network, address, export string
		tls                      bool
		bad                      bool
	}{
		{uri: "nbd://127.0.0.1/disk", network: "tcp", address: "127.0.0.1:10809", export: "disk"},
		{uri: "nbd://127.0.0.1:10900/", network: "tcp", address: "127.0.0.1:10900", export: ""},
		{uri: "nbd://[::1]:10900/a%20b", network: "tcp", address: "[::1]:10900", export: "a b"},
		{uri: "nbd://localhost", network: "tcp", address: "localhost:10809", export: ""},
		{uri: "nbds://host/x", network: "tcp", address: "host:10809", export: "x", tls: true},
		{uri: "nbd+unix:///exp?socket=/run/s.sock", network: "unix", address: "/run/s.sock", export: "exp"},
		{uri: "nbd+unix://?socket=/s", network: "unix", address: "/s", export: ""},
		{uri: "nbds+unix:///e?socket=/s&tls-verify-peer=false", network: "unix", address: "/s", export: "e", tls: true},
		{uri: "nbd+unix:///exp", bad: true},
		{uri: "nbd+unix:///exp?socket=rel.sock", bad: true},
		{uri: "nbd+unix://host/exp?socket=/s", bad: true},
		{uri: "nbd:///exp", bad: true},
		{uri: "nbd+vsock:///1", bad: true},
		{uri: "nbds://h/x?tls-verify-peer=maybe", bad: true},
	}
	for _, tc := range tests {
		a, err := parseNBDURI(tc.uri)
		if tc.bad {
			if err == nil || !errors.Is(err, ErrBadURI) {
				t.Errorf("%s: parsed (%+v, %v), want ErrBadURI", tc.uri, a, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.uri, err)
			continue
		}
		if a.network != tc.network || a.address != tc.address || a.export != tc.export || a.tls != tc.tls {
			t.Errorf("%s: got %+v", tc.uri, a)
		}
	}
	if !isNBDURI("NBD+UNIX:///x?socket=/s") || isNBDURI("/path/nbd://x") || isNBDURI("http://x") {
		t.Error("isNBDURI")
	}
}

// checkReads reads random ranges (unaligned, spanning request limits, past
// the end) and compares them with data.
func checkReads(t *testing.T, d *NBD, data []byte, seed uint64, count int) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 1))
	size := int64(len(data))
	for i := range count {
		off := r.Int64N(size)
		n := 1 + r.Int64N(min(size-off+100, 300<<10))
		if i%7 == 0 {
			off, n = off/4096*4096, 4096
		}
		p := make([]byte, n)
		got, err := d.ReadAt(p, off)
		want := min(n, size-off)
		if int64(got) != want {
			t.Fatalf("ReadAt %d+%d: %d bytes, %v", off, n, got, err)
		}
		if want < n && !errors.Is(err, io.EOF) || want == n && err != nil {
			t.Fatalf("ReadAt %d+%d: err %v", off, n, err)
		}
		if !bytes.Equal(p[:got], data[off:off+want]) {
			t.Fatalf("ReadAt %d+%d: wrong data", off, n)
		}
	}
}

func TestNBDReadsMatch(t *testing.T) {
	data := randomData(1, 2<<20+1536)
	copy(data[64<<10:], make([]byte, 128<<10)) // zero runs come as OFFSET_HOLE chunks
	for _, tc := range []struct {
		name       string
		structured bool
		min, max   uint32
	}{
		{"structured", true, 0, 0},
		{"simple replies", false, 0, 0},
		{"block size constraints", true, 512, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newFakeNBD(t, data)
			s.set(func(s *fakeNBD) { s.structured, s.minBlock, s.maxBlock = tc.structured, tc.min, tc.max })
			d := openFake(t, s, NBDOptions{})
			if d.Size() != int64(len(data)) {
				t.Fatalf("size %d", d.Size())
			}
			checkReads(t, d, data, 7, 300)
			// Concurrency: many readers at once share the connection.
			var wg sync.WaitGroup
			for g := range 8 {
				wg.Go(func() { checkReads(t, d, data, uint64(100+g), 40) })
			}
			wg.Wait()
			if tc.max != 0 && s.maxRequest.Load() > int64(tc.max) {
				t.Fatalf("sent a %d-byte request; the server's maximum is %d", s.maxRequest.Load(), tc.max)
			}
			if tc.min != 0 {
				if d.LogicalBlockSize() != 512 {
					t.Fatalf("logical block size %d", d.LogicalBlockSize())
				}
			}
			if st := d.RemoteStats(); st.Failures != 0 || st.Retries != 0 {
				t.Fatalf("stats %+v: the fake rejects misaligned requests, so none may have been sent", st)
			}
		})
	}
}

func TestNBDMapHolesAndData(t *testing.T) {
	data := randomData(2, 1<<20)
	s := newFakeNBD(t, data)
	s.set(func(s *fakeNBD) {
		for _, blk := range []int{3, 4, 5, 100, 255} {
			s.zero[blk] = true
			clear(s.data[blk*4096 : (blk+1)*4096])
		}
	})
	d := openFake(t, s, NBDOptions{})
	exts, err := d.Map(2*4096+100, 5*4096)
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{{Length: 4096 - 100}, {Length: 3 * 4096, Hole: true, Zero: true}, {Length: 4096 + 100}}
	if len(exts) != len(want) {
		t.Fatalf("extents %+v, want %+v", exts, want)
	}
	for i := range want {
		if exts[i] != want[i] {
			t.Fatalf("extents %+v, want %+v", exts, want)
		}
	}
	// The last block is a hole: a range past it is clipped to the device.
	if exts, err := d.Map(255*4096, 1<<20); err != nil || len(exts) != 1 || exts[0] != (Extent{Length: 4096, Hole: true, Zero: true}) {
		t.Fatalf("tail: %+v %v", exts, err)
	}
	// The map is asked for by window: many Maps, one request.
	var statusReqs atomic.Int64
	s.set(func(s *fakeNBD) {
		s.fault = func(r fakeReq) fakeFault {
			if r.cmd == nbdwire.CmdBlockStatus {
				statusReqs.Add(1)
			}
			return fakeFault{}
		}
	})
	d3 := openFake(t, s, NBDOptions{})
	for off := int64(0); off < 1<<20; off += 64 << 10 {
		if exts, err := d3.Map(off, 64<<10); err != nil || len(exts) == 0 {
			t.Fatalf("Map %d: %v %v", off, exts, err)
		}
	}
	if n := statusReqs.Load(); n != 1 {
		t.Fatalf("%d BLOCK_STATUS requests for 16 maps of one window", n)
	}
	// Without base:allocation, Map says so and callers read everything.
	s2 := newFakeNBD(t, data)
	s2.set(func(s *fakeNBD) { s.meta = false })
	d2 := openFake(t, s2, NBDOptions{})
	if _, err := d2.Map(0, 4096); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("Map without meta context: %v", err)
	}
}

func TestNBDTransientErrorsAreRetried(t *testing.T) {
	data := randomData(3, 1<<20)
	s := newFakeNBD(t, data)
	// Every request fails twice with EIO, then succeeds.
	seen := map[[2]uint64]int{}
	s.set(func(s *fakeNBD) {
		s.fault = func(r fakeReq) fakeFault {
			k := [2]uint64{r.off, r.len}
			seen[k]++
			if seen[k] <= 2 {
				return fakeFault{errno: uint32(syscall.EIO)}
			}
			return fakeFault{}
		}
	})
	d := openFake(t, s, NBDOptions{})
	checkReads(t, d, data, 9, 50)
	if st := d.RemoteStats(); st.Retries < 80 || st.Failures != 0 {
		t.Fatalf("stats %+v: want two retries per read and no failure", st)
	}
}

func TestNBDPermanentErrorsFailAtOnce(t *testing.T) {
	s := newFakeNBD(t, randomData(4, 1<<20))
	s.set(func(s *fakeNBD) {
		s.fault = func(fakeReq) fakeFault { return fakeFault{errno: uint32(syscall.EPERM)} }
	})
	d := openFake(t, s, NBDOptions{})
	before := s.requests.Load()
	_, err := d.ReadAt(make([]byte, 4096), 0)
	if !errors.Is(err, syscall.EPERM) {
		t.Fatalf("err %v, want EPERM", err)
	}
	if n := s.requests.Load() - before; n != 1 {
		t.Fatalf("%d attempts for a permanent error", n)
	}
}

func TestNBDErrorsExhaustRetries(t *testing.T) {
	s := newFakeNBD(t, randomData(5, 1<<20))
	s.set(func(s *fakeNBD) {
		s.fault = func(fakeReq) fakeFault { return fakeFault{errno: uint32(syscall.EIO)} }
	})
	d := openFake(t, s, NBDOptions{})
	before := s.requests.Load()
	p := bytes.Repeat([]byte{0xee}, 4096)
	n, err := d.ReadAt(p, 0)
	if n != 0 || !errors.Is(err, syscall.EIO) {
		t.Fatalf("ReadAt = %d, %v; want 0 and EIO", n, err)
	}
	if got := s.requests.Load() - before; got != int64(fastRetry.MaxAttempts) {
		t.Fatalf("%d attempts, want %d", got, fastRetry.MaxAttempts)
	}
	if st := d.RemoteStats(); st.Failures != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestNBDNeverReturnsWrongData(t *testing.T) {
	data := randomData(6, 1<<20)
	s := newFakeNBD(t, data)
	// Half the replies miss their last byte; the client must notice every
	// one and retry, and fail when nothing else comes.
	s.set(func(s *fakeNBD) {
		s.fault = func(r fakeReq) fakeFault { return fakeFault{badData: r.n%2 == 0} }
	})
	d := openFake(t, s, NBDOptions{})
	checkReads(t, d, data, 11, 200)
	if d.RemoteStats().Retries == 0 {
		t.Fatal("no bad reply was detected")
	}
	s.set(func(s *fakeNBD) { s.fault = func(fakeReq) fakeFault { return fakeFault{badData: true} } })
	if _, err := d.ReadAt(make([]byte, 64<<10), 4096); !errors.Is(err, ErrProtocol) {
		t.Fatalf("always-bad replies: %v, want ErrProtocol", err)
	}
}

func TestNBDSilentServerTimesOut(t *testing.T) {
	data := randomData(7, 1<<20)
	s := newFakeNBD(t, data)
	s.set(func(s *fakeNBD) { s.fault = func(fakeReq) fakeFault { return fakeFault{silent: true} } })
	d := openFake(t, s, NBDOptions{
		RequestTimeout: 50 * time.Millisecond,
		Retry:          RetryPolicy{MaxAttempts: 3, Backoff: time.Millisecond, MaxBackoff: time.Millisecond, Timeout: time.Minute},
	})
	_, err := d.ReadAt(make([]byte, 4096), 0)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err %v, want ErrTimeout", err)
	}
	// The whole-call timeout bounds retries too.
	d2 := openFake(t, s, NBDOptions{
		RequestTimeout: time.Hour,
		Retry:          RetryPolicy{MaxAttempts: 100, Timeout: 100 * time.Millisecond},
	})
	if _, err := d2.ReadAt(make([]byte, 4096), 0); !errors.Is(err, ErrTimeout) {
		t.Fatalf("err %v, want ErrTimeout", err)
	}
	// The server recovers: the client reconnects and reads.
	s.set(func(s *fakeNBD) { s.fault = nil })
	checkReads(t, d, data, 1, 20)
	if d.RemoteStats().Reconnects == 0 {
		t.Fatal("no reconnect after a timed-out connection")
	}
}

func TestNBDReconnectsAfterDrops(t *testing.T) {
	data := randomData(8, 2<<20)
	s := newFakeNBD(t, data)
	s.set(func(s *fakeNBD) {
		s.multiConn = true
		s.fault = func(r fakeReq) fakeFault { return fakeFault{drop: r.n%17 == 0} }
	})
	d := openFake(t, s, NBDOptions{Connections: 3})
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Go(func() { checkReads(t, d, data, uint64(200+g), 60) })
	}
	wg.Wait()
	st := d.RemoteStats()
	if st.Reconnects == 0 || st.Failures != 0 {
		t.Fatalf("stats %+v: want reconnects and no failure", st)
	}
	// A server restart drops everything; reads carry on.
	s.dropAll()
	checkReads(t, d, data, 3, 20)
}

func TestNBDMultiConn(t *testing.T) {
	data := randomData(9, 1<<20)
	for _, multi := range []bool{false, true} {
		s := newFakeNBD(t, data)
		s.set(func(s *fakeNBD) { s.multiConn = multi })
		d := openFake(t, s, NBDOptions{Connections: 4})
		want := 1
		if multi {
			want = 4
		}
		deadline := time.Now().Add(10 * time.Second)
		for d.RemoteStats().Connections != want && time.Now().Before(deadline) {
			checkReads(t, d, data, 1, 5)
			time.Sleep(5 * time.Millisecond)
		}
		checkReads(t, d, data, 2, 20)
		if got := d.RemoteStats().Connections; got != want || s.accepted.Load() != int64(want) {
			t.Fatalf("multi-conn %v: %d connections (%d accepted), want %d", multi, got, s.accepted.Load(), want)
		}
	}
}

func TestNBDSizeChangeIsRefused(t *testing.T) {
	data := randomData(10, 1<<20)
	s := newFakeNBD(t, data)
	d := openFake(t, s, NBDOptions{})
	checkReads(t, d, data, 1, 5)
	s.set(func(s *fakeNBD) { s.data = append(s.data, make([]byte, 4096)...) })
	s.dropAll()
	if _, err := d.ReadAt(make([]byte, 4096), 0); !errors.Is(err, ErrSourceChanged) {
		t.Fatalf("after a size change: %v", err)
	}
}

func TestNBDServerDown(t *testing.T) {
	s := newFakeNBD(t, randomData(11, 1<<20))
	d := openFake(t, s, NBDOptions{})
	s.stop()
	p := bytes.Repeat([]byte{1}, 4096)
	if n, err := d.ReadAt(p, 0); err == nil || n != 0 {
		t.Fatalf("read from a stopped server: %d, %v", n, err)
	}
	if _, err := OpenNBD(context.Background(), s.uri(), NBDOptions{Retry: fastRetry}); err == nil {
		t.Fatal("opened a stopped server")
	}
	if _, err := OpenNBD(context.Background(), "nbd+unix:///x?socket=/nonexistent/s", NBDOptions{Retry: fastRetry}); err == nil {
		t.Fatal("opened a missing socket")
	}
}

func TestNBDCloseWithReadsInFlight(t *testing.T) {
	s := newFakeNBD(t, randomData(12, 1<<20))
	s.set(func(s *fakeNBD) { s.fault = func(fakeReq) fakeFault { return fakeFault{silent: true} } })
	d := openFake(t, s, NBDOptions{})
	errs := make(chan error, 4)
	for range 4 {
		go func() { _, err := d.ReadAt(make([]byte, 4096), 0); errs <- err }()
	}
	for s.requests.Load() < 4 {
		time.Sleep(time.Millisecond)
	}
	d.Close()
	for range 4 {
		if err := <-errs; err == nil {
			t.Fatal("a read in flight at Close succeeded")
		}
	}
	if _, err := d.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("read after Close")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestNBDContextCancel(t *testing.T) {
	data := randomData(13, 1<<20)
	s := newFakeNBD(t, data)
	s.set(func(s *fakeNBD) { s.fault = func(fakeReq) fakeFault { return fakeFault{silent: true} } })
	d := openFake(t, s, NBDOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	p := make([]byte, 4096)
	go func() { _, err := d.ReadAtContext(ctx, p, 0); done <- err }()
	for s.requests.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled read: %v", err)
	}
	s.set(func(s *fakeNBD) { s.fault = nil })
	checkReads(t, d, data, 4, 10)
}

// startNBDKit serves args with nbdkit on a unix socket and returns its URI.
func startNBDKit(t *testing.T, args ...string) string {
	t.Helper()
	nbdkit := testutil.NeedTool(t, "nbdkit")
	dir := testutil.ShortDir(t)
	sock, pid := filepath.Join(dir, "k.sock"), filepath.Join(dir, "k.pid")
	out, err := exec.Command(nbdkit, append([]string{"-U", sock, "-P", pid}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("nbdkit: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if b, err := os.ReadFile(pid); err == nil {
			if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && p > 0 {
				syscall.Kill(p, syscall.SIGTERM)
			}
		}
	})
	return "nbd+unix:///?socket=" + sock
}

func TestNBDAgainstNBDKit(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	data := randomData(14, 4<<20)
	clear(data[1<<20 : 3<<20]) // a hole in the middle
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(data[:1<<20], 0)
	f.WriteAt(data[3<<20:], 3<<20)
	f.Close()
	uri := startNBDKit(t, "file", src)
	d, err := OpenNBD(context.Background(), uri, NBDOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	checkReads(t, d, data, 5, 200)
	exts, err := d.Map(0, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	var zero int64
	var total int64
	for _, e := range exts {
		if e.Zero {
			zero += e.Length
		}
		total += e.Length
	}
	if zero < 1<<20 || total > int64(len(data)) {
		t.Fatalf("nbdkit file's extents %+v: %d zero bytes of %d, want the 2 MiB hole", exts, zero, total)
	}
}
