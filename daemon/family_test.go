package daemon

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/target"
)

// TestFamilyOrder: parents come before the devices that read them, whatever
// the names; cycles and missing parents do not lose devices.
func TestFamilyOrder(t *testing.T) {
	for _, tc := range []struct {
		name    string
		parents map[string]string // device → the device it reads
		want    string
	}{
		{"none", map[string]string{"b": "", "a": ""}, "a b"},
		{"child sorts first", map[string]string{"a": "z", "z": ""}, "z a"},
		{"chain", map[string]string{"a": "b", "b": "c", "c": "d", "d": ""}, "d c b a"},
		{"tree", map[string]string{"a": "m", "b": "m", "m": "", "c": "a"}, "m a b c"},
		{"missing parent", map[string]string{"a": "gone", "b": "a"}, "a b"},
		{"cycle", map[string]string{"a": "b", "b": "a", "c": ""}, "c a b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var names []string
			for n := range tc.parents {
				names = append(names, n)
			}
			got := familyOrder(names, func(n string) string { return tc.parents[n] })
			if strings.Join(got, " ") != tc.want {
				t.Fatalf("order %q, want %q", got, tc.want)
			}
		})
	}
	ents := []stateEntry{
		{name: "a", rec: stateRecord{Table: "0 8 clone /md /d dev:b 8"}},
		{name: "b", rec: stateRecord{Table: "0 8 linear /x 0"}},
	}
	if got := restoreOrder(ents); got[0].name != "b" || got[1].name != "a" {
		t.Fatalf("restore order %v", got)
	}
	devs := []*device{{name: "a", table: tableOf(t, "0 8 clone /md /d dev:b 8")}, {name: "b", table: tableOf(t, "0 8 linear /x 0")}}
	if got := shutdownOrder(devs); got[0].name != "a" || got[1].name != "b" {
		t.Fatalf("shutdown order %s %s, want the child first", got[0].name, got[1].name)
	}
}

func tableOf(t *testing.T, line string) target.Table {
	t.Helper()
	tbl, err := target.ParseTable(line)
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

// TestSourceCacheMetric: each clone's cache lookups are a counter by result.
func TestSourceCacheMetric(t *testing.T) {
	info := &target.Info{Type: "clone", Clone: &target.CloneInfo{SourceCache: &blockdev.SourceCacheStats{DeviceHits: 3, DeviceMisses: 5}}}
	found := false
	for _, m := range metricFamilies() {
		if !strings.Contains(m.desc.String(), `"nbdclone_source_cache_lookups_total"`) {
			continue
		}
		found = true
		var got []string
		m.collect(deviceSample{name: "c", info: info}, func(v float64, labels ...string) {
			got = append(got, strings.Join(labels, ",")+"="+formatFloat(v))
		})
		if !slices.Equal(got, []string{"hit=3", "miss=5"}) {
			t.Fatalf("emitted %q", got)
		}
		var none []string
		m.collect(deviceSample{name: "l", info: &target.Info{Type: "clone", Clone: &target.CloneInfo{}}}, func(v float64, labels ...string) {
			none = append(none, labels...)
		})
		if len(none) != 0 {
			t.Fatalf("a clone without a shared source emitted %q", none)
		}
	}
	if !found {
		t.Fatal("no nbdclone_source_cache_lookups_total metric")
	}
}

func formatFloat(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

// TestParentWrites: a write in flight when a child opens its parent
// finishes before the child gets its reader; later writes fail with EPERM,
// the parent is advertised read-only and cannot be removed; once the
// child's reader is closed the parent is writable and removable again.
func TestParentWrites(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	if err := r.create(ctx, "p", "0 64 fake", ""); err != nil {
		t.Fatal(err)
	}
	p, err := r.get("p")
	if err != nil {
		t.Fatal(err)
	}
	hold, entered := make(chan struct{}), make(chan struct{}, 1)
	f.last().setHold(hold, entered)
	wrote := make(chan error, 1)
	go func() { wrote <- p.WriteAt(ctx, []byte("x"), 0, false) }()
	<-entered
	opened := make(chan blockdev.Reader, 1)
	go func() {
		src, err := r.openSourceFor(ctx, "c", "dev:p")
		if err != nil {
			t.Error(err)
		}
		opened <- src
	}()
	select {
	case <-opened:
		t.Fatal("the child got its reader while a write to the parent was in flight")
	case <-time.After(100 * time.Millisecond):
	}
	f.last().setHold(nil, nil)
	close(hold)
	if err := <-wrote; err != nil {
		t.Fatalf("the write in flight: %v", err)
	}
	src := <-opened
	if err := p.WriteAt(ctx, []byte("y"), 0, false); !errors.Is(err, syscall.EPERM) || !strings.Contains(err.Error(), "device p is the source of c") {
		t.Fatalf("write to a parent: %v", err)
	}
	if err := p.Trim(ctx, 0, 512, false); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("trim of a parent: %v", err)
	}
	if err := p.WriteZeroes(ctx, 0, 512, false, false, false); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("write zeroes to a parent: %v", err)
	}
	if !p.Flags().ReadOnly {
		t.Fatal("a parent is not advertised read-only")
	}
	buf := make([]byte, 512)
	if n, err := src.ReadAt(buf, 0); err != nil || n != 512 || buf[0] != 'x' {
		t.Fatalf("the child reads %d, %v, %q", n, err, buf[:1])
	}
	mustErr(t, r.remove(ctx, "p", true), ErrBusy, "device p is the source of c: remove, redirect or split them first")
	src.Close()
	src.Close()
	if p.Flags().ReadOnly {
		t.Fatal("still read-only after the child left")
	}
	if err := p.WriteAt(ctx, []byte("z"), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.remove(ctx, "p", false); err != nil {
		t.Fatal(err)
	}
}

// TestChildSpliceHonoursItsContext: a child's spliced read of a suspended
// parent waits at the parent's gate, and returns once the child's request
// is cancelled (its connection closed) rather than holding its worker
// until the parent resumes.
func TestChildSpliceHonoursItsContext(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	if err := r.create(ctx, "p", "0 64 fake", ""); err != nil {
		t.Fatal(err)
	}
	src, err := r.openSourceFor(ctx, "c", "dev:p")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := r.suspend(ctx, "p", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	sp, ok := src.(blockdev.Splicer)
	if !ok {
		t.Fatal("a child's source device is not a blockdev.Splicer")
	}
	reqCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- sp.SpliceTo(reqCtx, -1, 0, 4096, false) }()
	select {
	case err := <-done:
		t.Fatalf("SpliceTo returned %v while the parent was suspended", err)
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("SpliceTo after its request was cancelled: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("SpliceTo still waits at the suspended parent after its request was cancelled")
	}
}
