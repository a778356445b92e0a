package e2e

import (
	"bytes"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// TestBlockDevices: dm-clone's own setting, block devices on both sides: a
// read-only loop device as the source and a loop device as the
// destination, both with 4 KiB logical blocks. Reads match the source,
// writes read back, discards are passed down to the destination device,
// and after hydration the destination's backing file is the source
// overlaid with the writes.
func TestBlockDevices(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedTool(t, "losetup")
	testutil.NeedTool(t, "nbdcopy")
	testutil.NeedTool(t, "qemu-io")
	d := harness.Serve(t)
	m := mounts{t}
	const (
		size = 32 << 20
		M    = 1 << 20
	)
	expected := makeSource(t, d.Dir, 40, size)
	src := bytes.Clone(expected)
	srcPath := filepath.Join(d.Dir, "src.img")
	destPath := filepath.Join(d.Dir, "dest.img")
	harness.MakeImage(t, destPath, size)
	srcLoop, unSrc := m.loop(srcPath, "-r", "--sector-size", "4096")
	destLoop, unDest := m.loop(destPath, "--sector-size", "4096")

	cli(t, d, "create", "blk", "--table", fmt.Sprintf("0 %d clone ./md %s %s 8 1 no_hydration", size/sector, destLoop, srcLoop))
	uri := d.URI("blk")
	out := filepath.Join(d.Dir, "out.img")
	run(t, "nbdcopy", uri, out)
	if diff := firstDiff(readFile(t, out), src); diff != "" {
		t.Fatalf("the unhydrated clone of a block device: %s", diff)
	}

	writeAndCheck(t, uri, expected,
		imageWrite{off: 4096, n: 4096, fill: 0x11},    // a whole region
		imageWrite{off: 8192 + 7, n: 100, fill: 0x22}, // inside a region, unaligned
		imageWrite{off: 2 * M, n: 64 << 10, zero: true},
		imageWrite{off: 3*M - 1000, n: 3000, zero: true},
	)
	qemuIO(t, uri, fmt.Sprintf("discard %d %d", 4*M, M), "flush")
	ci := cloneInfo(t, d, "blk")
	if !ci.DiscardPassdown || ci.Stats.HydratedDiscardBytes != M {
		t.Errorf("discard on a loop device: passdown %v, %d bytes skipped; want true, %d", ci.DiscardPassdown, ci.Stats.HydratedDiscardBytes, M)
	}
	if st := status(t, d, "blk"); len(st.Features) != 1 || st.Features[0] != "no_hydration" {
		t.Errorf("status: %+v (passdown must stay on: a loop device can discard)", st)
	}

	cli(t, d, "message", "blk", "0", "hydration_threshold", "64")
	cli(t, d, "message", "blk", "0", "hydration_batch_size", "64")
	cli(t, d, "message", "blk", "0", "enable_hydration")
	cli(t, d, "wait", "blk")
	run(t, "nbdcopy", uri, out)
	got := readFile(t, out)
	if diff := firstDiff(got, withUnspecified(got, expected, 4*M, M)); diff != "" {
		t.Errorf("the hydrated clone: %s", diff)
	}
	cli(t, d, "remove", "blk")
	unDest()
	unSrc()
	dest := readFile(t, destPath)
	if diff := firstDiff(dest, withUnspecified(dest, expected, 4*M, M)); diff != "" {
		t.Errorf("the destination device's backing file: %s", diff)
	}
	if !bytes.Equal(readFile(t, srcPath), src) {
		t.Error("the source changed")
	}
}
