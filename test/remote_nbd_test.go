package e2e

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
)

// TestRemoteNBDSources: a clone whose source is an NBD export served by
// nbdkit or qemu-nbd (unix sockets) reads back equal to the source file
// and hydrates to an identical destination.
func TestRemoteNBDSources(t *testing.T) {
	for _, server := range []string{"nbdkit", "qemu-nbd"} {
		t.Run(server, func(t *testing.T) {
			d := harness.Serve(t)
			const size = 48<<20 + 1536 // a partial last region
			srcPath := filepath.Join(d.Dir, "src.img")
			src := makeSource(t, d.Dir, 41, size)
			var s *sourceServer
			if server == "nbdkit" {
				s = startNBDKit(t, "file", srcPath)
			} else {
				s = startQemuNBD(t, srcPath)
			}
			uri := createClone(t, d, "c", size, s.uri(), "1 no_hydration")
			compareImage(t, uri, srcPath) // every byte read from the remote source
			info := cloneInfo(t, d, "c")
			if info.HydratedRegions != 0 || info.Stats.SourceReadBytes < size || info.Remote == nil || info.Remote.Failures != 0 {
				t.Fatalf("after reading through: %d regions hydrated, %d source bytes read, remote %+v",
					info.HydratedRegions, info.Stats.SourceReadBytes, info.Remote)
			}
			cli(t, d, "message", "c", "0", "enable_hydration")
			cli(t, d, "wait", "c")
			if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "c.dst"))[:size], src); diff != "" {
				t.Fatalf("hydrated destination differs from the source: %s", diff)
			}
			compareImage(t, uri, srcPath)
			st := status(t, d, "c")
			if st.Hydrated != st.Regions || st.Features != nil && len(st.Features) != 0 {
				t.Fatalf("status after hydration: %+v", st)
			}
			info = cloneInfo(t, d, "c")
			if got := info.Stats.SourceCopyBytes + info.Stats.SourceHoleBytes; got != size {
				t.Fatalf("copied %d + zeroed %d bytes, want the %d of the device", info.Stats.SourceCopyBytes, info.Stats.SourceHoleBytes, size)
			}
			t.Logf("%s source: %+v", server, *info.Remote)
		})
	}
}

// TestRemoteNBDHighLatency: hydration of 256 MiB through nbdkit's delay
// filter (5 ms per read) completes; the throughput is reported, not
// asserted (the machine is shared; scripts/bench.sh measures it).
func TestRemoteNBDHighLatency(t *testing.T) {
	d := harness.Serve(t)
	const size = 256 << 20
	srcPath := filepath.Join(d.Dir, "src.img")
	src := makeSource(t, d.Dir, 42, size)
	s := startNBDKit(t, "--filter=delay", "file", srcPath, "rdelay=5ms")
	start := time.Now()
	createClone(t, d, "c", size, s.uri(), "")
	cli(t, d, "wait", "c")
	elapsed := time.Since(start)
	if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "c.dst")), src); diff != "" {
		t.Fatalf("hydrated destination differs from the source: %s", diff)
	}
	info := cloneInfo(t, d, "c")
	t.Logf("hydrated 256 MiB with rdelay=5ms in %v: %.0f MiB/s (effective threshold %d regions, batch %d, %d requests; -race build)",
		elapsed.Round(time.Millisecond), float64(size>>20)/elapsed.Seconds(), info.EffectiveThreshold, info.EffectiveBatchSize, info.Remote.Requests)
}

