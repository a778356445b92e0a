package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// cloneFiles makes a 1 MiB source of random bytes and an empty destination
// in dir, and returns the source's content.
func cloneFiles(t *testing.T, dir string) []byte {
	t.Helper()
	src := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{7}).Read(src)
	if err := os.WriteFile(filepath.Join(dir, "src.img"), src, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "dest.img"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	return src
}

// waitUntil polls cond (it never fails on time: the test's own timeout
// stops a hang).
func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	for !cond() {
		time.Sleep(10 * time.Millisecond)
	}
}

// cloneGoroutines lists the goroutines of a clone target: its copier and
// sweeper (hydrate), anything of its metadata store and its periodic commit.
func cloneGoroutines() []string {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "nbdclone/hydrate.") ||
			strings.Contains(g, "nbdclone/metadata.") || strings.Contains(g, "target.(*clone)") {
			out = append(out, g)
		}
	}
	return out
}

// TestAutoLinear: a clone with the auto_linear feature becomes "linear
// <destination> 0" as soon as it is hydrated; wait returns then; the event
// hook runs for each event, "hydrated" and "linear" among them; the clone target is closed (no
// copier, sweeper, metadata store or committer left); the state directory
// holds the linear table.
func TestAutoLinear(t *testing.T) {
	dir := t.TempDir()
	src := cloneFiles(t, dir)
	events := filepath.Join(dir, "events")
	state := filepath.Join(t.TempDir(), "state")
	td := startDaemon(t, state, nil, func(c *Config) {
		c.OnEvent = `echo "$NBDCLONE_EVENT|$NBDCLONE_DEVICE|$NBDCLONE_NBD|$NBDCLONE_TABLE" >>` + events
	})
	c := dial(t, td.control)
	ctx := context.Background()
	if _, err := c.Create(ctx, "c", "0 2048 clone md dest.img src.img 8 1 auto_linear", dir); err != nil {
		t.Fatal(err)
	}
	info, err := c.Wait(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	linear := "0 2048 linear " + filepath.Join(dir, "dest.img") + " 0"
	if info.Type != "linear" || info.Clone != nil {
		t.Errorf("wait returned %+v, want the linear target's info", info)
	}
	if line, err := c.Table(ctx, "c", false); err != nil || line != linear {
		t.Errorf("table after auto_linear: %q, %v; want %q", line, err, linear)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "dest.img")); err != nil || !bytes.Equal(got, src) {
		t.Errorf("destination after hydration differs from the source (%v)", err)
	}
	if g := cloneGoroutines(); len(g) > 0 {
		t.Errorf("the clone target is not closed after the swap: %d of its goroutines left:\n%s", len(g), strings.Join(g, "\n\n"))
	}
	var rec stateRecord
	data, err := os.ReadFile(filepath.Join(state, "c.json"))
	if err == nil {
		err = json.Unmarshal(data, &rec)
	}
	if err != nil || rec.Table != linear {
		t.Errorf("state file after the swap: %+v, %v", rec, err)
	}
	cloneTable := "0 2048 clone " + filepath.Join(dir, "md") + " " + filepath.Join(dir, "dest.img") + " " + filepath.Join(dir, "src.img") + " 8 1 auto_linear"
	// The hook sees every event of the bus: the swap is a suspend, a
	// swap and a resume, then "linear" says why.
	want := []string{"created|c||" + cloneTable, "hydrated|c||" + cloneTable, "suspended|c||" + cloneTable,
		"swapped|c||" + linear, "resumed|c||" + linear, "linear|c||" + linear}
	waitUntil(t, func() bool {
		b, _ := os.ReadFile(events)
		return strings.Count(string(b), "\n") >= len(want)
	})
	if b, _ := os.ReadFile(events); string(b) != strings.Join(want, "\n")+"\n" {
		t.Errorf("events:\n%s\nwant:\n%s", b, strings.Join(want, "\n"))
	}
}

// TestAutoLinearAtStart: an auto_linear clone that completed while the
// daemon was down (here: its state file gained the feature) is swapped at
// start.
func TestAutoLinearAtStart(t *testing.T) {
	dir := t.TempDir()
	cloneFiles(t, dir)
	state := filepath.Join(t.TempDir(), "state")
	td := startDaemon(t, state, nil, nil)
	c := dial(t, td.control)
	ctx := context.Background()
	if _, err := c.Create(ctx, "c", "0 2048 clone md dest.img src.img 8", dir); err != nil {
		t.Fatal(err)
	}
	if info, err := c.Wait(ctx, "c"); err != nil || info.Clone == nil || !info.Clone.Hydrated {
		t.Fatalf("wait: %+v, %v", info, err)
	}
	td.stop(t)

	p := filepath.Join(state, "c.json")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var rec stateRecord
	if err := json.Unmarshal(data, &rec); err != nil {
		t.Fatal(err)
	}
	rec.Table += " 1 auto_linear"
	data, _ = json.Marshal(rec)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	td2 := startDaemon(t, state, nil, nil)
	c2 := dial(t, td2.control)
	info, err := c2.Wait(ctx, "c")
	if err != nil || info.Type != "linear" {
		t.Fatalf("wait after a restart: %+v, %v; want linear", info, err)
	}
	if line, err := c2.Status(ctx, "c"); err != nil || line != "0 2048 linear" {
		t.Errorf("status: %q, %v", line, err)
	}
}

// TestLoadLinearOverUnhydratedClone: loading a linear table over a clone
// that is not fully hydrated is refused, unless forced.
func TestLoadLinearOverUnhydratedClone(t *testing.T) {
	dir := t.TempDir()
	cloneFiles(t, dir)
	td := startDaemon(t, filepath.Join(t.TempDir(), "state"), nil, nil)
	c := dial(t, td.control)
	ctx := context.Background()
	if _, err := c.Create(ctx, "c", "0 2048 clone md dest.img src.img 8 1 no_hydration", dir); err != nil {
		t.Fatal(err)
	}
	err := c.Load(ctx, "c", "0 2048 linear dest.img 0", dir)
	const want = "device c is not fully hydrated (0/256 regions): a linear table would expose the unhydrated regions of the destination; wait for hydration (nbdclone wait c) or load with --force"
	if !errors.Is(err, ErrInvalid) || err.Error() != want {
		t.Fatalf("load linear over an unhydrated clone: %v; want %q", err, want)
	}
	if line, _ := c.Table(ctx, "c", true); line != "" {
		t.Errorf("a refused load left an inactive table: %q", line)
	}
	// Another clone table is fine, and so is linear with force.
	if err := c.Load(ctx, "c", "0 2048 clone md dest.img src.img 8 1 no_discard_passdown", dir); err != nil {
		t.Errorf("load of a clone table: %v", err)
	}
	if err := c.LoadForce(ctx, "c", "0 2048 linear dest.img 0", dir, true); err != nil {
		t.Fatalf("load --force: %v", err)
	}
	if err := c.Resume(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if line, err := c.Status(ctx, "c"); err != nil || line != "0 2048 linear" {
		t.Errorf("status after a forced swap: %q, %v", line, err)
	}
}
