package regions

import (
	"context"
	"sync"
)

const lockShards = 64

// Locks are per-region exclusive locks: the descriptor that serialises a
// background copy, an on-demand copy, a whole-region overwrite and user
// writes to one unhydrated region (dm-clone's hydration hash table).
type Locks struct {
	shards [lockShards]lockShard
	pool   sync.Pool
}

type lockShard struct {
	mu sync.Mutex
	// held maps a region to its entry while the lock is held or waited on.
	held map[uint64]*lockEntry // guarded by mu
}

type lockEntry struct {
	sem  chan struct{} // capacity 1: full while held
	refs int           // holder + waiters; guarded by the shard's mu
}

// NewLocks returns an empty lock table.
func NewLocks() *Locks {
	l := &Locks{}
	for i := range l.shards {
		l.shards[i].held = make(map[uint64]*lockEntry)
	}
	l.pool.New = func() any { return &lockEntry{sem: make(chan struct{}, 1)} }
	return l
}

func (l *Locks) shard(r uint64) *lockShard { return &l.shards[(r*0x9E3779B97F4A7C15)>>58] }

// Lock takes region r's lock, waiting for the holder. It returns ctx's error
// if ctx ends first, without the lock.
func (l *Locks) Lock(ctx context.Context, r uint64) error {
	s := l.shard(r)
	s.mu.Lock()
	e := s.held[r]
	if e == nil {
		e = l.pool.Get().(*lockEntry)
		s.held[r] = e
	}
	e.refs++
	s.mu.Unlock()
	select {
	case e.sem <- struct{}{}:
		return nil
	default:
	}
	select {
	case e.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		l.release(s, r, e)
		return ctx.Err()
	}
}

// TryLock takes region r's lock only if nobody holds or waits for it.
func (l *Locks) TryLock(r uint64) bool {
	s := l.shard(r)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held[r] != nil {
		return false
	}
	e := l.pool.Get().(*lockEntry)
	e.refs = 1
	e.sem <- struct{}{}
	s.held[r] = e
	return true
}

// Unlock releases region r's lock, which the caller holds.
func (l *Locks) Unlock(r uint64) {
	s := l.shard(r)
	s.mu.Lock()
	e := s.held[r]
	s.mu.Unlock()
	if e == nil {
		panic("regions: unlock of an unlocked region")
	}
	<-e.sem
	l.release(s, r, e)
}

func (l *Locks) release(s *lockShard, r uint64, e *lockEntry) {
	s.mu.Lock()
	e.refs--
	last := e.refs == 0
	if last {
		delete(s.held, r)
	}
	s.mu.Unlock()
	if last {
		l.pool.Put(e)
	}
}

// Len is the number of regions locked or waited on (for leak checks).
func (l *Locks) Len() int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		n += len(s.held)
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
		for r := range s.held {
			if r >= first && r < end {
				held = append(held, r)
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
