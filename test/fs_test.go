package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// checkFiles checks that every file under root named in sums has that
// sha256.
func checkFiles(t *testing.T, root string, sums map[string]string, where string) {
	t.Helper()
	for name, want := range sums {
		if got := sha256File(t, filepath.Join(root, name)); got != want {
			t.Errorf("%s: %s has sha256 %s, want %s", where, name, got, want)
		}
	}
}

var trimmedRE = regexp.MustCompile(`\((\d+) bytes\) trimmed`)

// TestFilesystemFlow is dm-clone's documented use on a real filesystem,
// through the kernel: an ext4 source is cloned without hydration (4 KiB
// regions, 8 sectors, as in dm-clone's documentation), attached through
// nbdfuse and a loop device, mounted, checked, written and fstrim'd; the
// discards mark the free space hydrated without copying it. Then hydration
// runs to the end, and the destination alone is a clean ext4 holding every
// file. Free space is never read from the source.
func TestFilesystemFlow(t *testing.T) {
	testutil.NeedRoot(t)
	for _, tool := range []string{"mkfs.ext4", "e2fsck", "losetup", "fstrim", "mount", "umount", "nbdfuse"} {
		testutil.NeedTool(t, tool)
	}
	d := harness.Serve(t)
	m := mounts{t}
	const (
		size   = 256 << 20
		region = 4096
	)

	// A source filesystem with a few files of random content.
	files := map[string][]byte{
		"a.bin":        randomBytes(20, 3<<20),
		"b.bin":        randomBytes(21, 5<<20+123),
		"sub/c.bin":    randomBytes(22, 1<<20),
		"sub/tiny.txt": []byte("hello\n"),
	}
	sums := map[string]string{}
	filesDir := filepath.Join(d.Dir, "files")
	for name, data := range files {
		p := filepath.Join(filesDir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, p, data)
		sum := sha256.Sum256(data)
		sums[name] = hex.EncodeToString(sum[:])
	}
	srcPath := filepath.Join(d.Dir, "src.img")
	destPath := filepath.Join(d.Dir, "dest.img")
	run(t, "mkfs.ext4", "-q", "-F", "-d", filesDir, srcPath, "256M")
	srcSum := sha256File(t, srcPath)
	harness.MakeImage(t, destPath, size)
	cli(t, d, "create", "fs", "--table", "0 524288 clone ./md ./dest.img ./src.img 8 1 no_hydration")

	// Mount points live in d.Dir, whose removal is registered before
	// these cleanups and so runs after them.
	fuseDir, mnt, destMnt := filepath.Join(d.Dir, "fuse"), filepath.Join(d.Dir, "mnt"), filepath.Join(d.Dir, "destmnt")
	for _, dir := range []string{fuseDir, mnt, destMnt} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	disk, unfuse := m.nbdfuse(fuseDir, d.URI("fs"), size)
	loop, unloop := m.loop(disk)
	unmount := m.mount(loop, mnt)
	checkFiles(t, mnt, sums, "the clone, unhydrated")

	// A new file written through the clone.
	newData := randomBytes(23, 2<<20+77)
	writeFile(t, filepath.Join(mnt, "new.bin"), newData)
	newSum := sha256.Sum256(newData)
	sums["new.bin"] = hex.EncodeToString(newSum[:])
	// fsync: down through ext4, the loop device and nbdfuse to the clone.
	f, err := os.OpenFile(filepath.Join(mnt, "new.bin"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Sync()
	f.Close()
	if err != nil {
		t.Fatalf("fsync through the clone: %v", err)
	}

	var fsStat syscall.Statfs_t
	if err := syscall.Statfs(mnt, &fsStat); err != nil {
		t.Fatal(err)
	}
	free := int64(fsStat.Bfree) * fsStat.Bsize
	used := size - free // the filesystem's data and metadata, and its overhead
	before := status(t, d, "fs")
	beforeInfo := cloneInfo(t, d, "fs")

	out := run(t, "fstrim", "-v", mnt)
	mt := trimmedRE.FindStringSubmatch(out)
	if mt == nil {
		t.Fatalf("fstrim -v printed %q", out)
	}
	trimmed, _ := strconv.ParseInt(mt[1], 10, 64)
	after := status(t, d, "fs")
	afterInfo := cloneInfo(t, d, "fs")
	skipped := int64(after.Hydrated-before.Hydrated) * region
	t.Logf("free %d MiB, used %d MiB, fstrim trimmed %d MiB; hydrated %d -> %d regions of %d",
		free>>20, used>>20, trimmed>>20, before.Hydrated, after.Hydrated, after.Regions)
	if skipped < free*8/10 {
		t.Errorf("fstrim marked %d bytes of regions hydrated; want at least 80%% of the %d free bytes", skipped, free)
	}
	if discarded := afterInfo.Stats.HydratedDiscardBytes - beforeInfo.Stats.HydratedDiscardBytes; discarded < free*8/10 {
		t.Errorf("hydrated_discard_bytes grew by %d; want at least 80%% of the %d free bytes", discarded, free)
	}
	if copied := afterInfo.Stats.SourceCopyBytes - beforeInfo.Stats.SourceCopyBytes; copied != 0 {
		t.Errorf("fstrim made the clone copy %d bytes from the source", copied)
	}
	if afterInfo.Stats.SourceCopyBytes > used {
		t.Errorf("before hydration, %d bytes copied from the source, more than the %d used", afterInfo.Stats.SourceCopyBytes, used)
	}

	// Hydrate the rest, faster than dm's defaults.
	cli(t, d, "message", "fs", "0", "hydration_threshold", "64")
	cli(t, d, "message", "fs", "0", "hydration_batch_size", "64")
	cli(t, d, "message", "fs", "0", "enable_hydration")
	cli(t, d, "wait", "fs")
	final := status(t, d, "fs")
	if final.Hydrated != final.Regions || final.Regions != size/region {
		t.Errorf("after wait: %d/%d hydrated", final.Hydrated, final.Regions)
	}
	ci := cloneInfo(t, d, "fs")
	s := ci.Stats
	t.Logf("stats after hydration: %+v", s)
	// Every region was hydrated once, by one cause, and the source was read
	// only for the copies.
	if sum := s.HydratedBackgroundBytes + s.HydratedWriteBytes + s.HydratedOverwriteBytes + s.HydratedDiscardBytes +
		s.HydratedZeroBytes + s.HydratedCacheBytes + s.HydratedHintBytes + s.HydratedCommandBytes; sum != size {
		t.Errorf("hydrated bytes by cause add up to %d, want the device size %d", sum, size)
	}
	// A copy reads the source's data and zeroes its holes (SEEK_HOLE).
	if copied := s.HydratedBackgroundBytes + s.HydratedWriteBytes + s.HydratedCacheBytes + s.HydratedHintBytes +
		s.HydratedCommandBytes; s.SourceCopyBytes+s.SourceHoleBytes != copied {
		t.Errorf("source_copy_bytes %d + source_hole_bytes %d, but copies hydrated %d bytes", s.SourceCopyBytes, s.SourceHoleBytes, copied)
	}
	if s.SourceCopyBytes+s.HydratedDiscardBytes > size {
		t.Errorf("copied %d + skipped by discard %d > device size %d", s.SourceCopyBytes, s.HydratedDiscardBytes, size)
	}
	// The free space fstrim found was never copied: copies stay within the
	// used space, give or take the regions only partly free (1 KiB blocks
	// in 4 KiB regions at the edges of free extents).
	if margin := int64(16 << 20); s.SourceCopyBytes > used+margin {
		t.Errorf("copied %d bytes from the source; the filesystem used only %d (+%d margin)", s.SourceCopyBytes, used, margin)
	}

	// Remount the clone: the files read back from the hydrated clone (maybe
	// from page caches below ext4; the destination check below has none).
	unmount()
	unmount = m.mount(loop, mnt)
	checkFiles(t, mnt, sums, "the clone, hydrated and remounted")
	unmount()
	unloop()
	unfuse()
	waitFor(t, time.Minute, "the NBD connection to close", func() bool { return connections(t, d, "fs") == 0 })
	cli(t, d, "remove", "fs")

	// The destination alone: a clean filesystem with every file.
	run(t, "e2fsck", "-fn", destPath)
	destLoop, undestLoop := m.loop(destPath, "-r")
	undestMount := m.mount(destLoop, destMnt, "-o", "ro")
	checkFiles(t, destMnt, sums, "the destination")
	undestMount()
	undestLoop()
	if got := sha256File(t, srcPath); got != srcSum {
		t.Error("the source image changed")
	}
}
