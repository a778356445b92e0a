package regions

import (
	"math/rand/v2"
	"sync"
	"testing"
)

func TestBitmapModel(t *testing.T) {
	for _, n := range []uint64{1, 63, 64, 65, 1000, 4097} {
		b := NewBitmap(n)
		model := make([]bool, n)
		rng := rand.New(rand.NewPCG(1, n))
		for range 5000 {
			i := rng.Uint64N(n)
			switch rng.IntN(4) {
			case 0:
				if b.Set(i) == model[i] {
					t.Fatalf("n=%d Set(%d) changed-report wrong", n, i)
				}
				model[i] = true
			case 1:
				if b.Clear(i) != model[i] {
					t.Fatalf("n=%d Clear(%d) changed-report wrong", n, i)
				}
				model[i] = false
			case 2:
				k := rng.Uint64N(n-i) + 1
				want := uint64(0)
				for j := i; j < i+k; j++ {
					if !model[j] {
						want++
					}
					model[j] = true
				}
				if got := b.SetRange(i, k); got != want {
					t.Fatalf("n=%d SetRange(%d,%d) = %d, want %d", n, i, k, got, want)
				}
			case 3:
				k := rng.Uint64N(n-i) + 1
				want := true
				for j := i; j < i+k; j++ {
					want = want && model[j]
				}
				if b.AllSet(i, k) != want {
					t.Fatalf("n=%d AllSet(%d,%d) wrong", n, i, k)
				}
			}
			var count uint64
			for _, v := range model {
				if v {
					count++
				}
			}
			if b.Count() != count {
				t.Fatalf("n=%d Count = %d, want %d", n, b.Count(), count)
			}
			from := rng.Uint64N(n + 1)
			wantClear, wantSet := n, n
			for j := from; j < n; j++ {
				if !model[j] && wantClear == n {
					wantClear = j
				}
				if model[j] && wantSet == n {
					wantSet = j
				}
			}
			if got := b.NextClear(from); got != wantClear {
				t.Fatalf("n=%d NextClear(%d) = %d, want %d", n, from, got, wantClear)
			}
			if got := b.NextSet(from); got != wantSet {
				t.Fatalf("n=%d NextSet(%d) = %d, want %d", n, from, got, wantSet)
			}
			end := from + rng.Uint64N(n+2-from) // may pass Len
			if got, want := b.NextClearBefore(from, end), min(wantClear, end, n); got != want {
				t.Fatalf("n=%d NextClearBefore(%d, %d) = %d, want %d", n, from, end, got, want)
			}
			if got, want := b.NextSetBefore(from, end), min(wantSet, end, n); got != want {
				t.Fatalf("n=%d NextSetBefore(%d, %d) = %d, want %d", n, from, end, got, want)
			}
		}
	}
}

func TestBitmapFullAndLoad(t *testing.T) {
	b := NewBitmap(70)
	b.SetRange(0, 70)
	if !b.Full() || b.NextClear(0) != 70 {
		t.Fatal("a full bitmap must report Full and no clear bit")
	}
	words := make([]uint64, b.NumWords())
	b.Words(0, words)
	c := NewBitmap(70)
	words[1] = ^uint64(0) // bits past Len must be ignored on load
	c.LoadWords(0, words)
	if c.Count() != 70 || !c.Full() {
		t.Fatalf("LoadWords count = %d, want 70", c.Count())
	}
	c.LoadWords(0, []uint64{0})
	if c.Count() != 6 {
		t.Fatalf("after clearing word 0 count = %d, want 6", c.Count())
	}
}

func TestBitmapConcurrentCount(t *testing.T) {
	b := NewBitmap(1 << 16)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for range 20000 {
				b.Set(rng.Uint64N(1 << 16))
			}
		}()
	}
	wg.Wait()
	var count uint64
	for i := range uint64(1 << 16) {
		if b.Test(i) {
			count++
		}
	}
	if b.Count() != count {
		t.Fatalf("Count = %d, bits set = %d", b.Count(), count)
	}
}
