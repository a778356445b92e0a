package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// TestRandomWritesDuringHydration: fio's random writes of random sizes
// (512 B to 192 KiB, so inside regions, across them and covering whole
// ones), 32 in flight on each of two connections, into an unhydrated clone
// while background hydration starts under them; fio then reads every block
// back and checks its checksum. Partial writes, whole-region overwrites
// and background copies of the same regions must never lose a write. Once
// hydrated, the destination file itself passes fio's verification, and
// the source is untouched.
func TestRandomWritesDuringHydration(t *testing.T) {
	testutil.NeedTool(t, "fio")
	d := harness.Serve(t)
	const (
		size = 64 << 20
		half = size / 2
	)
	makeSource(t, d.Dir, 30, size)
	srcPath := filepath.Join(d.Dir, "src.img")
	destPath := filepath.Join(d.Dir, "dest.img")
	srcSum := sha256File(t, srcPath)
	harness.MakeImage(t, destPath, size)
	cli(t, d, "create", "clone", "--table", "0 131072 clone ./md ./dest.img ./src.img 128 1 no_hydration")

	// Two jobs, one connection each, on the two halves of the device.
	job := []string{"--rw=randwrite", "--bsrange=512-192k", fmt.Sprintf("--size=%d", half),
		"--numjobs=2", fmt.Sprintf("--offset_increment=%d", half), "--verify=crc32c"}
	jsonPath := filepath.Join(d.Dir, "fio.json")
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	f := exec.CommandContext(ctx, "fio", append([]string{"--name=rw", "--thread", "--verify_state_save=0", "--ioengine=nbd", "--uri=" + d.URI("clone"),
		"--iodepth=32", "--do_verify=1", "--output-format=json", "--output=" + jsonPath}, job...)...)
	var fOut bytes.Buffer
	f.Stdout, f.Stderr = &fOut, &fOut
	startProc(t, f)

	// Start background hydration once fio's writes are landing, so copies
	// run among them.
	waitFor(t, toolTimeout, "fio's first writes", func() bool {
		ci := cloneInfo(t, d, "clone")
		return ci.Stats.HydratedWriteBytes+ci.Stats.HydratedOverwriteBytes > 0
	})
	cli(t, d, "message", "clone", "0", "hydration_threshold", "8")
	cli(t, d, "message", "clone", "0", "hydration_batch_size", "4")
	cli(t, d, "message", "clone", "0", "enable_hydration")
	if err := f.Wait(); err != nil {
		t.Fatalf("fio: %v\n%s", err, fOut.String())
	}
	res := readFioJSON(t, jsonPath)
	if len(res.Jobs) != 2 {
		t.Fatalf("fio ran %d jobs, want 2", len(res.Jobs))
	}
	for _, j := range res.Jobs {
		if j.Error != 0 || j.Write.IOBytes != half || j.Read.IOBytes != half {
			t.Errorf("fio job %s: error %d, wrote %d, verified %d; want 0, %d, %d", j.Name, j.Error, j.Write.IOBytes, j.Read.IOBytes, half, half)
		}
	}

	cli(t, d, "wait", "clone")
	ci := cloneInfo(t, d, "clone")
	s := ci.Stats
	t.Logf("stats: %+v", s)
	if s.HydratedWriteBytes == 0 || s.HydratedOverwriteBytes == 0 {
		t.Errorf("fio's writes neither copied nor overwrote regions: %+v", s)
	}
	if sum := s.HydratedBackgroundBytes + s.HydratedWriteBytes + s.HydratedOverwriteBytes + s.HydratedDiscardBytes +
		s.HydratedZeroBytes + s.HydratedCacheBytes; sum != size {
		t.Errorf("hydrated bytes by cause add up to %d, want the device size %d: a region was hydrated twice or not at all", sum, size)
	}
	if copied := s.HydratedBackgroundBytes + s.HydratedWriteBytes + s.HydratedCacheBytes; s.SourceCopyBytes != copied {
		t.Errorf("source_copy_bytes %d, but copies hydrated %d bytes", s.SourceCopyBytes, copied)
	}

	// Every write reached the destination file, and no copy overwrote one.
	run(t, "fio", append([]string{"--name=rw", "--verify_state_save=0", "--ioengine=psync", "--filename=" + destPath, "--verify_only",
		"--output-format=json", "--output=" + filepath.Join(d.Dir, "verify.json")}, job...)...)
	for _, j := range readFioJSON(t, filepath.Join(d.Dir, "verify.json")).Jobs {
		if j.Error != 0 || j.Read.IOBytes != half {
			t.Errorf("fio verify of the destination, job %s: error %d, verified %d bytes; want 0, %d", j.Name, j.Error, j.Read.IOBytes, half)
		}
	}
	if got := sha256File(t, srcPath); got != srcSum {
		t.Error("the source changed")
	}
}
