package target

import (
	"context"
	"errors"
	"fmt"

	"github.com/nbdclone/nbdclone/blockdev"
)

// Extenter is implemented by targets that can describe their contents, for
// NBD_CMD_BLOCK_STATUS. Both methods describe [off, off+n) as consecutive
// extents starting at off: at least one, at most maxExtents, each at least
// one byte long, never past off+n (they may describe less than n bytes; the
// caller asks again for the rest). The answer is a snapshot: hydration and
// allocation may change right after it.
type Extenter interface {
	// Allocation is what reads of the range see: holes and zeroes where the
	// device that serves them says so (base:allocation), data otherwise.
	Allocation(ctx context.Context, off, n int64, maxExtents int) ([]blockdev.Extent, error)
	// Hydration is which parts are hydrated: served from the destination,
	// never again from the source.
	Hydration(ctx context.Context, off, n int64, maxExtents int) ([]HydrationExtent, error)
}

// HydrationExtent is a run of a target with one hydration state.
type HydrationExtent struct {
	Length   int64
	Hydrated bool
}

// FastZeroer is implemented by targets that can tell in advance whether a
// WriteZeroes would be fast (NBD_CMD_FLAG_FAST_ZERO): done natively by the
// device, with no copy from the source and no zero buffers written.
type FastZeroer interface {
	// ZeroesFast reports whether WriteZeroes(off, n) is fast now. A whole
	// device range needs no copy, so ZeroesFast(0, Size()) asks only
	// whether the device zeroes natively.
	ZeroesFast(off, n int64) bool
}

var (
	_ Extenter   = (*clone)(nil)
	_ Extenter   = (*linear)(nil)
	_ FastZeroer = (*clone)(nil)
	_ FastZeroer = (*linear)(nil)
)

// maxMapCalls bounds the device maps one Allocation call makes: a clone
// whose hydration alternates region by region would otherwise cost two
// syscalls per region of a 4 GiB request. The answer then covers less of
// the range, which the protocol allows.
const maxMapCalls = 4096

// errEnough stops a walk that has described as much as it may.
var errEnough = errors.New("target: enough extents")

// extentList accumulates extents, merging neighbours with equal state.
type extentList struct {
	extents []blockdev.Extent
	max     int
}

// add appends e (Length > 0); it reports false once the list is full and e
// could not be merged.
func (l *extentList) add(e blockdev.Extent) bool {
	if k := len(l.extents); k > 0 && l.extents[k-1].Hole == e.Hole && l.extents[k-1].Zero == e.Zero {
		l.extents[k-1].Length += e.Length
		return true
	}
	if len(l.extents) >= l.max {
		return false
	}
	l.extents = append(l.extents, e)
	return true
}

// mapDevice adds the extents of [off, off+n) of dev (all data when dev is
// no blockdev.Mapper) to l, spending at most *calls Map calls. It returns
// errEnough when l is full or the calls are spent before the range is
// described.
func mapDevice(dev any, off, n int64, l *extentList, calls *int) error {
	m, ok := dev.(blockdev.Mapper)
	if !ok {
		if !l.add(blockdev.Extent{Length: n}) {
			return errEnough
		}
		return nil
	}
	end := off + n
	for off < end {
		if *calls <= 0 {
			return errEnough
		}
		*calls--
		extents, err := m.Map(off, end-off)
		if err != nil {
			return fmt.Errorf("target: map at %d+%d: %w", off, end-off, err)
		}
		if len(extents) == 0 {
			return fmt.Errorf("target: map at %d+%d: no extent", off, end-off)
		}
		for _, e := range extents {
			e.Length = min(e.Length, end-off)
			if e.Length <= 0 {
				return fmt.Errorf("target: map at %d: an empty extent", off)
			}
			if !l.add(e) {
				return errEnough
			}
			off += e.Length
			if off >= end {
				break
			}
		}
	}
	return nil
}

func checkExtentArgs(off, n int64, maxExtents int, size int64) error {
	if n <= 0 || off < 0 || n > size-off || maxExtents < 1 {
		return ErrRange
	}
	return nil
}

