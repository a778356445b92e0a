package target

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/metadata"
)

// remoteReader makes a local source look remote: a window, an identity,
// and the file's own hole map.
type remoteReader struct {
	blockdev.Reader
	window, request int64
	id              string
	mapper          blockdev.Mapper // the file's holes; nil maps nothing
}

func (r remoteReader) Window() (int64, int64)            { return r.window, r.request }
func (r remoteReader) RemoteStats() blockdev.RemoteStats { return blockdev.RemoteStats{Requests: 1} }
func (r remoteReader) SourceID() string                  { return r.id }

func (r remoteReader) Map(off, n int64) ([]blockdev.Extent, error) {
	if r.mapper == nil {
		return nil, blockdev.ErrNotSupported
	}
	return r.mapper.Map(off, n)
}

// buildWith constructs and resumes a clone over the source open returns.
func (f *fixture) buildWith(t *testing.T, extra string, env Env, open func(blockdev.Reader) blockdev.Reader) *clone {
	t.Helper()
	env.OpenSource = func(_ context.Context, spec string) (blockdev.Reader, error) {
		r, err := blockdev.OpenFileReadOnly(spec)
		if err != nil {
			return nil, err
		}
		return open(countingReader{r, &f.sourceReads}), nil
	}
	return startClone(t, f.line(8, extra), env)
}

