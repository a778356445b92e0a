package daemon

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nbdclone/nbdclone/target"
)

type waitResult struct {
	info target.Info
	err  error
	at   time.Duration // fake time since the wait started
}

func startWait(ctx context.Context, r *registry, name string) <-chan waitResult {
	ch := make(chan waitResult, 1)
	start := time.Now()
	go func() {
		info, err := r.wait(ctx, name)
		ch <- waitResult{info, err, time.Since(start)}
	}()
	return ch
}

func pending(t *testing.T, ch <-chan waitResult) {
	t.Helper()
	synctest.Wait()
	select {
	case r := <-ch:
		t.Fatalf("wait returned early: %+v", r)
	default:
	}
}

func TestWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := t.Context()
		f := newFakeFactory()
		r := newTestRegistry(t, f.build)

		// Not a clone: nothing to wait for.
		if err := r.create(ctx, "lin", "0 8 fake", ""); err != nil {
			t.Fatal(err)
		}
		if _, err := r.wait(ctx, "lin"); err != nil {
			t.Fatal(err)
		}
		mustErr(t, func() error { _, err := r.wait(ctx, "nope"); return err }(), ErrNotFound, "device nope does not exist")

		if err := r.create(ctx, "c", "0 64 clone md d s 8", "/"); err != nil {
			t.Fatal(err)
		}
		ft := f.last()

		// Woken by the event, not by the fallback tick.
		ch := startWait(ctx, r, "c")
		pending(t, ch)
		ft.setClone(func(c *target.CloneInfo) { c.HydratedRegions = c.Regions; c.Hydrated = true })
		synctest.Wait()
		res := <-ch
		if res.err != nil || res.at != 0 || !res.info.Clone.Hydrated {
			t.Fatalf("%+v", res)
		}

		// Without an event, the 1 s tick notices.
		ft.mu.Lock()
		ft.clone.Hydrated = false
		ft.mu.Unlock()
		ch = startWait(ctx, r, "c")
		pending(t, ch)
		ft.mu.Lock()
		ft.clone.Hydrated = true
		ft.mu.Unlock()
		time.Sleep(time.Second)
		synctest.Wait()
		if res := <-ch; res.err != nil || res.at != time.Second {
			t.Fatalf("%+v", res)
		}

		// Fail mode and stopped hydration end the wait with an error.
		ft.setClone(func(c *target.CloneInfo) { c.Hydrated = false })
		ch = startWait(ctx, r, "c")
		pending(t, ch)
		ft.setClone(func(c *target.CloneInfo) { c.Mode = "Fail" })
		synctest.Wait()
		mustErr(t, (<-ch).err, ErrFailed, "device c: metadata is in Fail mode: hydration cannot complete")
		ft.setClone(func(c *target.CloneInfo) { c.Mode = "rw"; c.HydrationStopped = "3 copy errors in region 7" })
		_, err := r.wait(ctx, "c")
		mustErr(t, err, ErrFailed, "device c: hydration stopped: 3 copy errors in region 7")
		ft.setClone(func(c *target.CloneInfo) { c.HydrationStopped = "" })

		// Cancellation.
		cctx, cancel := context.WithCancel(ctx)
		ch = startWait(cctx, r, "c")
		pending(t, ch)
		cancel()
		synctest.Wait()
		if res := <-ch; !errors.Is(res.err, context.Canceled) {
			t.Fatalf("%+v", res)
		}

		// A swap to a non-clone table ends it.
		ch = startWait(ctx, r, "c")
		pending(t, ch)
		if err := r.load(ctx, "c", "0 64 fake", ""); err != nil {
			t.Fatal(err)
		}
		if err := r.resume(ctx, "c"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if res := <-ch; res.err != nil || res.info.Type != "fake" {
			t.Fatalf("%+v", res)
		}

		// Removal ends it.
		if err := r.load(ctx, "c", "0 64 clone md2 d s 8", "/"); err != nil {
			t.Fatal(err)
		}
		if err := r.resume(ctx, "c"); err != nil {
			t.Fatal(err)
		}
		ch = startWait(ctx, r, "c")
		pending(t, ch)
		if err := r.remove(ctx, "c", false); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		mustErr(t, (<-ch).err, ErrNotFound, "device c was removed")
	})
}
