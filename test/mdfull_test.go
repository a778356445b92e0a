package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// fillFilesystem writes a file in dir until the filesystem is full.
func fillFilesystem(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, chunk := range []int{1 << 20, 4096, 512} {
		buf := make([]byte, chunk)
		for {
			if _, err := f.Write(buf); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					t.Fatalf("filling %s: %v", dir, err)
				}
				break
			}
		}
	}
}

// TestMetadataFilesystemFull: when the filesystem holding a clone's
// metadata fills up, a commit that rewrites chunks already stored still
// succeeds (their slots are overwritten in place), a commit that needs a
// new chunk fails and the device degrades (DESIGN.md invariant 7: a
// failed commit puts it in ro mode, where reads keep working), but the
// daemon keeps running and its other devices keep serving; removing the
// device and stopping the daemon still work.
//
// The metadata sits on a small tmpfs here; the store writes with pwrite,
// so ext4 behaves the same way (ENOSPC from the write).
func TestMetadataFilesystemFull(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedTool(t, "mount")
	testutil.NeedTool(t, "umount")
	testutil.NeedTool(t, "qemu-io")
	d := harness.Serve(t)
	m := mounts{t}
	// 1 GiB of 4 KiB regions: a bitmap chunk (32768 regions) covers
	// 128 MiB, so the device has 8 chunks. Data in the first 64 MiB.
	const size, chunkSpan = 1 << 30, 128 << 20
	src := makeSource(t, d.Dir, 50, 64<<20)
	if err := os.Truncate(filepath.Join(d.Dir, "src.img"), size); err != nil {
		t.Fatal(err)
	}
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	harness.MakeImage(t, filepath.Join(d.Dir, "other.img"), 8<<20)
	cli(t, d, "create", "other", "--table", "0 16384 linear ./other.img 0")
	qemuIO(t, d.URI("other"), "write -P 0x5e 0 1M")

	mdfs := filepath.Join(d.Dir, "mdfs")
	if err := os.Mkdir(mdfs, 0o755); err != nil {
		t.Fatal(err)
	}
	m.mount("tmpfs", mdfs, "-t", "tmpfs", "-o", "size=48m")
	table := "0 2097152 clone ./mdfs/md ./dest.img ./src.img 8 1 no_hydration"
	cli(t, d, "create", "clone", "--table", table)
	qemuIO(t, d.URI("clone"), "write -P 0x11 0 4k", "flush")
	fillFilesystem(t, mdfs)

	// Chunk 0 is stored: committing more of its bits needs no space.
	qemuIO(t, d.URI("clone"), "write -P 0x12 64k 4k", "flush")
	if line := cli(t, d, "status", "clone"); !strings.HasSuffix(line, " rw\n") {
		t.Fatalf("a commit rewriting a stored chunk on a full filesystem: %q, want rw", line)
	}

	// Each flush commits a region in a chunk not stored yet: no space for
	// it. The rounds fail (EIO), the daemon must not.
	failed := 0
	for i := 1; i < size/chunkSpan; i++ {
		off := int64(i)*chunkSpan + 4096
		out, err := runErr("qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x22 %d 4k", off), "-c", "flush", d.URI("clone"))
		if err != nil || strings.Contains(out, "failed") {
			failed++
		}
		if r := d.CLI("", "ls"); r.Code != 0 {
			t.Fatalf("after %d commits on a full metadata filesystem, the daemon is gone: %+v\nqemu-io: %s", i, r, out)
		}
	}
	t.Logf("%d of %d write+flush rounds failed on the full metadata filesystem", failed, size/chunkSpan-1)
	line := cli(t, d, "status", "clone")
	t.Logf("status: %s", line)
	// A refused commit is a failed commit: dm-clone's ro mode, where
	// reads keep working and the committed writes are still there.
	if !strings.HasSuffix(line, " ro\n") || failed != size/chunkSpan-1 {
		t.Errorf("status %q after %d failed rounds: want ro, every round failing", line, failed)
	}
	qemuIO(t, d.URI("clone"), fmt.Sprintf("read -P 0x%02x %d 1", src[60<<20], 60<<20))
	qemuIO(t, d.URI("clone"), "read -P 0x11 0 4k", "read -P 0x12 64k 4k")
	qemuIO(t, d.URI("other"), "read -P 0x5e 0 1M")

	// Only reloading the table returns to rw, once there is space again.
	if err := os.Remove(filepath.Join(mdfs, "filler")); err != nil {
		t.Fatal(err)
	}
	cli(t, d, "suspend", "clone")
	cli(t, d, "load", "clone", "--table", table)
	cli(t, d, "resume", "clone")
	if line := cli(t, d, "status", "clone"); !strings.HasSuffix(line, " rw\n") {
		t.Errorf("after freeing space and reloading: %q, want rw", line)
	}
	qemuIO(t, d.URI("clone"), "write -P 0x33 1M 4k", "flush", "read -P 0x33 1M 4k", "read -P 0x11 0 4k")
	fillFilesystem(t, mdfs)

	r := d.CLI("", "remove", "clone")
	t.Logf("remove on a full metadata filesystem: %+v", r)
	if r2 := d.CLI("", "ls"); r2.Code != 0 {
		t.Fatalf("removing a clone whose metadata filesystem is full killed the daemon: remove %+v, ls %+v", r, r2)
	}
	qemuIO(t, d.URI("other"), "read -P 0x5e 0 1M")
}