func waitCond(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestReadsAreHints: with the sweep held back by user I/O, a read of an
// unhydrated region hydrates that region ahead of the sweep, and the next
// read of it is served without the source.
func TestReadsAreHints(t *testing.T) {
	f := newFixture(t, 64*4096, 30)
	gate := gatedReader{gateOff: 10 * 4096, reached: make(chan struct{}), release: make(chan struct{})}
	env := Env{Sweep: SweepTuning{BusyInterval: time.Hour}}
	c := f.buildWith(t, "1 no_hydration", env, func(r blockdev.Reader) blockdev.Reader { gate.Reader = r; return gate })
	// A partial write whose copy blocks keeps user I/O in flight: the
	// sweep then starts one batch and waits an hour for the next.
	writeDone := make(chan error, 1)
	go func() { writeDone <- c.WriteAt(bg, []byte{1}, 10*4096+5, false) }()
	<-gate.reached
	c.Message(bg, []string{"enable_hydration"})
	waitCond(t, "the sweep's one batch", func() bool { return c.md.Hydrated() == 1 })

	before := f.sourceReads.Load()
	if !bytes.Equal(mustRead(t, c, 40*4096+100, 3000), f.srcData[40*4096+100:40*4096+3100]) {
		t.Fatal("read of an unhydrated region differs from the source")
	}
	waitCond(t, "the hinted region", func() bool { return c.md.IsHydrated(40) })
	info := c.Info().Clone
	if info.Stats.HydratedHintBytes != 4096 || c.md.IsHydrated(41) || c.md.Hydrated() != 2 {
		t.Fatalf("hint bytes %d, hydrated %d, region 41 %v", info.Stats.HydratedHintBytes, c.md.Hydrated(), c.md.IsHydrated(41))
	}
	if got := f.sourceReads.Load() - before; got != 3000+4096 {
		t.Fatalf("source bytes read %d: want the read and one copy", got)
	}
	before = f.sourceReads.Load()
	if !bytes.Equal(mustRead(t, c, 40*4096, 4096), f.srcData[40*4096:41*4096]) {
		t.Fatal("hinted region reads wrong")
	}
	if got := f.sourceReads.Load() - before; got != 0 {
		t.Fatalf("a hydrated region's read went to the source (%d bytes)", got)
	}
	close(gate.release)
	if err := <-writeDone; err != nil {
		t.Fatal(err)
	}
}

func TestNoReadHintsAndNoHydrationQueueNothing(t *testing.T) {
	for _, tc := range []struct {
		features string
		queued   int
	}{
		{"0", 1},
		{"1 no_read_hints", 0},
		{"1 no_hydration", 0},
	} {
		f := newFixture(t, 16*4096, 31)
		tb, _ := ParseTable(f.line(8, tc.features))
		tg, err := Build(bg, tb, f.env())
		if err != nil {
			t.Fatal(err)
		}
		c := tg.(*clone)
		// Never resumed: the sweeper stays paused, so nothing is hydrated
		// and hints stay queued where we can see them.
		mustRead(t, c, 5*4096, 2*4096)
		if q := c.Info().Clone.QueuedHints; q != tc.queued {
			t.Errorf("%q: %d hints queued, want %d", tc.features, q, tc.queued)
		}
		wantFeature := strings.Contains(tc.features, "no_read_hints")
		if got := strings.Contains(c.Status(), " no_read_hints "); got != wantFeature || c.Info().Clone.ReadHints == wantFeature {
			t.Errorf("%q: status %q, read_hints %v", tc.features, c.Status(), c.Info().Clone.ReadHints)
		}
		c.Close()
	}
}

func TestHydrationRateAndRetryMessages(t *testing.T) {
	f := newFixture(t, 16*4096, 32)
	c := f.build(t, 8, "1 no_hydration")
	base := "8 1/2 8 0/16 0 1 no_hydration "
	if s := c.Status(); s != base+"4 hydration_threshold 1 hydration_batch_size 1 rw" {
		t.Fatalf("default status %q is not dm-clone's", s)
	}
	if err := c.Message(bg, []string{"hydration_rate", "1048576"}); err != nil {
		t.Fatal(err)
	}
	if s := c.Status(); s != base+"6 hydration_threshold 1 hydration_batch_size 1 hydration_rate 1048576 rw" {
		t.Fatalf("status with a rate %q", s)
	}
	if c.Info().Clone.HydrationRate != 1048576 {
		t.Fatal("info misses the rate")
	}
	if err := c.Message(bg, []string{"HYDRATION_RATE", "0"}); err != nil {
		t.Fatal(err)
	}
	if s := c.Status(); s != base+"4 hydration_threshold 1 hydration_batch_size 1 rw" {
		t.Fatalf("status after rate 0 %q", s)
	}
	for _, bad := range [][]string{{"hydration_rate"}, {"hydration_rate", "-1"}, {"hydration_rate", "1", "2"}, {"hydration_rate", "x"}, {"retry_hydration", "now"}} {
		var dm *DMError
		if err := c.Message(bg, bad); !errors.As(err, &dm) || dm.Msg != "Invalid argument" {
			t.Errorf("message %v: %v", bad, err)
		}
	}
	if err := c.Message(bg, []string{"retry_hydration"}); err != nil {
		t.Fatal(err)
	}
	if c.Info().Clone.HydrationEnabled {
		t.Fatal("retry_hydration enabled hydration")
	}
	// A rate in the table, after dm-clone's core arguments.
	c.Close()
	f2 := newFixture(t, 16*4096, 33)
	c2 := f2.build(t, 8, "0 6 hydration_threshold 2 hydration_batch_size 3 hydration_rate 999")
	if s := c2.Status(); !strings.HasSuffix(s, " 0 6 hydration_threshold 2 hydration_batch_size 3 hydration_rate 999 rw") {
		t.Fatalf("status %q", s)
	}
	if tbl := c2.Table(); !strings.HasSuffix(tbl, "hydration_rate 999") {
		t.Fatalf("table %q", tbl)
	}
}

func TestRemoteSourceWindowHolesAndCache(t *testing.T) {
	const regions = 300
	f := newFixture(t, regions*4096, 34)
	// Holes in the source: regions 100..199 and the last 20.
	fd, err := os.OpenFile(f.src, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range [][2]int64{{100 * 4096, 100 * 4096}, {280 * 4096, 20 * 4096}} {
		if err := unix.Fallocate(int(fd.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, h[0], h[1]); err != nil {
			t.Skip("no hole punching here:", err)
		}
		clear(f.srcData[h[0] : h[0]+h[1]])
	}
	fd.Close()
	// Destination garbage where the holes are: zeroing must overwrite it.
	os.WriteFile(f.dst, bytes.Repeat([]byte{0xee}, int(f.size)), 0o600)
	c := f.buildWith(t, "1 no_hydration", Env{}, func(r blockdev.Reader) blockdev.Reader {
		m := r.(countingReader).Reader.(blockdev.Mapper)
		return remoteReader{Reader: r, window: 64 << 10, request: 16 << 10, id: "etag:1", mapper: m}
	})
	info := c.Info().Clone
	if info.EffectiveThreshold != 16 || info.EffectiveBatchSize != 4 || info.HydrationThreshold != 1 || info.Remote == nil || info.SourceID != "etag:1" {
		t.Fatalf("info %+v", info)
	}
	// CACHE of a range hydrates it before returning, in batches.
	if err := c.Cache(bg, 50*4096+1, 100*4096); err != nil {
		t.Fatal(err)
	}
	for r := uint64(50); r <= 150; r++ {
		if !c.md.IsHydrated(r) {
			t.Fatalf("region %d not hydrated by CACHE", r)
		}
	}
	if c.md.Hydrated() != 101 || c.Info().Clone.Stats.HydratedCacheBytes != 101*4096 {
		t.Fatalf("after CACHE: %d hydrated, %d cache bytes", c.md.Hydrated(), c.Info().Clone.Stats.HydratedCacheBytes)
	}
	// The same for a split or redirect counts as theirs, not a client's.
	if err := c.Cache(CommandCopy(bg), 200*4096, 10*4096); err != nil {
		t.Fatal(err)
	}
	if st := c.Info().Clone.Stats; c.md.Hydrated() != 111 || st.HydratedCommandBytes != 10*4096 || st.HydratedCacheBytes != 101*4096 {
		t.Fatalf("after a command's CACHE: %d hydrated, %d command bytes, %d cache bytes",
			c.md.Hydrated(), st.HydratedCommandBytes, st.HydratedCacheBytes)
	}
	c.Message(bg, []string{"enable_hydration"})
	waitHydrated(t, c, 30*time.Second)
	if !bytes.Equal(f.destContent(t), f.srcData) {
		t.Fatal("destination differs from the source")
	}
	st := c.Info().Clone.Stats
	if st.SourceHoleBytes != 120*4096 || st.SourceCopyBytes != 180*4096 {
		t.Fatalf("hole bytes %d, copied %d: want the 120 hole regions zeroed, the 180 others copied", st.SourceHoleBytes, st.SourceCopyBytes)
	}
}

func TestSourceIdentityIsPinned(t *testing.T) {
	f := newFixture(t, 16*4096, 35)
	open := func(id string) (Target, error) {
		tb, _ := ParseTable(f.line(8, "1 no_hydration"))
		return Build(bg, tb, Env{OpenSource: func(_ context.Context, spec string) (blockdev.Reader, error) {
			r, err := blockdev.OpenFileReadOnly(spec)
			return remoteReader{Reader: r, id: id}, err
		}})
	}
	tg, err := open(`etag:"a"`)
	if err != nil {
		t.Fatal(err)
	}
	tg.Resume()
	if err := tg.WriteAt(bg, []byte{1}, 100, false); err != nil { // half hydrated
		t.Fatal(err)
	}
	tg.Suspend(bg)
	tg.Close()
	_, err = open(`etag:"b"`)
	var dm *DMError
	if !errors.As(err, &dm) || dm.Msg != "Failed to load metadata" || !errors.Is(err, metadata.ErrSourceChanged) {
		t.Fatalf("a changed source: %v", err)
	}
	tg, err = open(`etag:"a"`)
	if err != nil {
		t.Fatalf("the original source: %v", err)
	}
	tg.Close()
}
