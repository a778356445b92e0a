package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// TestProtoFioVerify30s: fio's nbd engine, 4 KiB random mixed reads and
// writes at iodepth 64 on 4 connections (one per job, each on its own
// 16 MiB of the device) for 30 s, verifying every block it wrote with
// crc32c as it goes (verify_backlog) and at the end, on a clone that
// hydrates in the background meanwhile. fio finds no error.
func TestProtoFioVerify30s(t *testing.T) {
	testutil.NeedTool(t, "fio")
	d := harness.Serve(t)
	const size = 64 << 20
	makeSource(t, d.Dir, 50, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	// Slow background hydration (a batch of 4 regions at a time) so that
	// it runs through most of the test.
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 8 0 4 hydration_threshold 1 hydration_batch_size 4", size/sector))
	out := filepath.Join(d.Dir, "fio.json")
	run(t, "fio",
		"--name=verify", "--verify_state_save=0", "--ioengine=nbd", "--uri="+d.URI("c"),
		"--rw=randrw", "--bs=4k", "--iodepth=64", "--numjobs=4",
		"--size=16m", "--offset_increment=16m",
		"--runtime=30", "--time_based",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=4096",
		"--randseed=7", "--output-format=json", "--output="+out)
	res := readFioJSON(t, out)
	if len(res.Jobs) != 4 {
		t.Fatalf("%d fio jobs, want 4", len(res.Jobs))
	}
	for _, j := range res.Jobs {
		if j.Error != 0 || j.Read.IOBytes == 0 || j.Write.IOBytes == 0 {
			t.Errorf("fio job %s: error %d, read %d bytes, wrote %d bytes", j.Name, j.Error, j.Read.IOBytes, j.Write.IOBytes)
		}
	}
	if n := strings.Count(d.Log(), "transmission started"); n < 4 {
		t.Errorf("%d NBD connections, want one per fio job", n)
	}
	if info := cloneInfo(t, d, "c"); info.HydratedRegions == 0 {
		t.Errorf("nothing hydrated")
	}
	// The writes landed, with fio's verify headers: what fio verified was
	// its own data.
	if n := fioBlocks(t, filepath.Join(d.Dir, "dest.img"), size, 4096); n < 1000 {
		t.Errorf("only %d blocks of the destination hold fio's verify header", n)
	}
}
