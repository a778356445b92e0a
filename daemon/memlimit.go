package daemon

import (
	"log/slog"
	"os"
	"runtime/debug"
	"strconv"
	"sync"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/regions"
	"github.com/nbdclone/nbdclone/target"
)

// The daemon's soft memory limit (debug.SetMemoryLimit). Without one the
// garbage collector lets the heap grow to twice the live heap (GOGC=100);
// the limit caps that growth by what the devices hold:
//
//	limit = memLimitBase + Σ over built clone tables (bitmap bytes + memLimitPerStore
//	                                                  + 2 × copy window of a remote source)
//
// never below memLimitFloor. memLimitBase is the daemon itself (runtime,
// control API) and room for NBD request buffers under load. A remote
// source's copy window (blockdev.DefaultWindowBytes, 64 MiB) is in buffers
// while it hydrates; without room for it the collector ran back to back
// and H2 took 1.3–1.5 s of CPU instead of 0.8. A clone holds its in-core
// bitmap (one bit per region, for as long as the table is built) and a
// metadata store that holds one commit batch at a time (about 1 MiB coded
// and its journal image) and a 1 MiB read buffer while it loads. A limit
// below what is live only burns CPU: the collector runs back to back (the
// runtime caps it at about half the CPU, then lets the heap exceed the
// limit), which cut the M1 hydration rate to a third when badger held the
// metadata. The limit is soft: it never fails an allocation. A GOMEMLIMIT
// in the environment wins: the daemon then leaves the limit alone.
const (
	memLimitBase     = 96 << 20
	memLimitPerStore = 8 << 20
	memLimitFloor    = memLimitBase
)

// cloneMemory is what one clone table's target holds that the limit
// counts.
type cloneMemory struct {
	bitmap int64 // the in-core bitmap's bytes
	window int64 // a remote source's copy window; 0 for a local one
}

// memoryLimit computes the limit for the given clone tables.
func memoryLimit(clones []cloneMemory) int64 {
	limit := int64(memLimitBase)
	for _, c := range clones {
		limit += c.bitmap + memLimitPerStore + 2*c.window
	}
	return max(limit, memLimitFloor)
}

// cloneMemoryOf is what a clone table's target will hold.
func cloneMemoryOf(t target.Table) cloneMemory {
	m := cloneMemory{bitmap: cloneBitmapBytes(t)}
	if src, ok := target.CloneSource(t); ok && blockdev.IsRemoteSpec(src) {
		m.window = blockdev.DefaultWindowBytes
	}
	return m
}

// cloneBitmapBytes is the in-core bitmap a clone table's target holds: one
// bit per region, in 64-bit words (0 for a table it cannot read).
func cloneBitmapBytes(t target.Table) int64 {
	if t.Type != "clone" || len(t.Args) < 4 {
		return 0
	}
	regionSectors, err := strconv.ParseInt(t.Args[3], 10, 64)
	if err != nil {
		return 0
	}
	g, err := regions.NewGeometry(int64(t.Length)*target.SectorSize, regionSectors*target.SectorSize)
	if err != nil {
		return 0
	}
	return int64((g.NrRegions() + 63) / 64 * 8)
}

// memLimiter keeps the runtime's memory limit in step with the devices.
type memLimiter struct {
	log *slog.Logger
	// set is debug.SetMemoryLimit (a test may watch it).
	set func(int64) int64

	mu sync.Mutex
	// Guarded by mu.
	started bool
	fromEnv bool  // GOMEMLIMIT was set: never touched
	prev    int64 // the limit before start, put back at stop
	current int64
}

func newMemLimiter(log *slog.Logger) *memLimiter {
	return &memLimiter{log: log, set: debug.SetMemoryLimit}
}

// start takes over the limit, unless GOMEMLIMIT is set.
func (m *memLimiter) start() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.started = true
	if env := os.Getenv("GOMEMLIMIT"); env != "" {
		m.fromEnv = true
		m.log.Info("memory limit from GOMEMLIMIT, not derived from the devices",
			"GOMEMLIMIT", env, "limit_bytes", m.set(-1))
		return
	}
	m.prev = m.set(-1)
}

// stop gives back the limit found at start.
func (m *memLimiter) stop() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.started || m.fromEnv {
		return
	}
	m.started = false
	m.set(m.prev)
	m.current = 0
}

// update sets the limit for the clone tables the devices hold now: live
// tables and built inactive ones.
func (m *memLimiter) update(devs []*device) {
	var clones []cloneMemory
	for _, d := range devs {
		d.mu.Lock()
		if (d.live != nil || d.swapping != nil) && d.table.Type == "clone" {
			clones = append(clones, cloneMemoryOf(d.table))
		}
		if d.inactive != nil && d.inactive.t != nil && d.inactive.table.Type == "clone" {
			clones = append(clones, cloneMemoryOf(d.inactive.table))
		}
		d.mu.Unlock()
	}
	limit := memoryLimit(clones)
	var sum, windows int64
	for _, c := range clones {
		sum += c.bitmap
		windows += c.window
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.started || m.fromEnv || limit == m.current {
		return
	}
	m.current = limit
	m.set(limit)
	m.log.Info("memory limit set", "limit_bytes", limit, "bitmap_bytes", sum, "window_bytes", windows, "clones", len(clones))
}
