package e2e

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// statusCounts are the region fields of a clone's dm status line:
// "0 <len> clone <mdbs> <used>/<total> <region> <hydrated>/<regions>
// <hydrating> ...".
func statusCounts(t testing.TB, line string) (hydrated, regions, hydrating uint64) {
	t.Helper()
	f := strings.Fields(line)
	if len(f) < 8 || f[2] != "clone" {
		t.Fatalf("not a clone status line: %q", line)
	}
	h, r, ok := strings.Cut(f[6], "/")
	var err error
	if hydrated, err = strconv.ParseUint(h, 10, 64); err != nil || !ok {
		t.Fatalf("status %q: hydrated field %q", line, f[6])
	}
	if regions, err = strconv.ParseUint(r, 10, 64); err != nil {
		t.Fatalf("status %q: regions field %q", line, f[6])
	}
	if hydrating, err = strconv.ParseUint(f[7], 10, 64); err != nil {
		t.Fatalf("status %q: hydrating field %q", line, f[7])
	}
	return hydrated, regions, hydrating
}

// hydratedCauses are the cause labels of nbdclone_hydrated_bytes_total.
var hydratedCauses = []string{"background", "write", "overwrite", "discard", "zero", "cache", "hint"}

// TestMetricsFollowHydration scrapes /metrics during a throttled
// hydration, each time with the device suspended (so nothing moves between
// the scrape and the status line): the hydrated and total regions equal
// the status line's, and the bytes hydrated by cause add up to the
// hydrated regions exactly. User I/O of each kind shows in the per-op
// counters, bytes and latency histograms; commits are counted by trigger;
// source reads are timed; rate and ETA are exported while it runs and the
// ETA is 0 once it is done.
func TestMetricsFollowHydration(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	d, url := serveWithMetrics(t)
	const size = 64 << 20
	const region = 4096
	makeSource(t, d.Dir, 11, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	// 16384 regions in batches of 16, throttled to 16 MiB/s: about 4 s.
	cli(t, d, "create", "c", "--table",
		"0 131072 clone ./md ./dest.img ./src.img 8 1 no_hydration 4 hydration_batch_size 16 hydration_rate 16777216")

	// User I/O of every kind before background hydration starts.
	qemuIO(t, d.URI("c"),
		"write -P 0x11 10000 100", // inside region 2: copied first (cause write)
		"write -P 0x22 1M 64k",    // 16 whole regions: overwritten (overwrite)
		"write -z 2M 64k",         // 16 whole regions zeroed (zero)
		"discard 3M 1M",           // 256 whole regions skipped (discard)
		"read 5M 4k",              // an unhydrated region: served by the source
		"flush",
	)
	s := scrapeMetrics(t, url)
	dev := "device=c"
	for _, c := range []struct {
		op          string
		req, nbytes float64
	}{
		{"write", 2, 100 + 64<<10},
		{"write_zeroes", 1, 64 << 10},
		{"trim", 1, 1 << 20},
	} {
		if got := s.get(t, "nbdclone_io_requests_total", dev, "op="+c.op); got != c.req {
			t.Errorf("%s requests %v, want %v", c.op, got, c.req)
		}
		if got := s.get(t, "nbdclone_io_bytes_total", dev, "op="+c.op); got != c.nbytes {
			t.Errorf("%s bytes %v, want %v", c.op, got, c.nbytes)
		}
	}
	if got := s.get(t, "nbdclone_io_requests_total", dev, "op=flush"); got < 1 {
		t.Errorf("flush requests %v", got)
	}
	if got := s.get(t, "nbdclone_io_bytes_total", dev, "op=read"); got < 4096 {
		t.Errorf("read bytes %v", got)
	}
	for _, op := range []string{"read", "write", "trim", "write_zeroes", "flush", "cache", "block_status"} {
		n := s.get(t, "nbdclone_io_requests_total", dev, "op="+op)
		if c := s.get(t, "nbdclone_io_request_duration_seconds_count", dev, "op="+op); c != n {
			t.Errorf("%s: latency histogram counts %v requests, the counter %v", op, c, n)
		}
		if inf := s.get(t, "nbdclone_io_request_duration_seconds_bucket", dev, "op="+op, "le=+Inf"); inf != n {
			t.Errorf("%s: +Inf bucket %v, want %v", op, inf, n)
		}
	}
	if got := s.get(t, "nbdclone_io_in_flight", dev); got != 0 {
		t.Errorf("in flight with no client: %v", got)
	}
	if got := s.get(t, "nbdclone_source_read_duration_seconds_count", dev, "reason=read"); got < 1 {
		t.Errorf("source reads timed: %v", got)
	}

	// Hydrate, and look at it three times on the way, suspended.
	cli(t, d, "message", "c", "0", "enable_hydration")
	var lastHydrated float64
	midway := 0
	for i := 0; i < 3; i++ {
		time.Sleep(700 * time.Millisecond)
		cli(t, d, "suspend", "c")
		s = scrapeMetrics(t, url)
		hydrated, regions, hydrating := statusCounts(t, cli(t, d, "status", "c"))
		checkConsistent(t, s, hydrated, regions, hydrating, region)
		if h := float64(hydrated); h > 0 && h < float64(regions) {
			midway++
			if h <= lastHydrated {
				t.Errorf("no progress between scrapes: %v then %v regions", lastHydrated, h)
			}
			lastHydrated = h
			if r := s.get(t, "nbdclone_hydration_rate_bytes_per_second", dev); r <= 0 {
				t.Errorf("rate %v while hydrating", r)
			}
			if !s.has("nbdclone_hydration_eta_seconds", dev) {
				t.Error("no ETA while hydrating")
			}
		}
		if s.get(t, "nbdclone_device_suspended", dev) != 1 {
			t.Error("suspended gauge not 1 while suspended")
		}
		cli(t, d, "resume", "c")
	}
	if midway == 0 {
		t.Fatal("no scrape caught the hydration midway: the throttle did not hold it back")
	}
	cli(t, d, "wait", "c")
	hydrated, regions, hydrating := statusCounts(t, cli(t, d, "status", "c"))
	s = scrapeMetrics(t, url)
	checkConsistent(t, s, hydrated, regions, hydrating, region)
	if hydrated != regions {
		t.Fatalf("wait returned at %d/%d", hydrated, regions)
	}
	// The user I/O's causes, exactly.
	for cause, want := range map[string]float64{"write": region, "overwrite": 64 << 10, "zero": 64 << 10, "discard": 1 << 20} {
		if got := s.get(t, "nbdclone_hydrated_bytes_total", dev, "cause="+cause); got != want {
			t.Errorf("hydrated bytes by %s: %v, want %v", cause, got, want)
		}
	}
	if got := s.get(t, "nbdclone_hydrated_bytes_total", dev, "cause=background"); got <= 0 {
		t.Errorf("background bytes %v", got)
	}
	waitFor(t, 10*time.Second, "the ETA gauge at 0 once hydrated", func() bool {
		s = scrapeMetrics(t, url)
		return s.has("nbdclone_hydration_eta_seconds", dev) && s.get(t, "nbdclone_hydration_eta_seconds", dev) == 0
	})
	// Commits by trigger: flush (qemu-io's), suspend (three), periodic
	// (the hydration took seconds); the histogram counts them all.
	var commits float64
	for _, tr := range []string{"flush", "fua", "periodic", "complete", "status", "suspend", "close"} {
		commits += s.get(t, "nbdclone_metadata_commits_total", dev, "trigger="+tr)
	}
	if n := s.get(t, "nbdclone_metadata_commit_duration_seconds_count", dev); n != commits {
		t.Errorf("commit histogram counts %v, commits by trigger add up to %v", n, commits)
	}
	for tr, least := range map[string]float64{"flush": 1, "suspend": 3, "periodic": 1} {
		if got := s.get(t, "nbdclone_metadata_commits_total", dev, "trigger="+tr); got < least {
			t.Errorf("commits on %s: %v, want at least %v", tr, got, least)
		}
	}
	if got := s.get(t, "nbdclone_source_read_duration_seconds_count", dev, "reason=copy"); got <= 0 {
		t.Errorf("copy reads timed: %v", got)
	}
	if got := s.get(t, "nbdclone_hydration_rate_limit_bytes_per_second", dev); got != 16<<20 {
		t.Errorf("rate limit %v", got)
	}
	for _, ev := range []string{"created", "hydrated"} {
		if got := s.get(t, "nbdclone_events_total", "type="+ev); got != 1 {
			t.Errorf("events_total{type=%s} = %v, want 1", ev, got)
		}
	}
	if got := s.get(t, "nbdclone_events_total", "type=suspended"); got != 3 {
		t.Errorf("events_total{type=suspended} = %v, want 3", got)
	}
	// Every metric has HELP text, and the Grafana dashboard's are all here.
	for name := range s.families() {
		if base, ok := strings.CutSuffix(name, "_bucket"); ok && s.help[base] != "" {
			continue
		}
		if s.help[name] == "" && !strings.HasSuffix(name, "_sum") && !strings.HasSuffix(name, "_count") && !strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "process_") && !strings.HasPrefix(name, "promhttp_") {
			t.Errorf("%s has no HELP", name)
		}
	}
	checkDashboardMetrics(t, s)
}

