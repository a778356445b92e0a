package target

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/internal/faultdev"
	"github.com/nbdclone/nbdclone/metadata"
)

// faultEnv wires a plan into the destination, the source and the metadata.
func faultEnv(f *fixture, plan *faultdev.Plan) Env {
	return Env{
		OpenDevice: func(path string) (blockdev.Device, error) {
			d, err := blockdev.OpenFile(path)
			if err != nil {
				return nil, err
			}
			return faultdev.Wrap(d, plan)
		},
		OpenSource: func(_ context.Context, spec string) (blockdev.Reader, error) {
			r, err := blockdev.OpenFileReadOnly(spec)
			if err != nil {
				return nil, err
			}
			return faultdev.WrapSource(r, plan), nil
		},
		MetadataKV: faultdev.WrapKV(plan),
		Sweep:      SweepTuning{BusyInterval: time.Millisecond, Backoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond},
	}
}

// TestFailNthIO fails the Nth I/O (destination, source or metadata) of a
// seeded workload, for N = 0, 1, 2, … until a run has fewer I/Os than N.
// Whatever mode the clone ends in, no read may return data it never had:
// each byte reads as its last successful write, or (if a failed operation
// touched it since) as anything that operation or the earlier state could
// have left.
var faultOps = flag.Int("fault.ops", 40, "operations in each run of TestFailNthIO's workload (make soak: more)")

func TestFailNthIO(t *testing.T) {
	seed := *modelSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d", seed)
	for n := 0; n < 100000; n++ {
		if failNthRun(t, seed, n) || t.Failed() {
			t.Logf("tried failure points 0..%d of a %d-operation workload", n, *faultOps)
			return
		}
	}
}

func failNthRun(t *testing.T, seed uint64, n int) (finished bool) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, uint64(n)))
	const rs = 4096
	size := int64(16*rs + 512)
	f := newFixture(t, size, seed)
	plan := faultdev.NewPlan(-1)
	var count atomic.Int64
	var failedOp atomic.Pointer[faultdev.Op]
	plan.SetFail(func(op faultdev.Op, off, ln int64) error {
		if count.Add(1) == int64(n)+1 {
			failedOp.Store(&op)
			return fmt.Errorf("injected %s failure at %d+%d: %w", op, off, ln, faultdev.ErrInjected)
		}
		return nil
	})
	tb, _ := ParseTable(f.line(8, "0 4 hydration_threshold 2 hydration_batch_size 2"))
	tg, err := Build(bg, tb, faultEnv(f, plan))
	if err != nil {
		return false // the failure hit the metadata format
	}
	defer tg.Close()
	tg.Resume()
	// possible[j]: the values byte j may read as; one value when known.
	possible := make([][]byte, size)
	for j := range possible {
		possible[j] = []byte{f.srcData[j]}
	}
	anything := make([]bool, size)
	// since[j]: the values byte j held since the last successful flush
	// (its value then first). A failed destination sync aborts the
	// metadata transaction and reloads the committed bitmap (dm-clone):
	// the regions it had marked read the source again, so any of those
	// values may read back. The next flush reports it (EIO).
	since := make([][]byte, size)
	for j := range since {
		since[j] = []byte{f.srcData[j]}
	}
	var merged bool
	mergeAfterSyncFailure := func() {
		if merged || failedOp.Load() == nil || *failedOp.Load() != faultdev.OpSync {
			return
		}
		merged = true
		for j := range possible {
			possible[j] = append(possible[j], since[j]...)
		}
	}
	ctx := context.Background()
	for i := 0; i < *faultOps; i++ {
		off := rng.Int64N(size - 1)
		ln := 1 + rng.Int64N(min(size-off, 2*rs))
		if rng.IntN(3) == 0 {
			off = rng.Int64N(size/rs) * rs
			ln = min(rs, size-off)
		}
		switch op := rng.IntN(8); {
		case op < 4:
			p := bytes.Repeat([]byte{byte(i + 1)}, int(ln))
			if err := tg.WriteAt(ctx, p, off, rng.IntN(4) == 0); err == nil {
				for j := off; j < off+ln; j++ {
					possible[j], anything[j] = []byte{p[0]}, false
				}
			} else {
				for j := off; j < off+ln; j++ {
					possible[j] = append(possible[j], p[0])
				}
			}
			for j := off; j < off+ln; j++ {
				since[j] = append(since[j], p[0])
			}
		case op < 5:
			first, cnt := tg.(*clone).geom.WholeRegions(off, ln)
			tg.Trim(ctx, off, ln)
			if cnt > 0 {
				s := tg.(*clone).geom.Start(first)
				for j := s; j < s+tg.(*clone).geom.RangeLen(first, cnt); j++ {
					anything[j] = true
				}
			}
		case op < 6:
			// The mode only goes rw → ro → Fail: out of rw before the
			// flush, the flush must fail (a commit may fail just after a
			// flush succeeded, so the mode after it proves nothing).
			before := tg.Status()
			if tg.Flush(ctx) == nil {
				if !strings.HasSuffix(before, " rw") {
					t.Fatalf("fail point %d: a flush succeeded in mode %q", n, before)
				}
				for j := range since {
					since[j] = append(since[j][:0], possible[j]...)
				}
			}
		default:
			p := make([]byte, ln)
			err := tg.ReadAt(ctx, p, off)
			mergeAfterSyncFailure()
			if err != nil {
				if !errors.Is(err, syscall.EIO) {
					t.Fatalf("fail point %d: read error %v is not EIO", n, err)
				}
				continue
			}
			for k, b := range p {
				j := off + int64(k)
				if !anything[j] && !bytes.Contains(possible[j], []byte{b}) {
					t.Fatalf("fail point %d (seed %d): read %d+%d: byte %d = %#x, possible %x; status %s",
						n, seed, off, ln, j, b, possible[j], tg.Status())
				}
			}
		}
	}
	return count.Load() <= int64(n)
}

