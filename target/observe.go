package target

import (
	"sync/atomic"

	"github.com/nbdclone/nbdclone/internal/histogram"
)

// Commit triggers: what made a clone commit its metadata (the keys of
// CloneStats.CommitsByTrigger).
const (
	CommitFlush    = "flush"    // an NBD FLUSH
	CommitFUA      = "fua"      // a write with FUA
	CommitPeriodic = "periodic" // the one-second committer (dm-clone's waker)
	CommitComplete = "complete" // the last region hydrated: committed at once
	CommitStatus   = "status"   // the dm status line commits first, as dm-clone's does
	CommitSuspend  = "suspend"  // suspend (and so every table swap)
	CommitClose    = "close"    // the target closed (remove, shutdown)
)

// commitTrigger indexes cloneObs.commits.
type commitTrigger uint8

const (
	triggerFlush commitTrigger = iota
	triggerFUA
	triggerPeriodic
	triggerComplete
	triggerStatus
	triggerSuspend
	triggerClose
	numTriggers
)

func (t commitTrigger) String() string {
	switch t {
	case triggerFlush:
		return CommitFlush
	case triggerFUA:
		return CommitFUA
	case triggerPeriodic:
		return CommitPeriodic
	case triggerComplete:
		return CommitComplete
	case triggerStatus:
		return CommitStatus
	case triggerSuspend:
		return CommitSuspend
	default:
		return CommitClose
	}
}

// cloneObs is what a clone measures for metrics: counters and lock-free
// histograms, read by Info.
type cloneObs struct {
	commits       [numTriggers]atomic.Uint64 // successful commits by trigger
	commitLatency *histogram.Histogram       // destination sync + metadata write
	sourceRead    *histogram.Histogram       // user reads served by the source
	sourceCopy    *histogram.Histogram       // the copies' source reads
}

func newCloneObs() cloneObs {
	return cloneObs{
		commitLatency: histogram.New(nil),
		sourceRead:    histogram.New(nil),
		sourceCopy:    histogram.New(nil),
	}
}

// fill copies the measurements into s.
func (o *cloneObs) fill(s *CloneStats) {
	s.CommitsByTrigger = make(map[string]uint64, numTriggers)
	for t := range numTriggers {
		s.CommitsByTrigger[t.String()] = o.commits[t].Load()
	}
	s.CommitLatency = o.commitLatency.Snapshot()
	s.SourceReadLatency = o.sourceRead.Snapshot()
	s.SourceCopyLatency = o.sourceCopy.Snapshot()
}