// TestRemoteNBDErrors: with nbdkit's error filter failing reads, no read
// through the clone ever returns wrong data; hydration completes once the
// errors stop; with permanent errors it stops after its bound and says so.
func TestRemoteNBDErrors(t *testing.T) {
	t.Run("transient", func(t *testing.T) {
		d := harness.Serve(t)
		const size = 16 << 20
		srcPath := filepath.Join(d.Dir, "src.img")
		makeSource(t, d.Dir, 43, size)
		errorsOn := filepath.Join(d.Dir, "errors-on")
		writeFile(t, errorsOn, nil)
		s := startNBDKit(t, "--filter=error", "file", srcPath, "error-pread-rate=0.5", "error-pread=EIO", "error-pread-file="+errorsOn)
		uri := createClone(t, d, "c", size, s.uri(), "0 2 hydration_rate 4194304")
		// Read everything, several times, while hydration runs over a
		// source failing half its reads: every read that succeeds is
		// right (nbdcopy fails as a whole on an EIO, never copies it).
		srcSum := sha256File(t, srcPath)
		ok, failed := 0, 0
		for i := range 6 {
			out := filepath.Join(d.Dir, fmt.Sprintf("read%d.img", i))
			if msg, err := runErr("nbdcopy", uri, out); err != nil {
				if !strings.Contains(msg, "Input/output error") {
					t.Fatalf("nbdcopy through the clone failed without EIO: %v\n%s", err, msg)
				}
				failed++
				continue
			}
			if sha256File(t, out) != srcSum {
				t.Fatalf("read %d through the clone returned wrong data", i)
			}
			os.Remove(out)
			ok++
		}
		t.Logf("full reads through the clone over a failing source: %d right, %d failed with EIO, none wrong", ok, failed)
		info := cloneInfo(t, d, "c")
		if info.Remote.Retries == 0 {
			t.Fatalf("the error filter injected nothing: %+v", info.Remote)
		}
		os.Remove(errorsOn) // the errors stop
		cli(t, d, "message", "c", "0", "hydration_rate", "0")
		cli(t, d, "message", "c", "0", "retry_hydration") // in case it paused meanwhile
		cli(t, d, "wait", "c")
		if sha256File(t, filepath.Join(d.Dir, "c.dst")) != srcSum {
			t.Fatal("hydrated destination differs from the source")
		}
		compareImage(t, uri, srcPath)
	})
	t.Run("permanent", func(t *testing.T) {
		d := harness.Serve(t)
		const size = 8 << 20
		srcPath := filepath.Join(d.Dir, "src.img")
		makeSource(t, d.Dir, 44, size)
		errorsOn := filepath.Join(d.Dir, "errors-on")
		writeFile(t, errorsOn, nil)
		s := startNBDKit(t, "--filter=error", "file", srcPath, "error-pread-rate=1", "error-pread=EIO", "error-pread-file="+errorsOn)
		uri := createClone(t, d, "c", size, s.uri(), "")
		// A read that cannot be served is EIO, not a hang.
		out, err := runErr("qemu-io", "-f", "raw", "-c", "read 0 4096", uri)
		if !strings.Contains(out, "Input/output error") {
			t.Fatalf("a read over a dead source: %v\n%s", err, out)
		}
		// wait fails once the sweep stopped on its bound.
		r := d.CLI("", "wait", "c")
		if r.Code != 1 || !strings.Contains(r.Stderr, "hydration stopped") || !strings.Contains(r.Stderr, "failed") {
			t.Fatalf("wait over a dead source: exit %d, stderr %q", r.Code, r.Stderr)
		}
		info := cloneInfo(t, d, "c")
		if info.HydrationStopped == "" || info.HydratedRegions != 0 || info.Stats.CopyErrors == 0 {
			t.Fatalf("after permanent errors: stopped %q, %d hydrated, %d copy errors", info.HydrationStopped, info.HydratedRegions, info.Stats.CopyErrors)
		}
		t.Logf("stopped: %s", info.HydrationStopped)
		// Stopped means stopped: once the copies in flight have failed,
		// no more are tried.
		waitFor(t, time.Minute, "copies in flight to end", func() bool { return cloneInfo(t, d, "c").HydratingRegions == 0 })
		errs := cloneInfo(t, d, "c").Stats.CopyErrors
		time.Sleep(2 * time.Second)
		if got := cloneInfo(t, d, "c").Stats.CopyErrors; got != errs {
			t.Fatalf("copies went on after the stop: %d errors, then %d", errs, got)
		}
		os.Remove(errorsOn)
		cli(t, d, "message", "c", "0", "retry_hydration")
		cli(t, d, "wait", "c")
		compareImage(t, uri, srcPath)
		if cloneInfo(t, d, "c").HydrationStopped != "" {
			t.Fatal("still reported stopped after retry_hydration completed")
		}
	})
}

