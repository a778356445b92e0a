package e2e

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

var loadSeconds = flag.Int("load.seconds", 10, "fio runtime of TestLoadAndLeaks (the issue's soak runs 60)")

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// scrape returns the samples of the named metrics (without labels).
func scrape(t testing.TB, addr string, names ...string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scraping metrics: %v", err)
	}
	defer resp.Body.Close()
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	got := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && want[f[0]] {
			got[f[0]], _ = strconv.ParseFloat(f[1], 64)
		}
	}
	for _, n := range names {
		if _, ok := got[n]; !ok {
			t.Fatalf("metric %s missing", n)
		}
	}
	return got
}

// forceGC asks the daemon's runtime for a GC (pprof's heap profile with
// gc=1), so heap figures compare live data, not garbage.
func forceGC(t testing.TB, addr string) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/debug/pprof/heap?gc=1")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
}

// TestLoadAndLeaks: 32 connections at iodepth 32 of verified random writes
// while background hydration runs; fio finds no error; after the clients
// disconnect the daemon's goroutines and live heap return to their
// baseline. The peak RSS is reported.
func TestLoadAndLeaks(t *testing.T) {
	fio := testutil.NeedTool(t, "fio")
	metrics := freePort(t)
	d := harness.Serve(t, "--metrics", "tcp:"+metrics, "--pprof")
	const size = 256 << 20
	makeSource(t, d.Dir, 11, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "load", "--table",
		"0 524288 clone ./md ./dest.img ./src.img 8 0 4 hydration_threshold 64 hydration_batch_size 16")
	names := []string{"go_goroutines", "go_memstats_heap_inuse_bytes", "process_resident_memory_bytes"}
	forceGC(t, metrics)
	base := scrape(t, metrics, names...)

	out := filepath.Join(t.TempDir(), "fio.json")
	cmd := exec.Command(fio, "--name=load", "--verify_state_save=0", "--ioengine=nbd", "--uri="+d.URI("load"),
		"--numjobs=32", "--thread", "--iodepth=32", "--rw=randwrite", "--bs=4k",
		"--size=8m", "--offset_increment=8m", "--verify=crc32c", "--do_verify=1",
		"--time_based", fmt.Sprintf("--runtime=%d", *loadSeconds),
		"--group_reporting", "--output-format=json", "--output="+out)
	startProc(t, cmd)
	peakRSS := base["process_resident_memory_bytes"]
	peakGoroutines := base["go_goroutines"]
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var fioErr error
poll:
	for {
		select {
		case fioErr = <-done:
			break poll
		case <-time.After(500 * time.Millisecond):
			m := scrape(t, metrics, names...)
			peakRSS = max(peakRSS, m["process_resident_memory_bytes"])
			peakGoroutines = max(peakGoroutines, m["go_goroutines"])
		}
	}
	if fioErr != nil {
		t.Fatalf("fio: %v", fioErr)
	}
	res := readFioJSON(t, out)
	for _, j := range res.Jobs {
		if j.Error != 0 {
			t.Fatalf("fio job %s: error %d", j.Name, j.Error)
		}
	}
	info := cloneInfo(t, d, "load")
	if info.Stats.HydratedBackgroundBytes == 0 {
		t.Error("background hydration made no progress under load")
	}

	// The clients are gone: goroutines and live heap come back.
	var after map[string]float64
	waitFor(t, 30*time.Second, "goroutines and heap back to baseline", func() bool {
		forceGC(t, metrics)
		after = scrape(t, metrics, names...)
		return after["go_goroutines"] <= base["go_goroutines"]+2 &&
			after["go_memstats_heap_inuse_bytes"] <= base["go_memstats_heap_inuse_bytes"]+32<<20
	})
	t.Logf("32 conns × QD32, %d s: %d MiB written; background hydration %d MiB; goroutines %.0f → peak %.0f → %.0f; "+
		"heap in use %.1f → %.1f MiB; RSS %.1f MiB at baseline, peak %.1f MiB",
		*loadSeconds, res.Jobs[0].Write.IOBytes>>20, info.Stats.HydratedBackgroundBytes>>20,
		base["go_goroutines"], peakGoroutines, after["go_goroutines"],
		base["go_memstats_heap_inuse_bytes"]/(1<<20), after["go_memstats_heap_inuse_bytes"]/(1<<20),
		base["process_resident_memory_bytes"]/(1<<20), peakRSS/(1<<20))
	// Bounded: per connection at most MaxInFlightBytes of payload; 32 of
	// them at 4 KiB requests stay far below this.
	if peakRSS > 1<<30 {
		t.Errorf("peak RSS %.0f MiB under load", peakRSS/(1<<20))
	}
}
