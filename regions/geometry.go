package regions

import (
	"errors"
	"fmt"
	"math/bits"
)

// ErrGeometry is wrapped by invalid geometry parameters.
var ErrGeometry = errors.New("regions: invalid geometry")

// Geometry maps byte offsets of a target onto regions.
type Geometry struct {
	targetSize int64
	regionSize int64
	shift      uint
	nrRegions  uint64
}

// NewGeometry validates and builds a geometry: regionSize a power of two,
// targetSize > 0.
func NewGeometry(targetSize, regionSize int64) (Geometry, error) {
	if targetSize <= 0 {
		return Geometry{}, fmt.Errorf("%w: target size %d", ErrGeometry, targetSize)
	}
	if regionSize <= 0 || regionSize&(regionSize-1) != 0 {
		return Geometry{}, fmt.Errorf("%w: region size %d is not a power of two", ErrGeometry, regionSize)
	}
	shift := uint(bits.TrailingZeros64(uint64(regionSize)))
	n := uint64((targetSize + regionSize - 1) >> shift)
	return Geometry{targetSize: targetSize, regionSize: regionSize, shift: shift, nrRegions: n}, nil
}

func (g Geometry) TargetSize() int64 { return g.targetSize }
func (g Geometry) RegionSize() int64 { return g.regionSize }
func (g Geometry) NrRegions() uint64 { return g.nrRegions }

// Region is the region holding byte off.
func (g Geometry) Region(off int64) uint64 { return uint64(off >> g.shift) }

// Start is the first byte of region r.
func (g Geometry) Start(r uint64) int64 { return int64(r) << g.shift }

// Len is the length of region r: RegionSize, except for a partial last region.
func (g Geometry) Len(r uint64) int64 {
	return min(g.regionSize, g.targetSize-g.Start(r))
}

// RangeLen is the byte length of regions [r, r+n).
func (g Geometry) RangeLen(r, n uint64) int64 {
	if n == 0 {
		return 0
	}
	return g.Start(r+n-1) - g.Start(r) + g.Len(r+n-1)
}

// Contains reports whether [off, off+n) lies inside the target.
func (g Geometry) Contains(off, n int64) bool {
	return off >= 0 && n >= 0 && off <= g.targetSize && n <= g.targetSize-off
}

// WholeRegions returns the regions [first, first+count) that [off, off+n)
// covers entirely. A partial last region counts as whole when the range
// reaches the end of the target (dm-clone never treats it as whole, so it
// can never be discarded or overwritten without a copy; we can).
func (g Geometry) WholeRegions(off, n int64) (first, count uint64) {
	if n <= 0 {
		return 0, 0
	}
	end := off + n
	first = uint64((off + g.regionSize - 1) >> g.shift)
	var last uint64 // exclusive
	if end >= g.targetSize {
		last = g.nrRegions
	} else {
		last = uint64(end >> g.shift)
	}
	if last <= first {
		return first, 0
	}
	return first, last - first
}

// IsWhole reports whether [off, off+n) is exactly region r.
func (g Geometry) IsWhole(r uint64, off, n int64) bool {
	return off == g.Start(r) && n == g.Len(r)
}

// Split calls fn for each region-bounded piece of [off, off+n), in order,
// with the region and the piece's offset and length. It stops at the first
// error and returns it.
func (g Geometry) Split(off, n int64, fn func(r uint64, off, n int64) error) error {
	for n > 0 {
		r := g.Region(off)
		end := min(g.Start(r)+g.regionSize, off+n)
		if err := fn(r, off, end-off); err != nil {
			return err
		}
		n -= end - off
		off = end
	}
	return nil
}