// Allocation: hydrated regions are read from the destination, so their
// allocation is the destination's; unhydrated ones are read from the
// source, so theirs is the source's (both one-to-one with the target).
func (c *clone) Allocation(_ context.Context, off, n int64, maxExtents int) ([]blockdev.Extent, error) {
	if err := checkExtentArgs(off, n, maxExtents, c.Size()); err != nil {
		return nil, err
	}
	if err := c.check(off, n); err != nil {
		return nil, err
	}
	l := extentList{max: maxExtents}
	calls := maxMapCalls
	err := c.runs(off, n, func(hydrated bool, o, k int64) error {
		if hydrated {
			return mapDevice(c.dst, o, k, &l, &calls)
		}
		return mapDevice(c.src, o, k, &l, &calls)
	})
	if err != nil && !errors.Is(err, errEnough) {
		return nil, err
	}
	if len(l.extents) == 0 {
		// The very first map call was refused for lack of budget: cannot
		// happen (the budget starts positive), but never answer nothing.
		return []blockdev.Extent{{Length: n}}, nil
	}
	return l.extents, nil
}

// Hydration is the region bitmap as runs.
func (c *clone) Hydration(_ context.Context, off, n int64, maxExtents int) ([]HydrationExtent, error) {
	if err := checkExtentArgs(off, n, maxExtents, c.Size()); err != nil {
		return nil, err
	}
	if err := c.check(off, n); err != nil {
		return nil, err
	}
	var extents []HydrationExtent
	err := c.runs(off, n, func(hydrated bool, _, k int64) error {
		if len(extents) >= maxExtents {
			return errEnough
		}
		extents = append(extents, HydrationExtent{Length: k, Hydrated: hydrated})
		return nil
	})
	if err != nil && !errors.Is(err, errEnough) {
		return nil, err
	}
	return extents, nil
}

// ZeroesFast: whole regions, hydrated or not, are zeroed on the destination
// (an unhydrated one is then marked, never copied); a partly covered
// unhydrated region must be copied from the source first, which is not
// fast. Only the first and last region of a range can be partly covered,
// and a hydrated region never becomes unhydrated, so the answer cannot turn
// false before the zeroing runs.
func (c *clone) ZeroesFast(off, n int64) bool {
	if !c.geom.Contains(off, n) || !zeroesFast(c.dst) {
		return false
	}
	if n == 0 {
		return true
	}
	first, count := c.geom.WholeRegions(off, n)
	for _, r := range []uint64{c.geom.Region(off), c.geom.Region(off + n - 1)} {
		whole := r >= first && r < first+count
		if !whole && !c.md.IsHydrated(r) {
			return false
		}
	}
	return true
}

func zeroesFast(dev any) bool {
	z, ok := dev.(interface{ ZeroesFast() bool })
	return ok && z.ZeroesFast()
}

// Allocation of a linear target is its device's.
func (l *linear) Allocation(_ context.Context, off, n int64, maxExtents int) ([]blockdev.Extent, error) {
	if err := checkExtentArgs(off, n, maxExtents, l.size); err != nil {
		return nil, err
	}
	list := extentList{max: maxExtents}
	calls := maxMapCalls
	if err := mapDevice(l.dev, l.offset+off, n, &list, &calls); err != nil && !errors.Is(err, errEnough) {
		return nil, err
	}
	if len(list.extents) == 0 {
		return []blockdev.Extent{{Length: n}}, nil
	}
	return list.extents, nil
}

// Hydration: a linear target is what a clone becomes once fully hydrated.
func (l *linear) Hydration(_ context.Context, off, n int64, maxExtents int) ([]HydrationExtent, error) {
	if err := checkExtentArgs(off, n, maxExtents, l.size); err != nil {
		return nil, err
	}
	return []HydrationExtent{{Length: n, Hydrated: true}}, nil
}

func (l *linear) ZeroesFast(off, n int64) bool {
	return l.check(off, n) == nil && zeroesFast(l.dev)
}
