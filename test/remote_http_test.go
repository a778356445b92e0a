package e2e

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
)

// TestRemoteHTTPSource: a source served over HTTP with Range support (Go's
// http.FileServer on 127.0.0.1) clones identically; the object is pinned:
// changing it under a half-hydrated clone makes create refuse, and a live
// clone fails reads of it with EIO rather than mixing two versions.
func TestRemoteHTTPSource(t *testing.T) {
	d := harness.Serve(t)
	const size = 32<<20 + 512
	objDir := t.TempDir()
	obj := filepath.Join(objDir, "disk.img")
	src := randomBytes(47, size)
	writeFile(t, obj, src)
	mod := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := os.Chtimes(obj, mod, mod); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(objDir)))
	defer srv.Close()
	url := srv.URL + "/disk.img"

	t.Run("clones identically", func(t *testing.T) {
		uri := createClone(t, d, "c", size, url, "1 no_hydration")
		compareImage(t, uri, obj) // every byte from the HTTP source
		info := cloneInfo(t, d, "c")
		if !strings.HasPrefix(info.SourceID, "last-modified:Fri, 02 Jan 2026 03:04:05 GMT;size:") || info.Remote == nil {
			t.Fatalf("source id %q, remote %+v", info.SourceID, info.Remote)
		}
		cli(t, d, "message", "c", "0", "enable_hydration")
		cli(t, d, "wait", "c")
		if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "c.dst")), src); diff != "" {
			t.Fatalf("hydrated destination differs from the object: %s", diff)
		}
		compareImage(t, uri, obj)
		cli(t, d, "remove", "c")
	})

	t.Run("a changed object is refused", func(t *testing.T) {
		uri := createClone(t, d, "p", size, url, "1 no_hydration")
		// Half hydrated: CACHE the first half.
		if out, err := nbdsh(t, uri, fmt.Sprintf("h.cache(%d, 0); print('cached')", size/2)); err != nil || !strings.Contains(out, "cached") {
			t.Fatalf("cache: %v\n%s", err, out)
		}
		if info := cloneInfo(t, d, "p"); info.HydratedRegions < (size/2)/4096 || info.Hydrated {
			t.Fatalf("%d regions hydrated, want half", info.HydratedRegions)
		}
		// The object changes under the live clone: reads of what is not
		// hydrated fail, nothing of the new version is served.
		changed := append([]byte(nil), src...)
		copy(changed[size-(4<<20):], randomBytes(48, 1<<20))
		writeFile(t, obj, changed)
		newMod := mod.Add(time.Hour)
		os.Chtimes(obj, newMod, newMod)
		out, err := runErr("qemu-io", "-f", "raw", "-c", fmt.Sprintf("read %d 4096", size-(4<<20)), uri)
		if !strings.Contains(out, "Input/output error") {
			t.Fatalf("a read of the changed object: %v\n%s", err, out)
		}
		// Hydrated regions are still served.
		qemuIO(t, uri, fmt.Sprintf("read -P 0x%02x 0 1", src[0]))
		cli(t, d, "remove", "p")
		line := cloneLine("p", size, url, "1 no_hydration")
		r := d.CLI("", "create", "p", "--table", line)
		if r.Code != 1 || !strings.Contains(r.Stderr, "Failed to load metadata") || !strings.Contains(r.Stderr, "the source is not the one this clone was made from") {
			t.Fatalf("create over a changed object: exit %d, stderr %q", r.Code, r.Stderr)
		}
		t.Logf("create over a changed object: %s", r.Stderr)
		// The original object back: the clone carries on.
		writeFile(t, obj, src)
		os.Chtimes(obj, mod, mod)
		cli(t, d, "create", "p", "--table", line)
		cli(t, d, "message", "p", "0", "enable_hydration")
		cli(t, d, "wait", "p")
		if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "p.dst")), src); diff != "" {
			t.Fatalf("destination differs from the object: %s", diff)
		}
	})
}
