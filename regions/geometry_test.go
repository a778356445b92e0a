package regions

import (
	"errors"
	"testing"
)

func TestGeometry(t *testing.T) {
	tests := []struct {
		name           string
		target, region int64
		nr             uint64
		lastLen        int64
		wantErr        bool
	}{
		{"exact", 64 << 10, 4 << 10, 16, 4 << 10, false},
		{"partial tail", 64<<10 + 512, 4 << 10, 17, 512, false},
		{"region equals device", 1 << 20, 1 << 20, 1, 1 << 20, false},
		{"region larger than device", 4096, 1 << 20, 1, 4096, false},
		{"one sector", 512, 4096, 1, 512, false},
		{"odd tail", 10*4096 + 1536, 4096, 11, 1536, false},
		{"not power of two", 1 << 20, 3 << 10, 0, 0, true},
		{"zero target", 0, 4096, 0, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g, err := NewGeometry(tc.target, tc.region)
			if tc.wantErr {
				if !errors.Is(err, ErrGeometry) {
					t.Fatalf("err = %v, want ErrGeometry", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if g.NrRegions() != tc.nr {
				t.Fatalf("NrRegions = %d, want %d", g.NrRegions(), tc.nr)
			}
			if got := g.Len(tc.nr - 1); got != tc.lastLen {
				t.Fatalf("last Len = %d, want %d", got, tc.lastLen)
			}
			var sum int64
			for r := range g.NrRegions() {
				sum += g.Len(r)
			}
			if sum != tc.target || g.RangeLen(0, g.NrRegions()) != tc.target {
				t.Fatalf("sum of lengths %d, RangeLen %d, want %d", sum, g.RangeLen(0, g.NrRegions()), tc.target)
			}
		})
	}
}

func TestWholeRegions(t *testing.T) {
	g, _ := NewGeometry(10*4096+1536, 4096) // 11 regions, last is 1536 bytes
	tests := []struct {
		off, n       int64
		first, count uint64
	}{
		{0, 4096, 0, 1},
		{0, 4095, 0, 0},
		{1, 8190, 1, 0},
		{1, 8192, 1, 1},
		{4096, 3 * 4096, 1, 3},
		{100, 3 * 4096, 1, 2},
		{10 * 4096, 1536, 10, 1},      // the partial tail, covered to the end
		{10 * 4096, 1024, 10, 0},      // the tail, not to the end
		{0, 10*4096 + 1536, 0, 11},    // everything
		{512, 10*4096 + 1024, 1, 10},  // everything but the first
		{9 * 4096, 4096 + 1536, 9, 2}, // last full + tail
		{0, 0, 0, 0},
	}
	for _, tc := range tests {
		first, count := g.WholeRegions(tc.off, tc.n)
		if count != tc.count || (count > 0 && first != tc.first) {
			t.Errorf("WholeRegions(%d, %d) = %d+%d, want %d+%d", tc.off, tc.n, first, count, tc.first, tc.count)
		}
	}
}

func TestSplit(t *testing.T) {
	g, _ := NewGeometry(5*4096+100, 4096)
	type piece struct {
		r      uint64
		off, n int64
	}
	var got []piece
	err := g.Split(4000, 4096*2+200, func(r uint64, off, n int64) error {
		got = append(got, piece{r, off, n})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []piece{{0, 4000, 96}, {1, 4096, 4096}, {2, 8192, 4096}, {3, 12288, 104}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("piece %d = %v, want %v", i, got[i], want[i])
		}
	}
	stop := errors.New("stop")
	calls := 0
	if err := g.Split(0, 3*4096, func(uint64, int64, int64) error { calls++; return stop }); err != stop || calls != 1 {
		t.Fatalf("Split did not stop at the first error: err=%v calls=%d", err, calls)
	}
	if !g.Contains(0, g.TargetSize()) || g.Contains(1, g.TargetSize()) || g.Contains(-1, 1) {
		t.Fatal("Contains is wrong at the edges")
	}
	if !g.IsWhole(5, 5*4096, 100) || g.IsWhole(4, 4*4096, 100) {
		t.Fatal("IsWhole is wrong")
	}
}
