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

// TestShutdownUnderLoad: SIGTERM while clients write and hydration runs:
// the daemon drains, commits and exits 0 (the harness checks), the
// clients are disconnected, and on restart the clone comes back with at
// least the regions it had hydrated before and every flushed write.
func TestShutdownUnderLoad(t *testing.T) {
	testutil.NeedTool(t, "fio")
	testutil.NeedTool(t, "qemu-io")
	d := harness.Serve(t)
	const size = 64 << 20
	makeSource(t, d.Dir, 60, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "clone", "--table", "0 131072 clone ./md ./dest.img ./src.img 8 0 4 hydration_threshold 4 hydration_batch_size 4")
	qemuIO(t, d.URI("clone"), "write -P 0x77 40M 1M", "flush")

	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	var fios []*exec.Cmd
	var outs []*bytes.Buffer
	for i := range 2 {
		f := exec.CommandContext(ctx, "fio", "--name=load", "--thread", "--verify_state_save=0", "--ioengine=nbd", "--uri="+d.URI("clone"),
			"--rw=randrw", "--bsrange=512-64k", "--iodepth=16", fmt.Sprintf("--offset=%d", i*16<<20), "--size=16M",
			"--time_based", "--runtime=100")
		var out bytes.Buffer
		f.Stdout, f.Stderr = &out, &out
		startProc(t, f)
		fios, outs = append(fios, f), append(outs, &out)
	}
	waitFor(t, toolTimeout, "both fio jobs to connect", func() bool { return connections(t, d, "clone") >= 2 })
	waitFor(t, toolTimeout, "fio's writes", func() bool {
		ci := cloneInfo(t, d, "clone")
		return ci.Stats.HydratedWriteBytes+ci.Stats.HydratedOverwriteBytes > 0
	})
	before := cloneInfo(t, d, "clone").HydratedRegions
	d.Stop()
	for i, f := range fios {
		if err := f.Wait(); err == nil {
			t.Errorf("fio %d ran on after the daemon stopped: %s", i, outs[i].String())
		}
	}
	d.Start()
	st := status(t, d, "clone")
	if st.Hydrated < before {
		t.Errorf("after a clean stop under load: %d hydrated, fewer than the %d before it", st.Hydrated, before)
	}
	qemuIO(t, d.URI("clone"), "read -P 0x77 40M 1M")
	cli(t, d, "wait", "clone")
}
