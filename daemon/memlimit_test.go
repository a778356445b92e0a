package daemon

import (
	"runtime/debug"
	"testing"

	"github.com/nbdclone/nbdclone/target"
)

const mib = 1 << 20

func TestMemoryLimitFormula(t *testing.T) {
	tib := int64(32 * mib) // the bitmap of 1 TiB with 4 KiB regions
	for _, tc := range []struct {
		name   string
		clones []cloneMemory
		want   int64
	}{
		{"no clone: the floor", nil, memLimitFloor},
		{"a tiny clone", []cloneMemory{{bitmap: 8}}, 104*mib + 8},
		{"two tiny clones", []cloneMemory{{bitmap: 8}, {bitmap: 8}}, 96*mib + 2*(8*mib+8)},
		{"1 TiB, 4 KiB regions", []cloneMemory{{bitmap: tib}}, 136 * mib},
		{"256 GiB", []cloneMemory{{bitmap: 8 * mib}}, 112 * mib},
		{"two clones", []cloneMemory{{bitmap: tib}, {bitmap: 8 * mib}}, 96*mib + tib + 8*mib + 8*mib + 8*mib},
		{"a remote source's window", []cloneMemory{{bitmap: 8, window: 64 * mib}}, 232*mib + 8},
	} {
		if got := memoryLimit(tc.clones); got != tc.want {
			t.Errorf("%s: limit %d MiB, want %d MiB", tc.name, got/mib, tc.want/mib)
		}
	}
	for spec, window := range map[string]int64{
		"src": 0, "/dev/sdb": 0, "dev:parent": 0,
		"nbd+unix:///x?socket=/s": 64 * mib, "nbds://h/x": 64 * mib, "https://h/disk.img": 64 * mib,
	} {
		tbl, err := target.ParseTable("0 64 clone md dst " + spec + " 8")
		if err != nil {
			t.Fatal(err)
		}
		if got := cloneMemoryOf(tbl); got.window != window || got.bitmap != 8 {
			t.Errorf("source %q: %+v, want window %d", spec, got, window)
		}
	}
	for _, tc := range []struct {
		line string
		want int64
	}{
		{"0 2147483648 clone md dst src 8", 32 * mib}, // 1 TiB, 4 KiB regions
		{"0 2147483648 clone md dst src 16 0", 16 * mib},
		{"0 64 clone md dst src 8", 8},             // 8 regions: one word
		{"0 65 clone md dst src 8", 8},             // a partial tail region
		{"0 8 clone md dst src 8", 8},              // region = device
		{"0 64 clone md dst src 2048", 8},          // region > device
		{"0 1048576 clone md dst src 8", 16 << 10}, // 512 MiB
		{"0 64 linear dst 0", 0},
		{"0 64 clone md dst src x", 0},
	} {
		tbl, err := target.ParseTable(tc.line)
		if err != nil {
			t.Fatal(err)
		}
		if got := cloneBitmapBytes(tbl); got != tc.want {
			t.Errorf("%q: bitmap %d bytes, want %d", tc.line, got, tc.want)
		}
	}
}

// TestDaemonMemoryLimitFollowsDevices: the runtime's limit follows clone
// creation and removal, and the daemon gives the old limit back when it
// stops.
func TestDaemonMemoryLimitFollowsDevices(t *testing.T) {
	t.Setenv("GOMEMLIMIT", "")
	before := debug.SetMemoryLimit(-1)
	ctx := t.Context()
	f := newFakeFactory()
	td := startDaemon(t, t.TempDir(), f.build, nil)
	limit := func() int64 { return debug.SetMemoryLimit(-1) }
	if got := limit(); got != memLimitFloor {
		t.Fatalf("no device: limit %d MiB, want the floor %d MiB", got/mib, memLimitFloor/mib)
	}
	c := dial(t, td.control)
	// The fake target keeps its disk in memory: small clones, whose
	// bitmaps still move the limit by their exact size.
	if _, err := c.Create(ctx, "a", "0 131072 clone md dst src 8", "/data"); err != nil { // 64 MiB: 2 KiB of bitmap
		t.Fatal(err)
	}
	want := int64(memLimitBase + 2048 + memLimitPerStore)
	if got := limit(); got != want {
		t.Fatalf("after a clone: limit %d, want %d", got, want)
	}
	if _, err := c.Create(ctx, "b", "0 65536 clone md2 dst2 src 16", "/data"); err != nil { // 32 MiB, 8 KiB regions: 512 B
		t.Fatal(err)
	}
	if _, err := c.Create(ctx, "other", "0 64 fake", ""); err != nil {
		t.Fatal(err)
	}
	want2 := int64(memLimitBase + 2048 + memLimitPerStore + 512 + memLimitPerStore)
	if got := limit(); got != want2 {
		t.Fatalf("after a second clone and a device of another type: limit %d, want %d", got, want2)
	}
	if err := c.Remove(ctx, "a", false); err != nil {
		t.Fatal(err)
	}
	if got, want := limit(), int64(memLimitBase+512+memLimitPerStore); got != want {
		t.Fatalf("after removing the first clone: limit %d, want %d", got, want)
	}
	if err := c.Remove(ctx, "b", false); err != nil {
		t.Fatal(err)
	}
	if got := limit(); got != memLimitFloor {
		t.Fatalf("after removing every clone: limit %d, want the floor %d", got, int64(memLimitFloor))
	}
	td.stop(t)
	if got := limit(); got != before {
		t.Fatalf("after stop: limit %d, want the one before the daemon, %d", got, before)
	}
}

// TestDaemonMemoryLimitFromEnv: a GOMEMLIMIT in the environment wins.
func TestDaemonMemoryLimitFromEnv(t *testing.T) {
	t.Setenv("GOMEMLIMIT", "300MiB")
	prev := debug.SetMemoryLimit(300 * mib) // what the runtime made of it at start
	t.Cleanup(func() { debug.SetMemoryLimit(prev) })
	ctx := t.Context()
	f := newFakeFactory()
	td := startDaemon(t, t.TempDir(), f.build, nil)
	c := dial(t, td.control)
	if _, err := c.Create(ctx, "a", "0 131072 clone md dst src 8", "/data"); err != nil {
		t.Fatal(err)
	}
	if got := debug.SetMemoryLimit(-1); got != 300*mib {
		t.Fatalf("limit %d MiB with GOMEMLIMIT=300MiB, want 300 MiB", got/mib)
	}
	td.stop(t)
	if got := debug.SetMemoryLimit(-1); got != 300*mib {
		t.Fatalf("after stop: limit %d MiB, want 300 MiB", got/mib)
	}
}
