package daemon

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/internal/histogram"
	"github.com/nbdclone/nbdclone/target"
)

// deviceSample is what the collector reads of one device at scrape time.
type deviceSample struct {
	name      string
	suspended bool
	conns     int
	info      *target.Info // nil when the device has no live target
	io        *ioStats
	progress  progressSample
	watched   bool // progress is known (a live clone the monitor follows)
}

// metric is one metric family: its description and how to read it from a
// sample. emit is called once per series; labels follow "device".
type metric struct {
	desc    *prometheus.Desc
	kind    prometheus.ValueType
	collect func(s deviceSample, emit func(v float64, labels ...string))
	// hist, instead of collect, makes a histogram family.
	hist func(s deviceSample, emit func(h histogram.Snapshot, labels ...string))
}

// ioMetric is a counter of the device's NBD requests, by op.
func ioMetric(name, help string, value func(*opStats) float64) metric {
	return metric{
		desc: prometheus.NewDesc(name, help, []string{"device", "op"}, nil),
		kind: prometheus.CounterValue,
		collect: func(s deviceSample, emit func(float64, ...string)) {
			for op := range numOps {
				emit(value(&s.io.ops[op]), op.String())
			}
		},
	}
}

// cloneHistogram is a latency histogram of CloneStats.
func cloneHistogram(name, help string, value func(*target.CloneStats) histogram.Snapshot) metric {
	return metric{
		desc: prometheus.NewDesc(name, help, []string{"device"}, nil),
		hist: func(s deviceSample, emit func(histogram.Snapshot, ...string)) {
			if s.info != nil && s.info.Clone != nil {
				emit(value(&s.info.Clone.Stats))
			}
		},
	}
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
	{"command", func(s *target.CloneStats) int64 { return s.HydratedCommandBytes }},
}

var metadataModes = []string{"rw", "ro", "Fail"}

