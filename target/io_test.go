package target

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
)

var bg = context.Background()

func mustRead(t *testing.T, tg Target, off, n int64) []byte {
	t.Helper()
	p := make([]byte, n)
	if err := tg.ReadAt(bg, p, off); err != nil {
		t.Fatalf("read %d+%d: %v", off, n, err)
	}
	return p
}

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func TestUnhydratedReadsComeFromSource(t *testing.T) {
	f := newFixture(t, 37*4096+1536, 10)
	c := f.build(t, 8, "1 no_hydration")
	got := mustRead(t, c, 0, f.size)
	if !bytes.Equal(got, f.srcData) {
		t.Fatal("unhydrated read differs from the source")
	}
	if c.md.Hydrated() != 0 {
		t.Fatal("a read hydrated something with no_hydration")
	}
}

func TestWholeRegionOverwriteReadsNothingFromSource(t *testing.T) {
	f := newFixture(t, 16*4096, 11)
	c := f.build(t, 8, "1 no_hydration")
	before := f.sourceReads.Load()
	if err := c.WriteAt(bg, fill(4096, 0xab), 3*4096, false); err != nil {
		t.Fatal(err)
	}
	if d := f.sourceReads.Load() - before; d != 0 {
		t.Fatalf("a whole-region overwrite read %d bytes from the source", d)
	}
	if !c.md.IsHydrated(3) || c.md.Hydrated() != 1 {
		t.Fatal("region 3 not hydrated by its overwrite")
	}
	if !bytes.Equal(mustRead(t, c, 3*4096, 4096), fill(4096, 0xab)) {
		t.Fatal("overwrite does not read back")
	}
	if got := c.Info().Clone.Stats.HydratedOverwriteBytes; got != 4096 {
		t.Fatalf("overwrite bytes = %d", got)
	}
}

func TestPartialWriteCopiesFirst(t *testing.T) {
	f := newFixture(t, 16*4096, 12)
	c := f.build(t, 8, "1 no_hydration")
	// Unaligned, spanning regions 1..3, partial at both ends.
	off, n := int64(4096+100), int64(2*4096+50)
	if err := c.WriteAt(bg, fill(int(n), 0x5a), off, false); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), f.srcData...)
	copy(want[off:off+n], fill(int(n), 0x5a))
	if !bytes.Equal(mustRead(t, c, 0, f.size), want) {
		t.Fatal("partial write does not read back over the source")
	}
	for r := uint64(1); r <= 3; r++ {
		if !c.md.IsHydrated(r) {
			t.Fatalf("region %d not hydrated", r)
		}
	}
	if c.md.Hydrated() != 3 {
		t.Fatalf("hydrated = %d, want 3", c.md.Hydrated())
	}
	if err := c.Flush(bg); err != nil {
		t.Fatal(err)
	}
	dest := f.destContent(t)
	if !bytes.Equal(dest[4096:4*4096], want[4096:4*4096]) {
		t.Fatal("destination regions 1..3 are not source overlaid with the write")
	}
	f.checkSourceUnchanged(t)
}

func TestPartialTailRegion(t *testing.T) {
	f := newFixture(t, 4*4096+1024, 13)
	c := f.build(t, 8, "1 no_hydration")
	before := f.sourceReads.Load()
	// The tail region written to the end counts as whole: no copy.
	if err := c.WriteAt(bg, fill(1024, 1), 4*4096, false); err != nil {
		t.Fatal(err)
	}
	if f.sourceReads.Load() != before || !c.md.IsHydrated(4) {
		t.Fatal("whole tail overwrite copied or did not hydrate")
	}
	// Discarding the tail to the end skips it too.
	f2 := newFixture(t, 4*4096+1024, 14)
	c2 := f2.build(t, 8, "1 no_hydration")
	if err := c2.Trim(bg, 3*4096, 4096+1024); err != nil {
		t.Fatal(err)
	}
	if c2.md.Hydrated() != 2 {
		t.Fatalf("trim of the last full region and the tail hydrated %d regions, want 2", c2.md.Hydrated())
	}
	if got := c2.Info().Clone.Stats.HydratedDiscardBytes; got != 4096+1024 {
		t.Fatalf("discard bytes = %d, want %d (a full region and the 1024-byte tail)", got, 4096+1024)
	}
}

