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

func TestLocksRuns(t *testing.T) {
	l := NewLocks()
	// A run across three blocks stops before the first held region.
	if !l.TryLock(150) {
		t.Fatal("TryLock of a free region failed")
	}
	if got := l.TryLockRun(60, 200); got != 90 {
		t.Fatalf("TryLockRun(60, 200) with 150 held = %d, want 90", got)
	}
	for _, r := range []uint64{60, 63, 64, 127, 128, 149} {
		if l.TryLock(r) {
			t.Fatalf("region %d of a locked run was free", r)
		}
	}
	if got := l.TryLockRun(60, 10); got != 0 {
		t.Fatalf("TryLockRun on a held region = %d, want 0", got)
	}
	if got := l.TryLockRun(151, 64); got != 64 {
		t.Fatalf("TryLockRun(151, 64) = %d, want 64", got)
	}
	l.UnlockRun(60, 91) // 60..150, across the blocks
	if !l.TryLock(100) {
		t.Fatal("region 100 still held after UnlockRun")
	}
	l.Unlock(100)
	l.UnlockRun(151, 64)
	if l.Len() != 0 {
		t.Fatalf("%d lock entries leaked", l.Len())
	}
	// A region somebody waits for is not taken by a run.
	l.TryLock(70)
	waiting := make(chan error)
	go func() { waiting <- l.Lock(context.Background(), 70) }()
	for l.Len() < 2 { // held + one waited block
		time.Sleep(time.Millisecond)
	}
	l.Unlock(70)
	if err := <-waiting; err != nil {
		t.Fatal(err)
	}
	if got := l.TryLockRun(64, 64); got != 6 {
		t.Fatalf("TryLockRun(64, 64) with 70 held by the waiter = %d, want 6", got)
	}
	l.UnlockRun(64, 6)
	l.Unlock(70)
	if l.Len() != 0 {
		t.Fatalf("%d lock entries leaked", l.Len())
	}
}

func TestLocksUnlockRunWakesWaiters(t *testing.T) {
	l := NewLocks()
	if got := l.TryLockRun(0, 300); got != 300 {
		t.Fatalf("TryLockRun(0, 300) = %d", got)
	}
	var wg sync.WaitGroup
	for _, r := range []uint64{0, 63, 64, 200, 299} {
		wg.Go(func() {
			if err := l.Lock(context.Background(), r); err != nil {
				t.Error(err)
				return
			}
			l.Unlock(r)
		})
	}
	time.Sleep(10 * time.Millisecond)
	l.UnlockRun(0, 300)
	wg.Wait()
	if l.Len() != 0 {
		t.Fatalf("%d lock entries leaked", l.Len())
	}
}

func TestUnlockOfUnlockedRunPanics(t *testing.T) {
	l := NewLocks()
	l.TryLockRun(10, 5)
	defer func() {
		if recover() == nil {
			t.Fatal("UnlockRun past the held run did not panic")
		}
	}()
	l.UnlockRun(10, 6)
}

func BenchmarkLockRun256(b *testing.B) {
	l := NewLocks()
	for i := range b.N {
		r := uint64(i%4096) * 256
		if l.TryLockRun(r, 256) != 256 {
			b.Fatal("run not taken")
		}
		l.UnlockRun(r, 256)
	}
}