// commitTriggers are the trigger label values of
// nbdclone_metadata_commits_total.
func commitTriggers() []string {
	return []string{target.CommitFlush, target.CommitFUA, target.CommitPeriodic, target.CommitComplete,
		target.CommitStatus, target.CommitSuspend, target.CommitClose}
}

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
		cloneMetric("nbdclone_metadata_commit_errors_total", "Failed metadata commits since the table was loaded (each puts the metadata in ro or Fail mode).",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.CommitErrors) }),
		cloneMetric("nbdclone_copy_retries_total", "Failed background copy batches whose regions are retried later (after a backoff).",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.CopyRetries) }),
		cloneMetric("nbdclone_source_read_bytes_total", "Bytes of user reads served by the source (unhydrated regions).",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.SourceReadBytes) }),
		cloneMetric("nbdclone_hydration_enabled", "1 when background hydration is enabled (enable_hydration), 0 when disabled (no_hydration, disable_hydration).",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return boolFloat(c.HydrationEnabled) }),
		cloneMetric("nbdclone_hydration_throttled", "1 while the hydration_rate limit holds the next background batch back, else 0.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return boolFloat(c.Throttled) }),
		cloneMetric("nbdclone_hydration_busy_paused", "1 while user I/O (in flight or in the last 20 ms) holds background hydration back (one batch per second at most), else 0.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return boolFloat(c.BusyPaused) }),
		cloneMetric("nbdclone_hydration_backing_off", "1 while background hydration waits to retry after copy errors, else 0.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return boolFloat(c.BackingOff) }),
		{
			desc: prometheus.NewDesc("nbdclone_metadata_commits_total",
				"Successful metadata commits since the table was loaded, by trigger: flush (NBD FLUSH), fua (a FUA write), "+
					"periodic (every second when changed), complete (the last region hydrated), status (the dm status line), suspend, close.",
				[]string{"device", "trigger"}, nil),
			kind: prometheus.CounterValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				if s.info == nil || s.info.Clone == nil {
					return
				}
				for _, t := range commitTriggers() {
					emit(float64(s.info.Clone.Stats.CommitsByTrigger[t]), t)
				}
			},
		},
		cloneHistogram("nbdclone_metadata_commit_duration_seconds", "Time a metadata commit takes: destination sync, then the metadata write.",
			func(st *target.CloneStats) histogram.Snapshot { return st.CommitLatency }),
		{
			desc: prometheus.NewDesc("nbdclone_source_read_duration_seconds",
				"Time a read of the source takes (local file or remote nbd:// / http(s):// source), by reason: read (a user read of an unhydrated region), copy (hydration).",
				[]string{"device", "reason"}, nil),
			hist: func(s deviceSample, emit func(histogram.Snapshot, ...string)) {
				if s.info == nil || s.info.Clone == nil {
					return
				}
				emit(s.info.Clone.Stats.SourceReadLatency, "read")
				emit(s.info.Clone.Stats.SourceCopyLatency, "copy")
			},
		},
		cloneMetric("nbdclone_copy_errors_total", "Failed region copies since the table was loaded.",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.CopyErrors) }),
		cloneMetric("nbdclone_source_hole_bytes_total", "Bytes hydrated by zeroing the destination because the source reported them as holes (nothing transferred).",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.SourceHoleBytes) }),
		cloneMetric("nbdclone_source_copy_bytes_total", "Bytes read from the source by copies.",
			prometheus.CounterValue, func(c *target.CloneInfo) float64 { return float64(c.Stats.SourceCopyBytes) }),
		cloneMetric("nbdclone_hydration_stopped", "1 when background hydration stopped by itself on errors (status -o json says why) until enable_hydration or retry_hydration, else 0.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return boolFloat(c.HydrationStopped != "") }),
		cloneMetric("nbdclone_hydration_rate_limit_bytes_per_second", "The hydration_rate throttle in bytes per second; 0 is no limit.",
			prometheus.GaugeValue, func(c *target.CloneInfo) float64 { return float64(c.HydrationRate) }),
		{
			desc: prometheus.NewDesc("nbdclone_size_bytes", "Size of the device in bytes.", []string{"device"}, nil),
			kind: prometheus.GaugeValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				if s.info != nil {
					emit(float64(s.info.Size))
				}
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_hydration_rate_bytes_per_second",
				"Hydration progress in bytes per second over the last 10 seconds (all causes), as the progress bar shows it. Absent until known.",
				[]string{"device"}, nil),
			kind: prometheus.GaugeValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				if s.watched && s.progress.rate >= 0 {
					emit(s.progress.rate)
				}
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_hydration_eta_seconds",
				"Estimated seconds until the clone is hydrated at that rate (0 once hydrated), as the progress bar shows it. Absent while unknown (no progress yet).",
				[]string{"device"}, nil),
			kind: prometheus.GaugeValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				if s.watched && s.progress.etaKnown {
					emit(s.progress.eta)
				}
			},
		},
		remoteMetric("nbdclone_source_retries_total", "Remote source requests that failed and were retried.",
			func(r *blockdev.RemoteStats) float64 { return float64(r.Retries) }),
		remoteMetric("nbdclone_source_reconnects_total", "Remote source connections re-established after a drop.",
			func(r *blockdev.RemoteStats) float64 { return float64(r.Reconnects) }),
		remoteMetric("nbdclone_source_failures_total", "Remote source calls that failed after their retries.",
			func(r *blockdev.RemoteStats) float64 { return float64(r.Failures) }),
		{
			desc: prometheus.NewDesc("nbdclone_hydrated_bytes_total",
				"Bytes made hydrated since the table was loaded, by cause: background copy, copy before a partial write, "+
					"whole-region overwrite, discard or zeroing (these three copy nothing), NBD_CMD_CACHE, a read's hint, "+
					"or a split or redirect command.",
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
		ioMetric("nbdclone_io_requests_total", "NBD requests completed, by op: read, write, trim, write_zeroes, flush, cache, block_status.",
			func(o *opStats) float64 { return float64(o.requests.Load()) }),
		ioMetric("nbdclone_io_errors_total", "NBD requests that failed, by op.",
			func(o *opStats) float64 { return float64(o.errors.Load()) }),
		ioMetric("nbdclone_io_bytes_total", "Bytes covered by NBD requests, by op (read and write: data moved; trim, write_zeroes, cache, block_status: the range; flush: 0).",
			func(o *opStats) float64 { return float64(o.bytes.Load()) }),
		{
			desc: prometheus.NewDesc("nbdclone_io_request_duration_seconds",
				"Time an NBD request takes in the daemon, from its decoding to its reply (waits at a suspended device included), by op.",
				[]string{"device", "op"}, nil),
			hist: func(s deviceSample, emit func(histogram.Snapshot, ...string)) {
				for op := range numOps {
					emit(s.io.ops[op].latency.Snapshot(), op.String())
				}
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_io_read_spliced_bytes_total",
				"Bytes of NBD reads moved from a file to the socket without a copy (splice), also counted in nbdclone_io_bytes_total.",
				[]string{"device"}, nil),
			kind: prometheus.CounterValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				emit(float64(s.io.spliced.Load()))
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_io_write_spliced_bytes_total",
				"Bytes of NBD writes moved from the socket to a file without a copy through the daemon (splice), also counted in nbdclone_io_bytes_total.",
				[]string{"device"}, nil),
			kind: prometheus.CounterValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				emit(float64(s.io.splicedWrites.Load()))
			},
		},
		{
			desc: prometheus.NewDesc("nbdclone_io_in_flight", "NBD requests being served now.",
				[]string{"device"}, nil),
			kind: prometheus.GaugeValue,
			collect: func(s deviceSample, emit func(float64, ...string)) {
				emit(float64(s.io.inFlight.Load()))
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
	reg                       *registry
	metrics                   []metric
	events, subscribers, lost *prometheus.Desc
	// Set by hookUp; nil in unit tests without a daemon.
	bus *eventBus
	mon *monitor
}

func newCollector(reg *registry) *collector {
	return &collector{reg: reg, metrics: metricFamilies(),
		events: prometheus.NewDesc("nbdclone_events_total",
			"Events raised by the daemon since it started, by type (see nbdclone events): created, removed, suspended, resumed, loaded, swapped, hydrated, hydration_stopped, ...",
			[]string{"type"}, nil),
		subscribers: prometheus.NewDesc("nbdclone_event_subscribers", "Open event streams (nbdclone events).", nil, nil),
		lost: prometheus.NewDesc("nbdclone_events_lost_total",
			"Events dropped for event stream subscribers that read too slowly (each told so by a \"lost\" line).", nil, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
	ch <- c.events
	ch <- c.subscribers
	ch <- c.lost
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.samples() {
		for _, m := range c.metrics {
			if m.hist != nil {
				m.hist(s, func(h histogram.Snapshot, labels ...string) {
					ch <- prometheus.MustNewConstHistogram(m.desc, h.Count, h.SumSeconds, h.Buckets(), append([]string{s.name}, labels...)...)
				})
				continue
			}
			m.collect(s, func(v float64, labels ...string) {
				ch <- prometheus.MustNewConstMetric(m.desc, m.kind, v, append([]string{s.name}, labels...)...)
			})
		}
	}
	if c.bus != nil {
		st := c.bus.snapshot()
		for _, e := range st.counts {
			ch <- prometheus.MustNewConstMetric(c.events, prometheus.CounterValue, float64(e.count), e.kind)
		}
		ch <- prometheus.MustNewConstMetric(c.subscribers, prometheus.GaugeValue, float64(st.subscribers))
		ch <- prometheus.MustNewConstMetric(c.lost, prometheus.CounterValue, float64(st.lost))
	}
}

func (c *collector) samples() []deviceSample {
	devs := c.reg.all()
	out := make([]deviceSample, 0, len(devs))
	for _, d := range devs {
		d.mu.Lock()
		s := deviceSample{name: d.name, suspended: d.suspended || d.swapping != nil, conns: d.conns, io: d.io}
		d.mu.Unlock()
		if h := d.tryAcquire(); h != nil {
			info := h.t.Info()
			h.release()
			s.info = &info
			if c.mon != nil {
				c.mon.sample(d, h, info)
			}
		}
		if c.mon != nil {
			s.progress, s.watched = c.mon.progress(d)
		}
		out = append(out, s)
	}
	return out
}
