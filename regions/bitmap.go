package regions

import (
	"math/bits"
	"sync/atomic"
)

// Bitmap is a fixed-size concurrent bitset, one bit per region. Set, Clear
// and Test are lock-free and safe from many goroutines.
type Bitmap struct {
	words []atomic.Uint64
	n     uint64
	count atomic.Uint64
}

// NewBitmap returns a bitmap of n clear bits.
func NewBitmap(n uint64) *Bitmap {
	return &Bitmap{words: make([]atomic.Uint64, (n+63)/64), n: n}
}

// Len is the number of bits.
func (b *Bitmap) Len() uint64 { return b.n }

// Count is the number of set bits.
func (b *Bitmap) Count() uint64 { return b.count.Load() }

// Full reports whether every bit is set.
func (b *Bitmap) Full() bool { return b.count.Load() == b.n }

// Test reports whether bit i is set.
func (b *Bitmap) Test(i uint64) bool {
	return b.words[i/64].Load()&(1<<(i%64)) != 0
}

// Set sets bit i and reports whether it was clear before.
func (b *Bitmap) Set(i uint64) bool {
	mask := uint64(1) << (i % 64)
	old := b.words[i/64].Or(mask)
	if old&mask != 0 {
		return false
	}
	b.count.Add(1)
	return true
}

// Clear clears bit i and reports whether it was set before.
func (b *Bitmap) Clear(i uint64) bool {
	mask := uint64(1) << (i % 64)
	old := b.words[i/64].And(^mask)
	if old&mask == 0 {
		return false
	}
	b.count.Add(^uint64(0))
	return true
}

// SetRange sets bits [i, i+n) and returns how many were clear before.
func (b *Bitmap) SetRange(i, n uint64) uint64 {
	var changed uint64
	for n > 0 {
		w, bit := i/64, i%64
		k := min(64-bit, n)
		mask := ^uint64(0) >> (64 - k) << bit
		old := b.words[w].Or(mask)
		changed += uint64(bits.OnesCount64(mask &^ old))
		i += k
		n -= k
	}
	b.count.Add(changed)
	return changed
}

// AllSet reports whether bits [i, i+n) are all set.
func (b *Bitmap) AllSet(i, n uint64) bool {
	for n > 0 {
		w, bit := i/64, i%64
		k := min(64-bit, n)
		mask := ^uint64(0) >> (64 - k) << bit
		if b.words[w].Load()&mask != mask {
			return false
		}
		i += k
		n -= k
	}
	return true
}

// NextClear returns the first clear bit at or after i, or Len() if none.
func (b *Bitmap) NextClear(i uint64) uint64 { return b.NextClearBefore(i, b.n) }

// NextSet returns the first set bit at or after i, or Len() if none.
func (b *Bitmap) NextSet(i uint64) uint64 { return b.NextSetBefore(i, b.n) }

// NextClearBefore returns the first clear bit in [i, end), or end (at most
// Len()) if none; it reads only the words of that range.
func (b *Bitmap) NextClearBefore(i, end uint64) uint64 { return b.next(i, end, ^uint64(0)) }

// NextSetBefore returns the first set bit in [i, end), or end (at most
// Len()) if none; it reads only the words of that range.
func (b *Bitmap) NextSetBefore(i, end uint64) uint64 { return b.next(i, end, 0) }

// next finds the first bit in [i, end) whose value differs from the bits
// of flip (all ones: a clear bit; zero: a set bit).
func (b *Bitmap) next(i, end, flip uint64) uint64 {
	end = min(end, b.n)
	if i >= end {
		return end
	}
	w := i / 64
	word := (b.words[w].Load() ^ flip) &^ ((1 << (i % 64)) - 1)
	last := (end - 1) / 64
	for {
		if word != 0 {
			return min(w*64+uint64(bits.TrailingZeros64(word)), end)
		}
		w++
		if w > last {
			return end
		}
		word = b.words[w].Load() ^ flip
	}
}

// Words copies words [w, w+len(dst)) into dst: a snapshot for persisting.
func (b *Bitmap) Words(w uint64, dst []uint64) {
	for i := range dst {
		dst[i] = b.words[w+uint64(i)].Load()
	}
}

// LoadWords replaces words [w, w+len(src)) with src and fixes the count.
// Bits past Len() in src are ignored. Not atomic as a whole: callers load
// while nothing else writes (open, reload after an aborted commit).
func (b *Bitmap) LoadWords(w uint64, src []uint64) {
	for i, v := range src {
		idx := w + uint64(i)
		if idx == uint64(len(b.words))-1 && b.n%64 != 0 {
			v &= (1 << (b.n % 64)) - 1
		}
		old := b.words[idx].Swap(v)
		delta := int64(bits.OnesCount64(v)) - int64(bits.OnesCount64(old))
		b.count.Add(uint64(delta))
	}
}

// NumWords is the number of 64-bit words.
func (b *Bitmap) NumWords() uint64 { return uint64(len(b.words)) }