// TestRemoteNBDSourceRestart kills the source server mid-hydration: the
// clone keeps serving hydrated regions, fails reads it cannot serve with
// EIO, reconnects when the server is back and finishes.
func TestRemoteNBDSourceRestart(t *testing.T) {
	d := harness.Serve(t)
	const size = 64 << 20
	srcPath := filepath.Join(d.Dir, "src.img")
	makeSource(t, d.Dir, 45, size)
	s := startNBDKit(t, "file", srcPath)
	uri := createClone(t, d, "c", size, s.uri(), "0 2 hydration_rate 8388608") // about 8 s
	// The last 4 MiB hydrated for sure (CACHE returns when they are).
	const cached = size - 4<<20
	if out, err := nbdsh(t, uri, fmt.Sprintf("h.cache(%d, %d); print('cached')", 4<<20, cached)); err != nil || !strings.Contains(out, "cached") {
		t.Fatalf("cache: %v\n%s", err, out)
	}
	waitFor(t, time.Minute, "some background hydration", func() bool { return cloneInfo(t, d, "c").HydratedRegions > 1024+64 })
	s.stop(syscall.SIGKILL)
	if cloneInfo(t, d, "c").Hydrated {
		t.Fatal("hydration finished before the source was killed: nothing was tested")
	}
	check := fmt.Sprintf(`
want = open(%q, "rb").read()[%d:]
print("hydrated-ok" if h.pread(%d, %d) == want else "hydrated-WRONG")
try:
    h.pread(4096, %d)
    print("unhydrated-read-succeeded")
except nbd.Error as e:
    print("unhydrated-errno", e.errno, e)
`, srcPath, cached, 4<<20, cached, 40<<20)
	out, err := nbdsh(t, uri, check)
	if err != nil || !strings.Contains(out, "hydrated-ok") || !strings.Contains(out, "unhydrated-errno EIO") {
		t.Fatalf("reads with the source down: %v\n%s", err, out)
	}
	s.start()
	cli(t, d, "message", "c", "0", "hydration_rate", "0")
	cli(t, d, "wait", "c")
	compareImage(t, uri, srcPath)
	if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "c.dst")), readFile(t, srcPath)); diff != "" {
		t.Fatalf("destination differs from the source: %s", diff)
	}
	if info := cloneInfo(t, d, "c"); info.Remote.Reconnects == 0 {
		t.Fatalf("no reconnect counted: %+v", *info.Remote)
	}
}

// TestRemoteNBDSparseSource: a source that is mostly holes hydrates
// mostly without transferring data: nbdkit's stats filter counts the
// bytes read.
func TestRemoteNBDSparseSource(t *testing.T) {
	d := harness.Serve(t)
	const size, chunk = 128 << 20, 1 << 20
	srcPath := filepath.Join(d.Dir, "src.img")
	harness.MakeImage(t, srcPath, size)
	f, err := os.OpenFile(srcPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(46, 1))
	var data int64
	for _, off := range []int64{0, 5, 17, 40, 41, 90, 127} { // MiB offsets
		at := off<<20 + int64(rng.IntN(4))*4096
		b := randomBytes(uint64(off)+100, min(chunk, size-at))
		if _, err := f.WriteAt(b, at); err != nil {
			t.Fatal(err)
		}
		data += int64(len(b))
	}
	f.Close()
	stats := filepath.Join(d.Dir, "stats.txt")
	s := startNBDKit(t, "--filter=stats", "file", srcPath, "statsfile="+stats)
	uri := createClone(t, d, "c", size, s.uri(), "")
	cli(t, d, "wait", "c")
	if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "c.dst")), readFile(t, srcPath)); diff != "" {
		t.Fatalf("destination differs from the source: %s", diff)
	}
	info := cloneInfo(t, d, "c")
	compareImage(t, uri, srcPath)
	cli(t, d, "remove", "c") // nbdkit waits for its clients before exiting
	s.stop(syscall.SIGTERM)  // the stats filter writes its file at exit
	ops, read := statsReadOps(t, stats)
	t.Logf("sparse source: %d MiB of data in %d MiB; %d bytes zeroed, %d copied; nbdkit served %d reads, %.0f bytes",
		data>>20, size>>20, info.Stats.SourceHoleBytes, info.Stats.SourceCopyBytes, ops, read)
	// Data chunks start mid-region at worst: a region of slack at each end.
	if info.Stats.SourceCopyBytes > data+7*2*4096 || info.Stats.SourceHoleBytes < size-data-7*2*4096 {
		t.Fatalf("copied %d and zeroed %d bytes of a source with %d bytes of data", info.Stats.SourceCopyBytes, info.Stats.SourceHoleBytes, data)
	}
	if read > float64(data+7*2*4096)*1.01 {
		t.Fatalf("nbdkit sent %.0f bytes for %d bytes of data", read, data)
	}
}
