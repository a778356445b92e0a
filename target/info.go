package target

import (
	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/internal/histogram"
)

// Info is a structured snapshot of a target, for JSON status, metrics and
// progress. Counters only grow for the life of the target.
type Info struct {
	Type string `json:"type"` // "clone" or "linear"
	Size int64  `json:"size_bytes"`

	// The rest is for clone targets only.
	Clone *CloneInfo `json:"clone,omitempty"`
}

// CloneInfo is the clone-specific part of Info.
type CloneInfo struct {
	Metadata    string `json:"metadata"`
	Destination string `json:"destination"`
	Source      string `json:"source"`

	RegionSize       int64  `json:"region_size_bytes"`
	Regions          uint64 `json:"regions"`
	HydratedRegions  uint64 `json:"hydrated_regions"`
	HydratingRegions uint64 `json:"hydrating_regions"`
	// Hydrated is true once every region is hydrated and that is committed.
	Hydrated bool `json:"hydrated"`

	HydrationEnabled   bool   `json:"hydration_enabled"`
	DiscardPassdown    bool   `json:"discard_passdown"`
	HydrationThreshold uint32 `json:"hydration_threshold"`
	HydrationBatchSize uint32 `json:"hydration_batch_size"`
	// HydrationStopped says why background hydration stopped by itself
	// (bounded copy errors); empty while it runs or is merely disabled.
	HydrationStopped string `json:"hydration_stopped,omitempty"`
	// AutoLinear is the auto_linear feature (ours): the daemon swaps the
	// device to "linear <destination> 0" as soon as Hydrated.
	AutoLinear bool `json:"auto_linear,omitempty"`

	// Ours: reads as hints, the throttle, a remote source's window.
	ReadHints     bool  `json:"read_hints"`               // no_read_hints turns it off
	HydrationRate int64 `json:"hydration_rate,omitempty"` // bytes/s; 0 is no limit
	// EffectiveThreshold and EffectiveBatchSize are in force now: a remote
	// source's window raises the ones set (never from a threshold of 0).
	EffectiveThreshold uint64 `json:"effective_hydration_threshold"`
	EffectiveBatchSize uint64 `json:"effective_hydration_batch_size"`
	QueuedHints        int    `json:"queued_hints"`
	// SourceID pins an http(s) source's version (ETag, or Last-Modified and
	// size); empty where the source cannot be pinned.
	SourceID string `json:"source_id,omitempty"`
	// Remote are a remote source's counters (absent for local sources).
	Remote *blockdev.RemoteStats `json:"remote,omitempty"`
	// SourceCache are the counters of the source reader this clone shares
	// with the other clones of the same source (absent when not shared).
	SourceCache *blockdev.SourceCacheStats `json:"source_cache,omitempty"`

	// Why background hydration waits now: the hydration_rate limit, user
	// I/O in flight (one batch per second then), a backoff after copy
	// errors. All false while it runs freely, is disabled or is done.
	Throttled  bool `json:"throttled"`
	BusyPaused bool `json:"busy_paused"`
	BackingOff bool `json:"backing_off"`
	// CopyRetries counts failed background batches retried later.
	CopyRetries uint64 `json:"copy_retries"`

	Mode          string `json:"mode"` // "rw", "ro" or "Fail"
	MetadataUsed  uint64 `json:"metadata_used_blocks"`
	MetadataTotal uint64 `json:"metadata_total_blocks"`

	Stats CloneStats `json:"stats"`
}

// CloneStats are monotonically increasing counters.
type CloneStats struct {
	// Bytes made hydrated, by cause.
	HydratedBackgroundBytes int64 `json:"hydrated_background_bytes"`
	HydratedWriteBytes      int64 `json:"hydrated_write_bytes"`     // copied before a partial write
	HydratedOverwriteBytes  int64 `json:"hydrated_overwrite_bytes"` // whole-region writes, nothing copied
	HydratedDiscardBytes    int64 `json:"hydrated_discard_bytes"`   // skipped by discard, nothing copied
	HydratedZeroBytes       int64 `json:"hydrated_zero_bytes"`      // whole regions zeroed, nothing copied
	HydratedCacheBytes      int64 `json:"hydrated_cache_bytes"`     // copied for NBD_CMD_CACHE
	HydratedHintBytes       int64 `json:"hydrated_hint_bytes"`      // copied ahead of the sweep: reads hinted them
	HydratedCommandBytes    int64 `json:"hydrated_command_bytes"`   // copied for split and redirect

	SourceReadBytes int64 `json:"source_read_bytes"` // user reads served from the source
	SourceCopyBytes int64 `json:"source_copy_bytes"` // bytes read from the source by copies
	// SourceHoleBytes were hydrated by zeroing the destination: the source
	// reported them as holes (BLOCK_STATUS, SEEK_HOLE), nothing was read.
	SourceHoleBytes int64 `json:"source_hole_bytes"`

	CopyErrors       uint64 `json:"copy_errors"`
	Commits          uint64 `json:"metadata_commits"`
	CommitErrors     uint64 `json:"metadata_commit_errors"`
	CommitNanosTotal int64  `json:"metadata_commit_nanos_total"`
	// CommitsByTrigger splits the successful commits by what asked for
	// them (CommitFlush, CommitFUA, ...); every trigger is present.
	CommitsByTrigger map[string]uint64 `json:"metadata_commits_by_trigger"`

	// Latency histograms, for metrics only: a commit (destination sync
	// and metadata write), a user read served by the source, a copy's
	// source read.
	CommitLatency     histogram.Snapshot `json:"-"`
	SourceReadLatency histogram.Snapshot `json:"-"`
	SourceCopyLatency histogram.Snapshot `json:"-"`
}
