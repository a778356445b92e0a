package regions

import (
	"context"
	"math/bits"
	"sync"
)

const lockShards = 64

// blockShift groups regions by 64: one lock entry (a mask) covers a block
// of 64 aligned regions, so a run of regions is locked or unlocked with one
// map operation per 64 regions (a 1 MiB copy of 4 KiB regions: 4, not 256).
const blockShift = 6

// Locks are per-region exclusive locks: the descriptor that serialises a
// background copy, an on-demand copy, a whole-region overwrite and user
// writes to one unhydrated region (dm-clone's hydration hash table).
type Locks struct {
	shards [lockShards]lockShard
	pool   sync.Pool
}

type lockShard struct {
	mu sync.Mutex
	// held maps a block of 64 regions to its entry while one of its
	// regions is held or waited on.
	held map[uint64]*lockBlock // guarded by mu
}

// lockBlock is the lock state of 64 aligned regions. All fields are
// guarded by the shard's mu.
type lockBlock struct {
	held uint64 // bit i: region block*64+i is held
	// waited has the bit of every region a waiter waits for (a superset
	// while waiters > 0: bits are cleared only when the last one leaves).
	waited  uint64
	waiters int
	// wake is closed (and replaced) when regions are unlocked while
	// waiters > 0; nil while nobody waits.
	wake chan struct{}
}

// NewLocks returns an empty lock table.
func NewLocks() *Locks {
	l := &Locks{}
	for i := range l.shards {
		l.shards[i].held = make(map[uint64]*lockBlock)
	}
	l.pool.New = func() any { return new(lockBlock) }
	return l
}

func (l *Locks) shard(block uint64) *lockShard {
	return &l.shards[(block*0x9E3779B97F4A7C15)>>58]
}

// entryLocked returns block's entry, creating it. The shard's mu is held.
func (l *Locks) entryLocked(s *lockShard, block uint64) *lockBlock {
	e := s.held[block]
	if e == nil {
		e = l.pool.Get().(*lockBlock)
		s.held[block] = e
	}
	return e
}

// dropLocked deletes block's entry if nothing is held or waited on in it.
// The shard's mu is held.
func (l *Locks) dropLocked(s *lockShard, block uint64, e *lockBlock) {
	if e.held != 0 || e.waiters != 0 {
		return
	}
	delete(s.held, block)
	*e = lockBlock{}
	l.pool.Put(e)
}

// Lock takes region r's lock, waiting for the holder. It returns ctx's error
// if ctx ends first, without the lock.
func (l *Locks) Lock(ctx context.Context, r uint64) error {
	block, bit := r>>blockShift, uint64(1)<<(r&63)
	s := l.shard(block)
	s.mu.Lock()
	e := l.entryLocked(s, block)
	if e.held&bit == 0 && e.waited&bit == 0 {
		e.held |= bit
		s.mu.Unlock()
		return nil
	}
	e.waiters++
	e.waited |= bit
	for e.held&bit != 0 {
		if e.wake == nil {
			e.wake = make(chan struct{})
		}
		wake := e.wake
		s.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			s.mu.Lock()
			l.leaveLocked(s, block, e)
			s.mu.Unlock()
			return ctx.Err()
		}
		s.mu.Lock()
	}
	e.held |= bit
	l.leaveLocked(s, block, e)
	s.mu.Unlock()
	return nil
}

// leaveLocked is a waiter leaving block's entry (with or without the
// lock). The shard's mu is held.
func (l *Locks) leaveLocked(s *lockShard, block uint64, e *lockBlock) {
	e.waiters--
	if e.waiters == 0 {
		e.waited = 0
	}
	l.dropLocked(s, block, e)
}

// TryLock takes region r's lock only if nobody holds or waits for it.
func (l *Locks) TryLock(r uint64) bool { return l.TryLockRun(r, 1) == 1 }

// TryLockRun takes the locks of regions r, r+1, … up to max of them, as
// long as each is neither held nor waited on, and returns how many it took
// (0 when region r is taken).
func (l *Locks) TryLockRun(r, max uint64) uint64 {
	got := uint64(0)
	for got < max {
		at := r + got
		block, off := at>>blockShift, at&63
		want := min(max-got, 64-off)
		mask := runMask(off, want)
		s := l.shard(block)
		s.mu.Lock()
		e := l.entryLocked(s, block)
		busy := (e.held | e.waited) & mask
		if busy != 0 {
			// Only the free prefix of the run.
			want = uint64(bits.TrailingZeros64(busy >> off)) // regions before the first busy one
			mask = runMask(off, want)
		}
		e.held |= mask
		l.dropLocked(s, block, e)
		s.mu.Unlock()
		got += want
		if busy != 0 {
			break
		}
	}
	return got
}

// runMask has n bits set from bit off (off+n ≤ 64).
func runMask(off, n uint64) uint64 {
	if n == 0 {
		return 0
	}
	if n == 64 {
		return ^uint64(0)
	}
	return ((uint64(1) << n) - 1) << off
}

// Unlock releases region r's lock, which the caller holds.
func (l *Locks) Unlock(r uint64) { l.UnlockRun(r, 1) }

// UnlockRun releases the locks of regions [r, r+n), which the caller holds.
func (l *Locks) UnlockRun(r, n uint64) {
	for n > 0 {
		block, off := r>>blockShift, r&63
		k := min(n, 64-off)
		mask := runMask(off, k)
		s := l.shard(block)
		s.mu.Lock()
		e := s.held[block]
		if e == nil || e.held&mask != mask {
			s.mu.Unlock()
			panic("regions: unlock of an unlocked region")
		}
		e.held &^= mask
		if e.waited&mask != 0 && e.wake != nil {
			close(e.wake)
			e.wake = nil
		}
		l.dropLocked(s, block, e)
		s.mu.Unlock()
		r += k
		n -= k
	}
}

// Len is the number of regions locked plus blocks waited on (for leak
// checks: 0 when nothing is held or waited on).
func (l *Locks) Len() int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for _, e := range s.held {
			n += bits.OnesCount64(e.held)
			if e.waiters > 0 {
				n++
			}
		}
		s.mu.Unlock()
	}
	return n
}

// WaitRange waits until every region of [first, end) that is locked when it
// is called has been unlocked once. Cost: the regions locked now, not the
// size of the range.
func (l *Locks) WaitRange(ctx context.Context, first, end uint64) error {
	var held []uint64
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for block, e := range s.held {
			for m := e.held; m != 0; m &= m - 1 {
				r := block<<blockShift | uint64(bits.TrailingZeros64(m))
				if r >= first && r < end {
					held = append(held, r)
				}
			}
		}
		s.mu.Unlock()
	}
	for _, r := range held {
		if err := l.Lock(ctx, r); err != nil {
			return err
		}
		l.Unlock(r)
	}
	return nil
}
