package daemon

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/target"
)

// deviceSample is what the collector reads of one device at scrape time.
type deviceSample struct {
	name      string
	suspended bool
	conns     int
	info      *target.Info // nil when the device has no live target
}

// metric is one metric family: its description and how to read it from a
// sample. emit is called once per series; labels follow "device".
type metric struct {
	desc    *prometheus.Desc
	kind    prometheus.ValueType
	collect func(s deviceSample, emit func(v float64, labels ...string))
}

// cloneMetric builds a metric read from CloneInfo (clone devices only).
func cloneMetric(name, help string, kind prometheus.ValueType, value func(*target.CloneInfo) float64) metric {
	return metric{
		desc: prometheus.NewDesc(name, help, []string{"device"}, nil),
		kind: kind,
		collect: func(s deviceSample, emit func(float64, ...string)) {
			if s.info != nil && s.info.Clone != nil {
				emit(value(s.info.Clone))
			}
		},
	}
}

// remoteMetric is a counter of a clone's remote source (absent for local
// sources).
func remoteMetric(name, help string, value func(*blockdev.RemoteStats) float64) metric {
	return metric{
		desc: prometheus.NewDesc(name, help, []string{"device"}, nil),
		kind: prometheus.CounterValue,
		collect: func(s deviceSample, emit func(float64, ...string)) {
			if s.info != nil && s.info.Clone != nil && s.info.Clone.Remote != nil {
				emit(value(s.info.Clone.Remote))
			}
		},
	}
}

// hydratedCauses are the cause label values of nbdclone_hydrated_bytes_total.
var hydratedCauses = []struct {
	cause string
	bytes func(*target.CloneStats) int64
}{
	{"background", func(s *target.CloneStats) int64 { return s.HydratedBackgroundBytes }},
	{"write", func(s *target.CloneStats) int64 { return s.HydratedWriteBytes }},
	{"overwrite", func(s *target.CloneStats) int64 { return s.HydratedOverwriteBytes }},
	{"discard", func(s *target.CloneStats) int64 { return s.HydratedDiscardBytes }},
	{"zero", func(s *target.CloneStats) int64 { return s.HydratedZeroBytes }},
	{"cache", func(s *target.CloneStats) int64 { return s.HydratedCacheBytes }},
	{"hint", func(s *target.CloneStats) int64 { return s.HydratedHintBytes }},
}

var metadataModes = []string{"rw", "ro", "Fail"}

// metricFamilies lists every metric the daemon exports; add new ones here.
func metricFamilies() []metric {
	return []metric{
		cloneMetric("nbdclone_regions", "Regions of the clone device.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return float64(c.Regions) }),
		cloneMetric("nbdclone_hydrated_regions", "Regions hydrated (copied, overwritten or discarded) on the destination.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return float64(c.HydratedRegions) }),
		cloneMetric("nbdclone_hydrating_regions", "Regions being copied now, for background hydration or user writes.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return float64(c.HydratingRegions) }),
		cloneMetric("nbdclone_region_size_bytes", "Region size of the clone device in bytes.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return float64(c.RegionSize) }),
		cloneMetric("nbdclone_metadata_commits_total", "Metadata commits since the table was loaded.",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.Commits) }),
		cloneMetric("nbdclone_copy_errors_total", "Failed region copies since the table was loaded.",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.CopyErrors) }),
		cloneMetric("nbdclone_source_hole_bytes_total", "Bytes hydrated by zeroing the destination because the source reported them as holes (nothing transferred).",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.SourceHoleBytes) }),
		cloneMetric("nbdclone_source_copy_bytes_total", "Bytes read from the source by copies.",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.SourceCopyBytes) }),
		cloneMetric("nbdclone_hydration_stopped", "1 when background hydration stopped by itself on errors (status -o json says why) until enable_hydration or retry_hydration, else 0.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return boolFloat(c.HydrationStopped != "") }),
		cloneMetric("nbdclone_hydration_rate_bytes", "The hydration_rate throttle in bytes per second; 0 is no limit.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return float64(c.HydrationRate) }),
		remoteMetric("nbdclone_source_retries_total", "Remote source requests that failed and were retried.",
			func(r *blockdev.RemoteStats) float64 { return float64(r.Retries) }),
		remoteMetric("nbdclone_source_reconnects_total", "Remote source connections re-established after a drop.",
			func(r *blockdev.RemoteStats) float64 { return float64(r.Reconnects) }),
		remoteMetric("nbdclone_source_failures_total", "Remote source calls that failed after their retries.",
			func(r *blockdev.RemoteStats) float64 { return float64(r.Failures) }),
		{
			desc: prometheus.NewDesc("nbdclone_hydrated_bytes_total",
				"Bytes made hydrated since the table was loaded, by cause: background copy, copy before a partial write, "+
					"whole-region overwrite, discard or zeroing (these three copy nothing), NBD_CMD_CACHE, or a read's hint.",
				[]string{"device", "cause"}, nil),
			kind: prometheus.CounterValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				if s.info == nil || s.info.Clone == nil {
					return
				}
				for _, c := range hydratedCauses {
					emit(float64(c.bytes(&s.info.Clone.Stats)), c.cause)
				}
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_source_cache_lookups_total",
				"Lookups of 64 KiB blocks in the read cache of the source this clone shares with others (--source-cache), by result: hit (cached or being fetched by another reader) or miss (read from the source).",
				[]string{"device", "result"}, nil),
			kind: prometheus.CounterValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				if s.info == nil || s.info.Clone == nil || s.info.Clone.SourceCache == nil {
					return
				}
				emit(float64(s.info.Clone.SourceCache.DeviceHits), "hit")
				emit(float64(s.info.Clone.SourceCache.DeviceMisses), "miss")
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_metadata_mode",
				"Metadata mode of the clone device: 1 for the current mode (rw, ro or Fail), 0 for the others.",
				[]string{"device", "mode"}, nil),
			kind: prometheus.GaugeValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				if s.info == nil || s.info.Clone == nil {
					return
				}
				for _, m := range metadataModes {
					emit(boolFloat(s.info.Clone.Mode == m), m)
				}
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_connections", "Open NBD connections to the device.",
				[]string{"device"}, nil),
			kind: prometheus.GaugeValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				emit(float64(s.conns))
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_device_suspended", "1 while the device is suspended (I/O held back), else 0.",
				[]string{"device"}, nil),
			kind: prometheus.GaugeValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				emit(boolFloat(s.suspended))
			},
		},
	}
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// collector reads every device's Info at scrape time (never committing
// metadata: invariant 6).
type collector struct {
	reg     *registry
	metrics []metric
}

func newCollector(reg *registry) *collector {
	return &collector{reg: reg, metrics: metricFamilies()}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.samples() {
		for _, m := range c.metrics {
			m.collect(s, func(v float64, labels ...string) {
				ch <- prometheus.MustNewConstMetric(m.desc, m.kind, v, append([]string{s.name}, labels...)...)
			})
		}
	}
}

func (c *collector) samples() []deviceSample {
	devs := c.reg.all()
	out := make([]deviceSample, 0, len(devs))
	for _, d := range devs {
		d.mu.Lock()
		s := deviceSample{name: d.name, suspended: d.suspended || d.swapping != nil, conns: d.conns}
		d.mu.Unlock()
		if h := d.tryAcquire(); h != nil {
			info := h.t.Info()
			h.release()
			s.info = &info
		}
		out = append(out, s)
	}
	return out
}
