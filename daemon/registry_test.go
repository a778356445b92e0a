package daemon

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/target"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newTestRegistry returns a registry on a temp state dir; build nil means
// target.Build.
func newTestRegistry(t *testing.T, build buildFunc) *registry {
	t.Helper()
	if build == nil {
		build = target.Build
	}
	st := stateDir{dir: t.TempDir()}
	r := newRegistry(testLogger(t), st, build)
	t.Cleanup(func() {
		if err := r.shutdown(context.Background(), 5*time.Second); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return r
}

// tempImage creates a file of size bytes filled with b.
func tempImage(t *testing.T, dir string, name string, size int, b byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, bytes.Repeat([]byte{b}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func mustErr(t *testing.T, err, kind error, text string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want %q", text)
	}
	if !errors.Is(err, kind) {
		t.Errorf("error %q is not %v", err, kind)
	}
	if text != "" && err.Error() != text {
		t.Errorf("error text %q, want %q", err, text)
	}
}

func TestCreateNamesAndDuplicates(t *testing.T) {
	ctx := t.Context()
	r := newTestRegistry(t, nil)
	dir := t.TempDir()
	tempImage(t, dir, "a.img", 1<<20, 0)

	if err := r.create(ctx, "a", "0 2048 linear a.img 0", dir); err != nil {
		t.Fatal(err)
	}
	mustErr(t, r.create(ctx, "a", "0 2048 linear a.img 0", dir), ErrExists, "device a already exists")

	for _, name := range []string{"", ".", "..", "a/b", "a b", "é", strings.Repeat("x", 65)} {
		err := r.create(ctx, name, "0 2048 linear a.img 0", dir)
		mustErr(t, err, ErrInvalid, "")
		if !strings.HasPrefix(err.Error(), "invalid device name") {
			t.Errorf("name %q: %v", name, err)
		}
	}
	for _, name := range []string{"A-z_0.9+", strings.Repeat("x", 64), ".hidden"} {
		if err := r.create(ctx, name, "0 2048 linear a.img 0", dir); err != nil {
			t.Errorf("name %q: %v", name, err)
		}
	}

	// A constructor error is dm's text; nothing is left behind.
	err := r.create(ctx, "b", "0 4096 linear a.img 0", dir)
	mustErr(t, err, ErrInvalid, "Device "+filepath.Join(dir, "a.img")+" too small for target: start=0, len=4096, dev_size=2048")
	err = r.create(ctx, "b", "0 2048 linear", dir)
	mustErr(t, err, ErrInvalid, "Invalid argument count")
	var dm *target.DMError
	if !errors.As(err, &dm) {
		t.Errorf("%v does not carry the DMError", err)
	}
	mustErr(t, r.create(ctx, "b", "0 x linear a.img 0", dir), ErrInvalid, "")
	mustErr(t, r.create(ctx, "b", "0 2048 linear a.img 0", "relative"), ErrInvalid, `working directory "relative" is not absolute`)
	if _, err := r.get("b"); !errors.Is(err, ErrNotFound) {
		t.Errorf("failed create left device b: %v", err)
	}
	if _, err := os.Stat(r.state.path("b")); !os.IsNotExist(err) {
		t.Errorf("failed create left a state file: %v", err)
	}
	if got := len(r.list()); got != 4 {
		t.Errorf("%d devices, want 4", got)
	}
}

func TestStatusTableMessage(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	if err := r.create(ctx, "c", "0 64 clone md dest src 8", "/d"); err != nil {
		t.Fatal(err)
	}
	line, err := r.statusLine(ctx, "c")
	if err != nil || line != "0 64 clone 8 1/2 8 0/8 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw" {
		t.Errorf("status %q, %v", line, err)
	}
	canon := "0 64 clone " + filepath.Join("/d", "md") + " " + filepath.Join("/d", "dest") + " " + filepath.Join("/d", "src") + " 8"
	if line, err := r.tableLine(ctx, "c", false); err != nil || line != canon {
		t.Errorf("table %q, %v; want %q", line, err, canon)
	}
	if err := r.message(ctx, "c", "0", []string{"ok", "1"}); err != nil {
		t.Error(err)
	}
	mustErr(t, r.message(ctx, "c", "1", []string{"ok"}), ErrInvalid, "Invalid sector")
	mustErr(t, r.message(ctx, "c", "x", []string{"ok"}), ErrInvalid, "Invalid sector")
	mustErr(t, r.message(ctx, "c", "0", nil), ErrInvalid, "Invalid target message parameters.")
	mustErr(t, r.message(ctx, "c", "0", []string{"bogus"}), ErrInvalid, "Unsupported message")
	mustErr(t, r.message(ctx, "nope", "0", []string{"ok"}), ErrNotFound, "device nope does not exist")

	// JSON status reads Info and never asks for the dm status (which
	// commits metadata).
	ft := f.last()
	ft.mu.Lock()
	before := ft.statusOps
	ft.mu.Unlock()
	st, err := r.info(ctx, "c")
	if err != nil || st.Info == nil || st.Info.Clone == nil || st.State != StateActive || st.Type != "clone" {
		t.Fatalf("info %+v, %v", st, err)
	}
	ft.mu.Lock()
	after := ft.statusOps
	ft.mu.Unlock()
	if after != before {
		t.Error("JSON status called Status()")
	}

	// linear: nothing after the type.
	dir := t.TempDir()
	tempImage(t, dir, "l.img", 64*512, 0)
	r2 := newTestRegistry(t, nil)
	if err := r2.create(ctx, "l", "0 64 linear l.img 0", dir); err != nil {
		t.Fatal(err)
	}
	if line, err := r2.statusLine(ctx, "l"); err != nil || line != "0 64 linear" {
		t.Errorf("linear status %q, %v", line, err)
	}
	if line, err := r2.tableLine(ctx, "l", false); err != nil || line != "0 64 linear "+filepath.Join(dir, "l.img")+" 0" {
		t.Errorf("linear table %q, %v", line, err)
	}
}

// TestSwapUnderIO swaps tables back and forth while goroutines do I/O
// through the export: no request may fail or be lost, and none may reach a
// suspended or closed target.
func TestSwapUnderIO(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	tempImage(t, dir, "a.img", size, 'a')
	tempImage(t, dir, "b.img", size, 'b')
	t.Run("linear", func(t *testing.T) {
		r := newTestRegistry(t, nil)
		swapUnderIO(t, r, dir, []string{"0 2048 linear a.img 0", "0 2048 linear b.img 0"}, []string{
			"0 2048 linear " + filepath.Join(dir, "a.img") + " 0",
			"0 2048 linear " + filepath.Join(dir, "b.img") + " 0",
		})
	})
	t.Run("fake", func(t *testing.T) {
		f := newFakeFactory()
		r := newTestRegistry(t, f.build)
		// Only clone and linear arguments are paths: a fake's stay as given.
		tables := []string{"0 2048 fake a.img", "0 2048 fake b.img"}
		swapUnderIO(t, r, dir, tables, tables)
		for _, ft := range f.all() {
			if v := ft.violations(); len(v) > 0 {
				t.Errorf("I/O reached a suspended or closed target: %v", v)
			}
		}
	})
}

// swapUnderIO swaps between tables[0] and tables[1]; canon[i] is how
// tables[i] reads back (its paths resolved against dir).
func swapUnderIO(t *testing.T, r *registry, dir string, tables, canon []string) {
	ctx := t.Context()
	const size = 1 << 20
	if err := r.create(ctx, "d", tables[0], dir); err != nil {
		t.Fatal(err)
	}
	exp, release, ok := r.Open("d")
	if !ok {
		t.Fatal("no export")
	}
	defer release()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var done, failed atomic.Int64
	var firstErr atomic.Value
	for w := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, 4096)
			for {
				select {
				case <-stop:
					return
				default:
				}
				off := rng.Int64N(size/4096) * 4096
				var err error
				switch rng.IntN(4) {
				case 0:
					err = exp.WriteAt(ctx, buf, off, rng.IntN(2) == 0)
				case 1:
					err = exp.Flush(ctx)
				default:
					err = exp.ReadAt(ctx, buf, off)
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
				done.Add(1)
			}
		})
	}
	for i := range 20 {
		next := tables[(i+1)%2]
		if i%2 == 0 {
			if err := r.suspend(ctx, "d", 5*time.Second); err != nil {
				t.Fatal(err)
			}
		} // odd: resume suspends by itself
		if err := r.load(ctx, "d", next, dir); err != nil {
			t.Fatal(err)
		}
		if err := r.resume(ctx, "d"); err != nil {
			t.Fatal(err)
		}
		if line, _ := r.tableLine(ctx, "d", false); line != canon[(i+1)%2] {
			t.Fatalf("after swap %d the table is %q, want %q", i, line, canon[(i+1)%2])
		}
	}
	close(stop)
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d of %d requests failed, first: %v", failed.Load(), done.Load(), firstErr.Load())
	}
	if done.Load() == 0 {
		t.Fatal("no I/O done")
	}
	// The state file holds the live table.
	rec, err := os.ReadFile(r.state.path("d"))
	if err != nil || !strings.Contains(string(rec), `"table": "`+canon[0]+`"`) {
		t.Errorf("state %s, %v", rec, err)
	}
}