// TestReadOnlyModeAfterFailedCommit: a failed destination flush during a
// commit aborts the transaction, reloads the committed bitmap and switches
// to ro (dm-clone): the status says so, reads keep working, writes to
// hydrated regions work, writes needing new metadata fail with EIO,
// discards of unhydrated regions are ignored; reloading the table returns
// to rw.
func TestReadOnlyModeAfterFailedCommit(t *testing.T) {
	f := newFixture(t, 16*4096, 40)
	plan := faultdev.NewPlan(-1)
	env := faultEnv(f, plan)
	tb, _ := ParseTable(f.line(8, "1 no_hydration"))
	tg, err := Build(bg, tb, env)
	if err != nil {
		t.Fatal(err)
	}
	tg.Resume()
	ctx := context.Background()
	if err := tg.WriteAt(ctx, fill(4096, 1), 0, true); err != nil { // committed
		t.Fatal(err)
	}
	if err := tg.WriteAt(ctx, fill(4096, 2), 4096, false); err != nil { // not yet
		t.Fatal(err)
	}
	plan.SetFail(func(op faultdev.Op, _, _ int64) error {
		if op == faultdev.OpSync {
			return faultdev.ErrInjected
		}
		return nil
	})
	if err := tg.Flush(ctx); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush with a failing destination sync: %v, want EIO", err)
	}
	plan.SetFail(nil)
	if s := tg.Status(); !strings.HasSuffix(s, " ro") {
		t.Fatalf("status after a failed commit: %q", s)
	}
	if tg.Info().Clone.HydratedRegions != 1 {
		t.Fatal("the abort did not reload the committed bitmap")
	}
	// Region 1's uncommitted hydration was dropped: it reads the source.
	if !bytes.Equal(mustRead(t, tg, 4096, 4096), f.srcData[4096:8192]) {
		t.Fatal("region 1 does not read from the source after the abort")
	}
	if !bytes.Equal(mustRead(t, tg, 0, 4096), fill(4096, 1)) {
		t.Fatal("committed write lost in ro mode")
	}
	if err := tg.WriteAt(ctx, fill(10, 3), 100, false); err != nil {
		t.Fatalf("write to a hydrated region in ro: %v", err)
	}
	// Region 1's acknowledged write is gone from reads: no flush may
	// succeed after that (dm-clone's would, with nothing left to commit).
	if err := tg.Flush(ctx); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush in ro after a failed commit: %v, want EIO", err)
	}
	if err := tg.WriteAt(ctx, fill(10, 3), 200, true); !errors.Is(err, syscall.EIO) {
		t.Fatalf("FUA write in ro after a failed commit: %v, want EIO", err)
	}
	if err := tg.WriteAt(ctx, fill(10, 3), 5*4096, false); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write to an unhydrated region in ro: %v, want EIO", err)
	}
	if err := tg.Trim(ctx, 8*4096, 4096); err != nil || tg.Info().Clone.HydratedRegions != 1 {
		t.Fatalf("discard in ro: err=%v hydrated=%d (must be ignored)", err, tg.Info().Clone.HydratedRegions)
	}
	tg.Suspend(ctx)
	tg.Close()
	// Reloading the table is the way back to rw.
	tg2, err := Build(bg, tb, faultEnv(f, faultdev.NewPlan(-1)))
	if err != nil {
		t.Fatal(err)
	}
	defer tg2.Close()
	tg2.Resume()
	if s := tg2.Status(); !strings.HasSuffix(s, " rw") {
		t.Fatalf("after reload: %q", s)
	}
	if err := tg2.WriteAt(ctx, fill(10, 4), 5*4096, true); err != nil {
		t.Fatalf("write after reload: %v", err)
	}
}

