package daemon

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestMetricConventions gathers a live clone's metrics through a pedantic
// registry (Describe and Collect must agree, label sets must be
// consistent) and checks Prometheus' naming rules: nbdclone_ prefix,
// counters end in _total, histograms are in _seconds, gauges do not end
// in _total, every family has HELP.
func TestMetricConventions(t *testing.T) {
	dir := t.TempDir()
	cloneFiles(t, dir)
	reg := prometheus.NewPedanticRegistry()
	td := startDaemon(t, filepath.Join(t.TempDir(), "state"), nil, func(c *Config) {
		c.Registerer, c.Gatherer = reg, reg
	})
	c := dial(t, td.control)
	ctx := context.Background()
	if _, err := c.Create(ctx, "c", "0 2048 clone md dest.img src.img 8", dir); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatalf("pedantic gather: %v", err)
	}
	kinds := map[string]dto.MetricType{}
	for _, f := range fams {
		name := f.GetName()
		kinds[name] = f.GetType()
		if !strings.HasPrefix(name, "nbdclone_") {
			t.Errorf("%s: not under nbdclone_", name)
		}
		if f.GetHelp() == "" {
			t.Errorf("%s has no HELP", name)
		}
		switch f.GetType() {
		case dto.MetricType_COUNTER:
			if !strings.HasSuffix(name, "_total") {
				t.Errorf("counter %s does not end in _total", name)
			}
		case dto.MetricType_GAUGE:
			if strings.HasSuffix(name, "_total") {
				t.Errorf("gauge %s ends in _total", name)
			}
		case dto.MetricType_HISTOGRAM:
			if !strings.HasSuffix(name, "_seconds") {
				t.Errorf("histogram %s is not in seconds", name)
			}
			for _, m := range f.GetMetric() {
				h := m.GetHistogram()
				if n := len(h.GetBucket()); n < 10 {
					t.Errorf("%s: %d buckets", name, n)
				}
			}
		}
	}
	for name, kind := range map[string]dto.MetricType{
		"nbdclone_io_requests_total":                dto.MetricType_COUNTER,
		"nbdclone_io_request_duration_seconds":      dto.MetricType_HISTOGRAM,
		"nbdclone_io_in_flight":                     dto.MetricType_GAUGE,
		"nbdclone_io_read_spliced_bytes_total":      dto.MetricType_COUNTER,
		"nbdclone_metadata_commits_total":           dto.MetricType_COUNTER,
		"nbdclone_metadata_commit_duration_seconds": dto.MetricType_HISTOGRAM,
		"nbdclone_source_read_duration_seconds":     dto.MetricType_HISTOGRAM,
		"nbdclone_hydration_throttled":              dto.MetricType_GAUGE,
		"nbdclone_hydration_busy_paused":            dto.MetricType_GAUGE,
		"nbdclone_copy_retries_total":               dto.MetricType_COUNTER,
		"nbdclone_events_total":                     dto.MetricType_COUNTER,
		"nbdclone_connections":                      dto.MetricType_GAUGE,
	} {
		if got, ok := kinds[name]; !ok || got != kind {
			t.Errorf("%s: %v (present %v), want %v", name, got, ok, kind)
		}
	}
}

// TestIOStatsNoAllocs: counting and timing a request allocates nothing
// and takes no lock (the counters are atomics; run with -race).
func TestIOStatsNoAllocs(t *testing.T) {
	s := newIOStats()
	if n := testing.AllocsPerRun(1000, func() {
		start := s.start()
		s.done(opWrite, 4096, start, nil)
	}); n != 0 {
		t.Errorf("counting a request allocates %v times", n)
	}
	start := s.start()
	if s.inFlight.Load() != 1 {
		t.Error("in flight not counted")
	}
	time.Sleep(time.Millisecond)
	s.done(opTrim, 1<<20, start, context.Canceled)
	o := &s.ops[opTrim]
	if o.requests.Load() != 1 || o.errors.Load() != 1 || o.bytes.Load() != 1<<20 || s.inFlight.Load() != 0 {
		t.Errorf("trim: %d requests, %d errors, %d bytes, %d in flight", o.requests.Load(), o.errors.Load(), o.bytes.Load(), s.inFlight.Load())
	}
	if h := o.latency.Snapshot(); h.Count != 1 || h.SumSeconds < 0.001 {
		t.Errorf("trim latency: %+v", h)
	}
	if w := s.ops[opWrite].requests.Load(); w != 1000+1 { // AllocsPerRun runs once more to warm up
		t.Errorf("write requests %d", w)
	}
}