func TestDiscardSkipsWholeRegionsOnly(t *testing.T) {
	f := newFixture(t, 16*4096, 15)
	c := f.build(t, 8, "1 no_hydration")
	// Covers regions 2..5 whole, parts of 1 and 6.
	if err := c.Trim(bg, 4096+512, 5*4096); err != nil {
		t.Fatal(err)
	}
	if c.md.Hydrated() != 4 {
		t.Fatalf("hydrated = %d, want 4", c.md.Hydrated())
	}
	for r := uint64(2); r <= 5; r++ {
		if !c.md.IsHydrated(r) {
			t.Fatalf("region %d not skipped", r)
		}
	}
	if f.sourceReads.Load() != 0 {
		t.Fatal("a discard read the source")
	}
	// Passdown punched the file: skipped regions read zeroes; the partial
	// regions still read the source.
	if !bytes.Equal(mustRead(t, c, 2*4096, 4*4096), make([]byte, 4*4096)) {
		t.Fatal("discarded regions do not read as zeroes on a file destination")
	}
	if !bytes.Equal(mustRead(t, c, 4096, 4096), f.srcData[4096:2*4096]) {
		t.Fatal("partially discarded region does not read from the source")
	}
	// A discard covering no whole region does nothing.
	if err := c.Trim(bg, 7*4096+1, 4096); err != nil || c.md.Hydrated() != 4 {
		t.Fatalf("sub-region discard: err=%v hydrated=%d", err, c.md.Hydrated())
	}
	if got := c.Info().Clone.Stats.HydratedDiscardBytes; got != 4*4096 {
		t.Fatalf("discard bytes = %d", got)
	}
	// With no_discard_passdown the destination is untouched.
	f2 := newFixture(t, 16*4096, 16)
	os.WriteFile(f2.dst, fill(16*4096, 0xee), 0o600)
	c2 := f2.build(t, 8, "2 no_hydration no_discard_passdown")
	if err := c2.Trim(bg, 0, 16*4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f2.destContent(t), fill(16*4096, 0xee)) {
		t.Fatal("no_discard_passdown passed the discard down")
	}
	if !strings.Contains(c2.Status(), "no_discard_passdown") {
		t.Fatal("status lacks no_discard_passdown")
	}
}

func TestWriteZeroes(t *testing.T) {
	f := newFixture(t, 16*4096, 17)
	c := f.build(t, 8, "1 no_hydration")
	off, n := int64(2*4096+7), int64(3*4096)
	if err := c.WriteZeroes(bg, off, n, true); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), f.srcData...)
	copy(want[off:off+n], make([]byte, n))
	if !bytes.Equal(mustRead(t, c, 0, f.size), want) {
		t.Fatal("write-zeroes does not read back")
	}
	// Regions 3 and 4 are whole (zeroed, no copy); 2 and 5 were copied.
	if got := f.sourceReads.Load(); got != 2*4096+f.size-4*4096 {
		t.Fatalf("source reads = %d, want two region copies plus the 12 unhydrated regions of the full read", got)
	}
	st := c.Info().Clone.Stats
	if st.HydratedZeroBytes != 2*4096 || st.HydratedWriteBytes != 2*4096 {
		t.Fatalf("zero bytes %d, write-copy bytes %d", st.HydratedZeroBytes, st.HydratedWriteBytes)
	}
}

func TestBackgroundHydrationCompletes(t *testing.T) {
	f := newFixture(t, 300*4096+512, 18)
	c := f.build(t, 8, "0 4 hydration_threshold 64 hydration_batch_size 16")
	waitHydrated(t, c, 30*time.Second)
	if !bytes.Equal(f.destContent(t), f.srcData) {
		t.Fatal("destination differs from the source after hydration")
	}
	if got := f.sourceReads.Load(); got != f.size {
		t.Fatalf("hydration read %d bytes from the source, want exactly %d", got, f.size)
	}
	if !c.md.Released() {
		t.Fatal("in-core bitmap kept after hydration completed")
	}
	if s := c.Status(); !strings.HasPrefix(s, "8 2/2 8 301/301 0 0 4") {
		t.Fatalf("status after hydration: %q", s)
	}
	f.checkSourceUnchanged(t)
}

func waitHydrated(t *testing.T, tg Target, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		ev := tg.Events()
		if tg.Info().Clone.Hydrated {
			return
		}
		select {
		case <-ev:
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			t.Fatalf("not hydrated after %v: %s", timeout, tg.Status())
		}
	}
}