// TestFailModeWhenReloadFails: a failed commit on a store that cannot even
// be read any more goes to Fail: the status is "Fail" and every I/O fails
// with EIO.
func TestFailModeWhenReloadFails(t *testing.T) {
	f := newFixture(t, 16*4096, 41)
	plan := faultdev.NewPlan(-1)
	tb, _ := ParseTable(f.line(8, "1 no_hydration"))
	env := faultEnv(f, plan)
	var brokenScan atomic.Bool
	env.MetadataKV = scanBreakingKV(plan, &brokenScan)
	tg, err := Build(bg, tb, env)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	tg.Resume()
	ctx := context.Background()
	tg.WriteAt(ctx, fill(4096, 1), 0, false)
	plan.SetFail(func(op faultdev.Op, _, _ int64) error {
		if op == faultdev.OpPut {
			return faultdev.ErrInjected
		}
		return nil
	})
	brokenScan.Store(true)
	if err := tg.Flush(ctx); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush: %v", err)
	}
	if s := tg.Status(); s != "Fail" {
		t.Fatalf("status %q, want Fail", s)
	}
	p := make([]byte, 10)
	for name, err := range map[string]error{
		"read":  tg.ReadAt(ctx, p, 0),
		"write": tg.WriteAt(ctx, p, 0, false),
		"trim":  tg.Trim(ctx, 0, 4096),
		"flush": tg.Flush(ctx),
	} {
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("%s in Fail mode: %v, want EIO", name, err)
		}
	}
}

// TestDestinationFullReportsENOSPC: a write that cannot land on a full
// destination reports ENOSPC to the client (the NBD server maps the errno),
// and marks nothing hydrated.
func TestDestinationFullReportsENOSPC(t *testing.T) {
	f := newFixture(t, 16*4096, 42)
	plan := faultdev.NewPlan(-1)
	tb, _ := ParseTable(f.line(8, "1 no_hydration"))
	tg, err := Build(bg, tb, faultEnv(f, plan))
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	tg.Resume()
	plan.SetFail(func(op faultdev.Op, _, _ int64) error {
		if op == faultdev.OpWrite {
			return syscall.ENOSPC
		}
		return nil
	})
	ctx := context.Background()
	for _, w := range []struct{ off, n int64 }{{0, 4096}, {4096 + 10, 100}} { // an overwrite, a copy
		err := tg.WriteAt(ctx, fill(int(w.n), 9), w.off, false)
		var errno syscall.Errno
		if !errors.As(err, &errno) || errno != syscall.ENOSPC {
			t.Errorf("write %d+%d on a full destination: %v, want ENOSPC", w.off, w.n, err)
		}
	}
	if tg.Info().Clone.HydratedRegions != 0 {
		t.Fatal("a failed write marked a region hydrated")
	}
	plan.SetFail(nil)
	if err := tg.WriteAt(ctx, fill(100, 9), 4096+10, false); err != nil {
		t.Fatalf("after space came back: %v", err)
	}
}