// TestGateHoldsIO checks suspend waits for I/O in flight and that I/O
// arriving while suspended waits for resume instead of failing.
func TestGateHoldsIO(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	if err := r.create(ctx, "d", "0 8 fake", ""); err != nil {
		t.Fatal(err)
	}
	ft := f.last()
	exp, _ := r.Lookup("d")
	hold, entered := make(chan struct{}), make(chan struct{}, 1)
	ft.setHold(hold, entered)

	ioErr := make(chan error, 2)
	go func() { ioErr <- exp.ReadAt(ctx, make([]byte, 512), 0) }()
	<-entered

	suspended := make(chan error, 1)
	go func() { suspended <- r.suspend(ctx, "d", 10*time.Second) }()
	waitFor(t, func() bool { return r.devices["d"].gate.isClosed() })
	select {
	case err := <-suspended:
		t.Fatalf("suspend returned (%v) with I/O in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(hold)
	if err := <-ioErr; err != nil {
		t.Fatal(err)
	}
	if err := <-suspended; err != nil {
		t.Fatal(err)
	}
	if ft.suspends.Load() != 1 {
		t.Errorf("target suspended %d times", ft.suspends.Load())
	}

	// New I/O waits at the gate.
	go func() { ioErr <- exp.WriteAt(ctx, make([]byte, 512), 0, false) }()
	select {
	case err := <-ioErr:
		t.Fatalf("I/O on a suspended device returned %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if err := r.resume(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	if err := <-ioErr; err != nil {
		t.Fatal(err)
	}
	if v := ft.violations(); len(v) > 0 {
		t.Errorf("I/O reached a suspended target: %v", v)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestSuspendTimeout(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	if err := r.create(ctx, "d", "0 8 fake", ""); err != nil {
		t.Fatal(err)
	}
	ft := f.last()
	hold, entered := make(chan struct{}), make(chan struct{}, 1)
	ft.setHold(hold, entered)
	exp, _ := r.Lookup("d")
	ioErr := make(chan error, 1)
	go func() { ioErr <- exp.ReadAt(ctx, make([]byte, 512), 0) }()
	<-entered

	err := r.suspend(ctx, "d", 20*time.Millisecond)
	mustErr(t, err, ErrTimeout, "device d: 1 I/O request(s) still in flight after 20ms; not suspended")
	if ft.suspends.Load() != 0 {
		t.Error("target suspended after a drain timeout")
	}
	if st := r.list()[0].State; st != StateActive {
		t.Errorf("state %s after a suspend timeout", st)
	}
	// The gate is open again: new I/O is not held.
	ft.setHold(nil, nil)
	if err := exp.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	close(hold)
	if err := <-ioErr; err != nil {
		t.Fatal(err)
	}
}

// TestResumeRestoresOldTable: a clone table on the live clone's metadata is
// built at resume; when that fails, the old table comes back.
func TestResumeRestoresOldTable(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	oldTable := "0 64 clone md dest src 8"
	newTable := "0 64 clone ./md dest src2 8 1 no_hydration"
	// How they read back, and what the builder sees: resolved against /x.
	oldCanon := "0 64 clone /x/md /x/dest /x/src 8"
	newCanon := "0 64 clone /x/md /x/dest /x/src2 8 1 no_hydration"
	if err := r.create(ctx, "c", oldTable, "/x"); err != nil {
		t.Fatal(err)
	}
	old := f.last()
	exp, _ := r.Lookup("c")

	// Same metadata store: load must not build (the store is held).
	if err := r.load(ctx, "c", newTable, "/x"); err != nil {
		t.Fatalf("load on the live metadata: %v", err)
	}
	if got := len(f.all()); got != 1 {
		t.Fatalf("load built a target on the live metadata store (%d built)", got)
	}
	if line, _ := r.tableLine(ctx, "c", true); line != newCanon {
		t.Errorf("inactive table %q, want %q", line, newCanon)
	}
	f.failNext(newCanon, 1)
	err := r.resume(ctx, "c")
	mustErr(t, err, ErrInvalid, "Failed to load metadata: injected")
	if old.closes.Load() != 1 {
		t.Error("old target not closed before the deferred build")
	}
	restored := f.last()
	if restored == old || restored.table.String() != oldCanon || !restored.running {
		t.Fatalf("old table not rebuilt and resumed: %+v", restored.table)
	}
	if line, _ := r.tableLine(ctx, "c", false); line != oldCanon {
		t.Errorf("live table %q after a failed resume, want %q", line, oldCanon)
	}
	if st := r.list()[0]; st.State != StateActive || st.InactiveTable != "" {
		t.Errorf("device after a failed resume: %+v", st)
	}
	if err := exp.WriteAt(ctx, make([]byte, 512), 0, true); err != nil {
		t.Errorf("I/O after the restore: %v", err)
	}

	// Now it works, and the state follows.
	if err := r.load(ctx, "c", newTable, "/x"); err != nil {
		t.Fatal(err)
	}
	if err := r.resume(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if line, _ := r.tableLine(ctx, "c", false); line != newCanon {
		t.Errorf("live table %q, want %q", line, newCanon)
	}
	rec, _ := os.ReadFile(r.state.path("c"))
	if !strings.Contains(string(rec), `"table": "`+newCanon+`"`) {
		t.Errorf("state not updated: %s", rec)
	}

	// Both fail: the device is failed, I/O gets EIO, and a good table
	// brings it back.
	other := "0 64 clone md dest src3 8"
	f.failNext("0 64 clone /x/md /x/dest /x/src3 8", 1)
	f.failNext(newCanon, 1)
	if err := r.load(ctx, "c", other, "/x"); err != nil {
		t.Fatal(err)
	}
	err = r.resume(ctx, "c")
	mustErr(t, err, ErrFailed, "")
	if !strings.Contains(err.Error(), "the old table could not be restored either") {
		t.Errorf("error %q", err)
	}
	if st := r.list()[0]; st.State != StateFailed || st.Error == "" || st.Table != newCanon {
		t.Errorf("device %+v, want failed with table %q", st, newCanon)
	}
	if line, err := r.tableLine(ctx, "c", false); err != nil || line != newCanon {
		t.Errorf("table of the failed device %q, %v; want %q", line, err, newCanon)
	}
	if err := exp.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, target.ErrIO) {
		t.Errorf("I/O on a failed device: %v", err)
	}
	if _, err := r.statusLine(ctx, "c"); !errors.Is(err, ErrFailed) {
		t.Errorf("status of a failed device: %v", err)
	}
	if err := r.resume(ctx, "c"); err != nil { // retries the recorded table
		t.Fatal(err)
	}
	if st := r.list()[0]; st.State != StateActive {
		t.Errorf("device %+v, want active", st)
	}
	if err := exp.ReadAt(ctx, make([]byte, 512), 0); err != nil {
		t.Errorf("I/O after recovery: %v", err)
	}
	for _, ft := range f.all() {
		if v := ft.violations(); len(v) > 0 {
			t.Errorf("I/O reached a suspended or closed target: %v", v)
		}
	}
}

// TestResumeEagerFailure: a table built at load whose Resume fails leaves
// the old one running.
func TestResumeEagerFailure(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	if err := r.create(ctx, "d", "0 8 fake old", ""); err != nil {
		t.Fatal(err)
	}
	old := f.last()
	if err := r.load(ctx, "d", "0 8 fake new", ""); err != nil {
		t.Fatal(err)
	}
	f.last().resumeErr = errors.New("boom")
	mustErr(t, r.resume(ctx, "d"), ErrInternal, "resume d with the new table: boom")
	if !old.running || old.closes.Load() != 0 {
		t.Error("old target not running after the new one failed")
	}
	if line, _ := r.tableLine(ctx, "d", false); line != "0 8 fake old" {
		t.Errorf("table %q", line)
	}
}

func TestLoadChecks(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	if err := r.create(ctx, "d", "0 8 fake", ""); err != nil {
		t.Fatal(err)
	}
	mustErr(t, r.load(ctx, "d", "0 16 fake", ""), ErrInvalid,
		"table length differs from the live table: NBD clients cannot see a size change (live 8 sectors, new 16)")
	mustErr(t, r.load(ctx, "d", "0 8 fake fail", ""), ErrInvalid, "Region size is not a power of 2")
	mustErr(t, r.load(ctx, "x", "0 8 fake", ""), ErrNotFound, "device x does not exist")
	// A second load replaces (and closes) the first.
	if err := r.load(ctx, "d", "0 8 fake one", ""); err != nil {
		t.Fatal(err)
	}
	first := f.last()
	if err := r.load(ctx, "d", "0 8 fake two", ""); err != nil {
		t.Fatal(err)
	}
	if first.closes.Load() != 1 {
		t.Error("replaced inactive table not closed")
	}
	// Reloading a clone on the same (not live) store closes the old
	// inactive one first.
	if err := r.load(ctx, "d", "0 8 clone md a", "/"); err != nil {
		t.Fatal(err)
	}
	if err := r.load(ctx, "d", "0 8 clone /md b", "/"); err != nil {
		t.Fatalf("reload on the same store: %v", err)
	}
	if line, _ := r.tableLine(ctx, "d", true); line != "0 8 clone /md /b" {
		t.Errorf("inactive %q, want %q", line, "0 8 clone /md /b")
	}
}

func TestRemove(t *testing.T) {
	ctx := t.Context()
	f := newFakeFactory()
	r := newTestRegistry(t, f.build)
	var disconnected atomic.Int32
	r.disconnect = func(name string) int { disconnected.Add(1); return 1 }
	if err := r.create(ctx, "d", "0 8 fake", ""); err != nil {
		t.Fatal(err)
	}
	ft := f.last()
	_, release, ok := r.Open("d")
	if !ok {
		t.Fatal("open")
	}
	mustErr(t, r.remove(ctx, "d", false), ErrBusy, "device d is busy: 1 NBD connection(s)")
	if _, ok := r.Lookup("d"); !ok {
		t.Fatal("refused remove unregistered the device")
	}
	release()
	release() // idempotent
	if got := r.list()[0].Connections; got != 0 {
		t.Fatalf("%d connections after release", got)
	}
	_, release, _ = r.Open("d")
	defer release()
	if err := r.remove(ctx, "d", true); err != nil {
		t.Fatal(err)
	}
	if disconnected.Load() != 1 {
		t.Error("forced remove did not disconnect")
	}
	if _, ok := r.Lookup("d"); ok {
		t.Error("removed device still exported")
	}
	if ft.closes.Load() != 1 || ft.suspends.Load() != 1 {
		t.Errorf("target suspended %d, closed %d times", ft.suspends.Load(), ft.closes.Load())
	}
	if _, err := os.Stat(r.state.path("d")); !os.IsNotExist(err) {
		t.Error("state file left")
	}
	mustErr(t, r.remove(ctx, "d", false), ErrNotFound, "device d does not exist")
	// The name is free again.
	if err := r.create(ctx, "d", "0 8 fake", ""); err != nil {
		t.Fatal(err)
	}
}

func TestRestore(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	tempImage(t, dir, "a.img", 1<<20, 'a')
	tempImage(t, dir, "b.img", 1<<20, 'b')
	state := t.TempDir()

	r := newRegistry(testLogger(t), stateDir{dir: state}, target.Build)
	if err := r.create(ctx, "a", "0 2048 linear a.img 0", dir); err != nil {
		t.Fatal(err)
	}
	if err := r.create(ctx, "b", "0 2048 linear b.img 0", dir); err != nil {
		t.Fatal(err)
	}
	if err := r.load(ctx, "b", "0 1024 linear a.img 1024", dir); err == nil {
		t.Fatal("load of another length accepted")
	}
	if err := r.load(ctx, "b", "0 2048 linear a.img 0", dir); err != nil {
		t.Fatal(err)
	}
	if err := r.resume(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	exp, _ := r.Lookup("a")
	if err := exp.WriteAt(ctx, []byte("hello"), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.shutdown(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	// Shutdown flushed nothing away: the state stays.
	os.Remove(filepath.Join(dir, "b.img"))
	os.WriteFile(filepath.Join(state, "broken.json"), []byte("{"), 0o600)
	os.WriteFile(filepath.Join(state, ".x.json.tmp-123"), []byte("{"), 0o600)

	r2 := newTestRegistry(t, nil)
	r2.state = stateDir{dir: state}
	if err := r2.restore(ctx); err != nil {
		t.Fatal(err)
	}
	devs := r2.list()
	if len(devs) != 3 {
		t.Fatalf("restored %+v", devs)
	}
	byName := map[string]Device{}
	for _, d := range devs {
		byName[d.Name] = d
	}
	aTable := "0 2048 linear " + filepath.Join(dir, "a.img") + " 0"
	if a := byName["a"]; a.State != StateActive || a.Table != aTable || a.Dir != dir {
		t.Errorf("a: %+v", a)
	}
	// b was swapped to a.img before the restart.
	if b := byName["b"]; b.State != StateActive || b.Table != aTable {
		t.Errorf("b: %+v", b)
	}
	if br := byName["broken"]; br.State != StateFailed || !strings.Contains(br.Error, "broken.json") {
		t.Errorf("broken: %+v", br)
	}
	if _, err := os.Stat(filepath.Join(state, ".x.json.tmp-123")); !os.IsNotExist(err) {
		t.Error("temp file left")
	}
	exp, _ = r2.Lookup("a")
	buf := make([]byte, 5)
	if err := exp.ReadAt(ctx, buf, 0); err != nil || string(buf) != "hello" {
		t.Errorf("read %q, %v", buf, err)
	}
	if _, ok := r2.Lookup("broken"); ok {
		t.Error("a failed device is exported")
	}
	mustErr(t, r2.resume(ctx, "broken"), ErrFailed, "")
	if err := r2.remove(ctx, "broken", false); err != nil {
		t.Fatal(err)
	}

	// A device whose files vanished is failed, reported, and not fatal.
	// Its state file is of the old kind, with a relative path: it is read
	// back resolved against the recorded directory.
	os.WriteFile(filepath.Join(state, "gone.json"),
		[]byte(`{"name":"gone","table":"0 2048 linear b.img 0","dir":"`+dir+`"}`), 0o600)
	r3 := newTestRegistry(t, nil)
	r3.state = stateDir{dir: state}
	if err := r2.shutdown(ctx, time.Second); err != nil { // releases its files
		t.Fatal(err)
	}
	if err := r3.restore(ctx); err != nil {
		t.Fatal(err)
	}
	var gone *Device
	for _, d := range r3.list() {
		if d.Name == "gone" {
			gone = &d
		}
	}
	bImg := filepath.Join(dir, "b.img")
	if gone == nil {
		t.Fatal("gone not restored")
	}
	if gone.State != StateFailed || !strings.HasPrefix(gone.Error, "Device lookup failed") ||
		!strings.Contains(gone.Error, bImg) || gone.Table != "0 2048 linear "+bImg+" 0" {
		t.Errorf("gone: %+v", *gone)
	}
}

func TestStateSaveAtomic(t *testing.T) {
	s := stateDir{dir: t.TempDir()}
	rec := stateRecord{Name: "x", Table: "0 8 fake", Dir: "/", Created: time.Unix(1, 0).UTC()}
	if err := s.save(rec); err != nil {
		t.Fatal(err)
	}
	rec.Table = "0 8 fake two"
	if err := s.save(rec); err != nil {
		t.Fatal(err)
	}
	ents, err := s.list()
	if err != nil || len(ents) != 1 || ents[0].err != nil || ents[0].rec != rec {
		t.Fatalf("%+v, %v", ents, err)
	}
	names, _ := os.ReadDir(s.dir)
	if len(names) != 1 {
		t.Errorf("files left: %v", names)
	}
	if err := s.remove("x"); err != nil {
		t.Fatal(err)
	}
	if err := s.remove("x"); err != nil {
		t.Fatalf("second remove: %v", err)
	}
}
