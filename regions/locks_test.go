package regions

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

func TestLocksExclusive(t *testing.T) {
	l := NewLocks()
	var (
		wg      sync.WaitGroup
		holders [4]int
		mu      sync.Mutex
		maxSeen int
	)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 500 {
				r := uint64((g + i) % 4)
				if err := l.Lock(context.Background(), r); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				holders[r]++
				maxSeen = max(maxSeen, holders[r])
				mu.Unlock()
				mu.Lock()
				holders[r]--
				mu.Unlock()
				l.Unlock(r)
			}
		}()
	}
	wg.Wait()
	if maxSeen != 1 {
		t.Fatalf("a region had %d holders at once", maxSeen)
	}
	if l.Len() != 0 {
		t.Fatalf("%d lock entries leaked", l.Len())
	}
}

func TestLocksTryAndCancel(t *testing.T) {
	l := NewLocks()
	if !l.TryLock(7) {
		t.Fatal("TryLock of a free region failed")
	}
	if l.TryLock(7) {
		t.Fatal("TryLock of a held region succeeded")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := l.Lock(ctx, 7); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock on a held region with an expiring ctx = %v", err)
	}
	done := make(chan struct{})
	go func() {
		if err := l.Lock(context.Background(), 7); err != nil {
			t.Error(err)
		}
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("Lock returned while the region was held")
	case <-time.After(10 * time.Millisecond):
	}
	l.Unlock(7)
	<-done
	l.Unlock(7)
	if l.Len() != 0 {
		t.Fatalf("%d lock entries leaked", l.Len())
	}
}

func TestWaitRange(t *testing.T) {
	l := NewLocks()
	l.TryLock(5)
	l.TryLock(50) // outside the range: not waited for
	done := make(chan error)
	go func() { done <- l.WaitRange(context.Background(), 0, 10) }()
	select {
	case <-done:
		t.Fatal("WaitRange returned while region 5 was held")
	case <-time.After(20 * time.Millisecond):
	}
	l.Unlock(5)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := l.WaitRange(context.Background(), 0, 10); err != nil {
		t.Fatal(err)
	}
	l.Unlock(50)
}