// scanBreakingKV is faultdev's KV whose reads (the bitmap reload after a
// failed commit) fail while broken is set.
func scanBreakingKV(plan *faultdev.Plan, broken *atomic.Bool) func(metadata.KV) metadata.KV {
	wrap := faultdev.WrapKV(plan)
	return func(kv metadata.KV) metadata.KV { return scanBreaker{wrap(kv), broken} }
}

type scanBreaker struct {
	metadata.KV
	broken *atomic.Bool
}

func (s scanBreaker) Get(key []byte) ([]byte, error) {
	if s.broken.Load() {
		return nil, errors.New("injected get failure")
	}
	return s.KV.Get(key)
}

func (s scanBreaker) Scan(prefix []byte, fn func(k, v []byte) error) error {
	if s.broken.Load() {
		return errors.New("injected scan failure")
	}
	return s.KV.Scan(prefix, fn)
}

// TestTruncatedSourceIsNotZeroes: a source file truncated under a running
// clone has nothing past its new end. Hydration of those regions fails
// (and stops, bounded) instead of zeroing them as holes; reads of them
// fail; the regions before the new end hydrate with the right data.
func TestTruncatedSourceIsNotZeroes(t *testing.T) {
	const rs = 4096
	f := newFixture(t, 32*rs, 31)
	// The default source opener: a file with SEEK_DATA mapping.
	c := startClone(t, f.line(8, "1 no_hydration"), Env{Sweep: SweepTuning{Backoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond}})
	var tg Target = c
	const keep = 16 * rs
	if err := os.Truncate(f.src, keep); err != nil {
		t.Fatal(err)
	}
	if err := tg.Message(bg, []string{"enable_hydration"}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for tg.Info().Clone.HydrationStopped == "" {
		if time.Now().After(deadline) {
			t.Fatalf("hydration did not stop on the truncated source: %s", tg.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	for r := uint64(0); r < 32; r++ {
		if want := r < keep/rs; c.md.IsHydrated(r) != want {
			t.Errorf("region %d hydrated=%v, want %v", r, !want, want)
		}
	}
	if got := mustRead(t, c, 0, keep); !bytes.Equal(got, f.srcData[:keep]) {
		t.Error("regions before the new end hydrated with wrong data")
	}
	p := make([]byte, rs)
	if err := tg.ReadAt(bg, p, keep+rs); err == nil {
		t.Errorf("read past the truncated source succeeded: % x…", p[:8])
	}
	t.Logf("stopped: %s", tg.Info().Clone.HydrationStopped)
}

// TestFailedDestinationSyncIsSticky: a destination sync that fails when
// there is nothing to commit still aborts to ro: the kernel reports a lost
// writeback once and later syncs succeed, so a later flush must not.
func TestFailedDestinationSyncIsSticky(t *testing.T) {
	f := newFixture(t, 16*4096, 43)
	plan := faultdev.NewPlan(-1)
	tg := startClone(t, f.line(8, "1 no_hydration"), faultEnv(f, plan))
	ctx := context.Background()
	if err := tg.WriteAt(ctx, fill(4096, 1), 0, true); err != nil {
		t.Fatal(err)
	}
	if err := tg.WriteAt(ctx, fill(100, 2), 0, false); err != nil { // hydrated: no metadata change
		t.Fatal(err)
	}
	var failed atomic.Bool
	plan.SetFail(func(op faultdev.Op, _, _ int64) error {
		if op == faultdev.OpSync && !failed.Swap(true) {
			return faultdev.ErrInjected
		}
		return nil
	})
	if err := tg.Flush(ctx); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush with a failing sync: %v, want EIO", err)
	}
	if err := tg.Flush(ctx); !errors.Is(err, syscall.EIO) {
		t.Fatalf("second flush after a failed sync: %v, want EIO", err)
	}
	if s := tg.Status(); !strings.HasSuffix(s, " ro") {
		t.Fatalf("status after a failed sync: %q", s)
	}
}