// checkConsistent compares a scrape with the status line taken with the
// device suspended.
func checkConsistent(t testing.TB, s metricsScrape, hydrated, regions, hydrating uint64, region int64) {
	t.Helper()
	dev := "device=c"
	if got := s.get(t, "nbdclone_hydrated_regions", dev); got != float64(hydrated) {
		t.Errorf("nbdclone_hydrated_regions %v, status line %d", got, hydrated)
	}
	if got := s.get(t, "nbdclone_regions", dev); got != float64(regions) {
		t.Errorf("nbdclone_regions %v, status line %d", got, regions)
	}
	if got := s.get(t, "nbdclone_hydrating_regions", dev); got != float64(hydrating) {
		t.Errorf("nbdclone_hydrating_regions %v, status line %d", got, hydrating)
	}
	var sum float64
	for _, c := range hydratedCauses {
		sum += s.get(t, "nbdclone_hydrated_bytes_total", dev, "cause="+c)
	}
	if want := float64(hydrated) * float64(region); sum != want {
		t.Errorf("bytes hydrated by cause add up to %v, %d regions hydrated are %v bytes", sum, hydrated, want)
	}
	if got := s.get(t, "nbdclone_metadata_mode", dev, "mode=rw"); got != 1 {
		t.Errorf("metadata mode rw = %v", got)
	}
}