func TestThresholdZeroAndSuspendStopHydration(t *testing.T) {
	f := newFixture(t, 256*4096, 19)
	c := f.build(t, 8, "0 4 hydration_threshold 0 hydration_batch_size 4")
	time.Sleep(300 * time.Millisecond)
	if c.md.Hydrated() != 0 {
		t.Fatal("hydration ran with threshold 0")
	}
	if err := c.Suspend(bg); err != nil {
		t.Fatal(err)
	}
	c.Message(bg, []string{"hydration_threshold", "8"})
	time.Sleep(300 * time.Millisecond)
	if c.md.Hydrated() != 0 || c.Info().Clone.HydratingRegions != 0 {
		t.Fatal("hydration ran while suspended")
	}
	c.Resume()
	waitHydrated(t, c, 30*time.Second)
}

func TestHydrationErrorsAreBoundedAndNeverMarkHydrated(t *testing.T) {
	f := newFixture(t, 64*4096, 20)
	tb, _ := ParseTable(f.line(8, "0 2 hydration_threshold 4"))
	env := Env{
		OpenSource: func(context.Context, string) (blockdev.Reader, error) {
			r, err := blockdev.OpenFileReadOnly(f.src)
			return failingReader{r}, err
		},
		Sweep: SweepTuning{MaxErrors: 3, Backoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond},
	}
	tg, err := Build(bg, tb, env)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	ev := tg.Events()
	tg.Resume()
	select {
	case <-ev:
	case <-time.After(10 * time.Second):
		t.Fatal("no event after repeated copy failures")
	}
	info := tg.Info().Clone
	if info.HydrationStopped == "" || info.HydratedRegions != 0 || info.Stats.CopyErrors < 3 {
		t.Fatalf("after failures: stopped=%q hydrated=%d errors=%d", info.HydrationStopped, info.HydratedRegions, info.Stats.CopyErrors)
	}
	// A partial write needs a copy: it fails with EIO, nothing is marked.
	if err := tg.WriteAt(bg, []byte{1}, 0, false); !errors.Is(err, ErrIO) {
		t.Fatalf("partial write over a failing source: %v, want EIO", err)
	}
	if tg.Info().Clone.HydratedRegions != 0 {
		t.Fatal("a failed copy marked a region hydrated")
	}
}

type failingReader struct{ blockdev.Reader }

func (failingReader) ReadAt([]byte, int64) (int, error) { return 0, io.ErrUnexpectedEOF }

// TestFlushPersists copies the metadata and destination right after a FLUSH
// (a crash image: nothing after it is synced) and checks a clone built on
// the copy has the flushed state.
func TestFlushPersists(t *testing.T) {
	f := newFixture(t, 16*4096, 21)
	c := f.build(t, 8, "1 no_hydration")
	if err := c.WriteAt(bg, fill(4096, 0x11), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(bg, fill(10, 0x22), 5*4096+3, true); err != nil { // FUA
		t.Fatal(err)
	}
	crash := t.TempDir()
	for _, p := range []string{f.md, f.dst} {
		if out, err := exec.Command("cp", "-a", p, crash).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v %s", err, out)
		}
	}
	// The crash image of the destination goes back to its path: the
	// metadata records which device it describes.
	c.Suspend(bg)
	c.Close()
	if err := os.Rename(filepath.Join(crash, "dst.img"), f.dst); err != nil {
		t.Fatal(err)
	}
	f2 := &fixture{dir: f.dir, src: f.src, size: f.size, srcData: f.srcData,
		md: filepath.Join(crash, "md"), dst: f.dst}
	os.Remove(filepath.Join(f2.md, "LOCK"))
	c2 := f2.build(t, 8, "1 no_hydration")
	if c2.md.Hydrated() != 2 || !c2.md.IsHydrated(0) || !c2.md.IsHydrated(5) {
		t.Fatalf("after crash image: hydrated=%d", c2.md.Hydrated())
	}
	want := append([]byte(nil), f.srcData...)
	copy(want[0:4096], fill(4096, 0x11))
	copy(want[5*4096+3:], fill(10, 0x22))
	if !bytes.Equal(mustRead(t, c2, 0, f.size), want) {
		t.Fatal("flushed writes lost in the crash image")
	}
}

func TestReopenResumesHydration(t *testing.T) {
	f := newFixture(t, 64*4096, 22)
	c := f.build(t, 8, "1 no_hydration")
	c.WriteAt(bg, fill(4096, 3), 4096, false)
	c.Trim(bg, 8*4096, 8*4096)
	c.Suspend(bg)
	c.Close()
	// Reopened without hydration first: the count is read before the
	// sweep may start.
	c2 := f.build(t, 8, "1 no_hydration 2 hydration_threshold 16")
	if c2.md.Hydrated() != 9 {
		t.Fatalf("after reopen hydrated = %d, want 9", c2.md.Hydrated())
	}
	before := f.sourceReads.Load()
	if err := c2.Message(bg, []string{"enable_hydration"}); err != nil {
		t.Fatal(err)
	}
	waitHydrated(t, c2, 30*time.Second)
	if got := f.sourceReads.Load() - before; got != 55*4096 {
		t.Fatalf("reopened hydration copied %d bytes, want only the 55 missing regions", got)
	}
}

// gatedReader blocks reads at gateOff until release is closed.
type gatedReader struct {
	blockdev.Reader
	gateOff int64
	reached chan struct{}
	release chan struct{}
}

func (g gatedReader) ReadAt(p []byte, off int64) (int, error) {
	if off == g.gateOff {
		close(g.reached)
		<-g.release
	}
	return g.Reader.ReadAt(p, off)
}

// TestDiscardDuringCopyCannotLoseWrite: a background copy of region r is in
// flight; a discard marks r hydrated; a user write to r is acknowledged.
// The copy must not land over the write (invariant 3): the discard waits
// for the copy's region lock.
func TestDiscardDuringCopyCannotLoseWrite(t *testing.T) {
	f := newFixture(t, 8*4096, 23)
	gate := gatedReader{gateOff: 0, reached: make(chan struct{}), release: make(chan struct{})}
	tb, _ := ParseTable(f.line(8, "0 4 hydration_threshold 1 hydration_batch_size 1"))
	env := Env{OpenSource: func(context.Context, string) (blockdev.Reader, error) {
		r, err := blockdev.OpenFileReadOnly(f.src)
		gate.Reader = r
		return gate, err
	}}
	tg, err := Build(bg, tb, env)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(gate.release) }) }
	defer release() // before Close, which waits for the blocked copy
	tg.Resume()
	<-gate.reached // the sweep is copying region 0
	done := make(chan error, 1)
	go func() {
		if err := tg.Trim(bg, 0, 4096); err != nil {
			done <- err
			return
		}
		done <- tg.WriteAt(bg, fill(100, 0x77), 0, false)
	}()
	select {
	case err := <-done:
		t.Fatalf("discard+write finished while the copy of its region was in flight (err=%v)", err)
	case <-time.After(100 * time.Millisecond):
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, tg, 0, 100); !bytes.Equal(got, fill(100, 0x77)) {
		t.Fatal("the background copy landed over an acknowledged write")
	}
}

// TestQueueDepthOneReadsHoldHydrationBack: dm-clone starts copies whenever
// no user I/O is in flight, which a client at queue depth 1 leaves between
// every two requests. Here the device stays busy for a moment after each
// request, so constant QD1 reads hold the sweep to its one batch per
// BusyInterval; once they stop, hydration runs again.
func TestQueueDepthOneReadsHoldHydrationBack(t *testing.T) {
	f := newFixture(t, 256*4096, 24)
	// Reads are not hints here: hinted copies are not held back.
	env := f.env()
	env.Sweep.BusyInterval = time.Hour // while busy: one batch, then none
	tg := startClone(t, f.line(8, "2 no_hydration no_read_hints"), env)
	stop := make(chan struct{})
	done := make(chan int)
	go func() {
		p := make([]byte, 4096)
		n := 0
		for {
			select {
			case <-stop:
				done <- n
				return
			default:
			}
			tg.ReadAt(bg, p, int64(n%256)*4096)
			n++
		}
	}()
	time.Sleep(50 * time.Millisecond)
	tg.Message(bg, []string{"enable_hydration"})
	time.Sleep(300 * time.Millisecond)
	busyHydrated := tg.Info().Clone.HydratedRegions
	close(stop)
	reads := <-done
	if busyHydrated > 1 {
		t.Errorf("%d regions hydrated under constant QD1 reads (%d reads), want at most one batch", busyHydrated, reads)
	}
	waitHydrated(t, tg, 20*time.Second)
	t.Logf("%d reads; hydrated while they ran: %d", reads, busyHydrated)
}
