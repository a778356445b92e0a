package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// swap replaces the live table of a device, dmsetup style, and checks the
// inactive table on the way; shown is how `nbdclone table` prints table.
func swap(t *testing.T, d *harness.Daemon, name, table, shown string) {
	t.Helper()
	cli(t, d, "suspend", name, "--timeout", "2m")
	cli(t, d, "load", name, "--table", table)
	if got := cli(t, d, "table", "--inactive", name); got != shown+"\n" {
		t.Errorf("table --inactive: %q, want %q", got, shown)
	}
	cli(t, d, "resume", name)
	if got := cli(t, d, "table", name); got != shown+"\n" {
		t.Errorf("table after resume: %q, want %q", got, shown)
	}
}

// checkLinear checks that the live table is linear.
func checkLinear(t *testing.T, d *harness.Daemon, name string) {
	t.Helper()
	if got := cli(t, d, "status", name); got != "0 131072 linear\n" {
		t.Errorf("status after the swap: %q", got)
	}
}

// TestLiveSwapUnderReader: a hydrated clone is swapped for a linear mapping
// of its destination (suspend, load, resume) while NBD clients read and
// write it; they see no error and no disconnect, reads return the same
// data before, during and after, and writes land. Then back to a clone on
// the same (hydrated) metadata under a writer, and to linear again under
// fio's verified random writes.
func TestLiveSwapUnderReader(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "fio")
	d := harness.Serve(t)
	const (
		size = 64 << 20
		R    = 64 << 10
		M    = 1 << 20
	)
	expected := makeSource(t, d.Dir, 10, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cloneTable := "0 131072 clone ./md ./dest.img ./src.img 128 1 no_hydration"
	linearTable := "0 131072 linear ./dest.img 0"
	// Tables show their paths resolved against the CLI's directory.
	cloneShown := "0 131072 clone " + inDir(d.Dir, "md", "dest.img", "src.img") + " 128 1 no_hydration"
	linearShown := "0 131072 linear " + filepath.Join(d.Dir, "dest.img") + " 0"
	cli(t, d, "create", "dev", "--table", cloneTable)
	uri := d.URI("dev")
	writeAndCheck(t, uri, expected,
		imageWrite{off: 0, n: R, fill: 0x61},
		imageWrite{off: 7*M + 5, n: 3 * R, fill: 0x62},
		imageWrite{off: 33 * M, n: 4 * R, zero: true},
	)
	cli(t, d, "message", "dev", "0", "hydration_threshold", "32")
	cli(t, d, "message", "dev", "0", "hydration_batch_size", "16")
	cli(t, d, "message", "dev", "0", "enable_hydration")
	cli(t, d, "wait", "dev")
	expPath := filepath.Join(d.Dir, "expected.img")
	writeFile(t, expPath, expected)

	t.Run("Readers", func(t *testing.T) {
		// One connection that spans the swap for sure: nbdcopy into a pipe
		// the test stops reading half way, until the swap is done.
		piped := exec.Command("nbdcopy", "--connections=1", "--requests=4", uri, "-")
		pipe, err := piped.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var pipedErr bytes.Buffer
		piped.Stderr = &pipedErr
		startProc(t, piped)
		half := make([]byte, size/2)
		if _, err := io.ReadFull(pipe, half); err != nil {
			t.Fatalf("piped nbdcopy: %v\n%s", err, pipedErr.String())
		}
		if diff := firstDiff(half, expected[:size/2]); diff != "" {
			t.Fatalf("piped nbdcopy, first half: %s", diff)
		}

		// Many connections and requests, back to back, across the swap.
		var copies, afterSwap atomic.Int64
		var swapped atomic.Bool
		stop := make(chan struct{})
		loopErr := make(chan error, 1)
		go func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					loopErr <- nil
					return
				default:
				}
				wasSwapped := swapped.Load()
				out := filepath.Join(d.Dir, fmt.Sprintf("copy%d.img", i%2))
				if o, err := runErr("nbdcopy", "--connections=2", "--requests=16", uri, out); err != nil {
					loopErr <- fmt.Errorf("nbdcopy #%d: %v\n%s", i, err, o)
					return
				}
				got, err := os.ReadFile(out)
				if err != nil {
					loopErr <- err
					return
				}
				if diff := firstDiff(got, expected); diff != "" {
					loopErr <- fmt.Errorf("nbdcopy #%d read other data: %s", i, diff)
					return
				}
				copies.Add(1)
				if wasSwapped {
					afterSwap.Add(1)
				}
			}
		}()
		waitFor(t, toolTimeout, "a first full nbdcopy", func() bool {
			select {
			case err := <-loopErr:
				loopErr <- err
				return true
			default:
				return copies.Load() > 0
			}
		})

		swap(t, d, "dev", linearTable, linearShown)
		swapped.Store(true)
		checkLinear(t, d, "dev")
		waitFor(t, toolTimeout, "a full nbdcopy started after the swap", func() bool {
			select {
			case err := <-loopErr:
				loopErr <- err
				return true
			default:
				return afterSwap.Load() > 0
			}
		})
		close(stop)
		if err := <-loopErr; err != nil {
			t.Fatal(err)
		}

		rest, err := io.ReadAll(pipe)
		if err != nil {
			t.Fatalf("piped nbdcopy after the swap: %v", err)
		}
		if err := piped.Wait(); err != nil {
			t.Fatalf("piped nbdcopy across the swap: %v\n%s", err, pipedErr.String())
		}
		if diff := firstDiff(rest, expected[size/2:]); diff != "" {
			t.Fatalf("piped nbdcopy, second half (read after the swap): %s", diff)
		}
		t.Logf("%d full copies, %d after the swap", copies.Load(), afterSwap.Load())
		compareImage(t, uri, expPath)
	})

	t.Run("PipedWriter", func(t *testing.T) {
		// A writer whose connection spans a swap back to a clone on the
		// same, fully hydrated metadata: nbdcopy from a pipe the test feeds
		// half before and half after.
		data := randomBytes(11, size)
		w := exec.Command("nbdcopy", "--connections=1", "--requests=4", "-", uri)
		stdin, err := w.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		var wOut bytes.Buffer
		w.Stdout, w.Stderr = &wOut, &wOut
		startProc(t, w)
		if _, err := stdin.Write(data[:size/2]); err != nil {
			t.Fatalf("feeding nbdcopy: %v\n%s", err, wOut.String())
		}
		swap(t, d, "dev", cloneTable, cloneShown)
		if st := status(t, d, "dev"); st.Hydrated != 1024 || st.Regions != 1024 {
			t.Errorf("clone table on hydrated metadata: %+v", st)
		}
		if _, err := stdin.Write(data[size/2:]); err != nil {
			t.Fatalf("feeding nbdcopy after the swap: %v\n%s", err, wOut.String())
		}
		stdin.Close()
		if err := w.Wait(); err != nil {
			t.Fatalf("piped nbdcopy writer across the swap: %v\n%s", err, wOut.String())
		}
		dataPath := filepath.Join(d.Dir, "written.img")
		writeFile(t, dataPath, data)
		compareImage(t, uri, dataPath)
		if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "dest.img")), data); diff != "" {
			t.Errorf("destination after the piped writer: %s", diff)
		}
	})

	t.Run("FioVerify", func(t *testing.T) {
		// fio's random writes with a checksum in every block, then its
		// verify pass reading them all back, while the clone becomes
		// linear. The write rate is capped so the swap lands while fio is
		// connected.
		const fioSize = 32 << 20
		jsonPath := filepath.Join(d.Dir, "fio.json")
		ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
		defer cancel()
		f := exec.CommandContext(ctx, "fio", "--name=swap", "--thread", "--verify_state_save=0", "--ioengine=nbd", "--uri="+uri,
			"--rw=randwrite", "--bs=4k", "--iodepth=16", fmt.Sprintf("--size=%d", fioSize),
			"--verify=crc32c", "--do_verify=1", "--end_fsync=1", "--rate_iops=,2000",
			"--output-format=json", "--output="+jsonPath)
		var fOut bytes.Buffer
		f.Stdout, f.Stderr = &fOut, &fOut
		startProc(t, f)
		destPath := filepath.Join(d.Dir, "dest.img")
		waitFor(t, toolTimeout, "fio's writes", func() bool { return fioBlocks(t, destPath, fioSize, 4096) >= 16 })
		cli(t, d, "suspend", "dev", "--timeout", "2m")
		if n := connections(t, d, "dev"); n == 0 {
			t.Fatalf("fio left before the swap (its writes are rate-capped to last seconds): %s", fOut.String())
		}
		if got := fioBlocks(t, destPath, fioSize, 4096); got == fioSize/4096 {
			t.Fatalf("fio wrote everything before the swap (its writes are rate-capped to last seconds)")
		}
		cli(t, d, "load", "dev", "--table", linearTable)
		cli(t, d, "resume", "dev")
		checkLinear(t, d, "dev")
		if got := cli(t, d, "table", "dev"); got != linearShown+"\n" {
			t.Errorf("table after the swap: %q", got)
		}
		if err := f.Wait(); err != nil {
			t.Fatalf("fio across the swap: %v\n%s", err, fOut.String())
		}
		res := readFioJSON(t, jsonPath)
		if len(res.Jobs) != 1 {
			t.Fatalf("fio ran %d jobs, want 1", len(res.Jobs))
		}
		j := res.Jobs[0]
		if j.Error != 0 || j.Write.IOBytes != fioSize || j.Read.IOBytes != fioSize {
			t.Errorf("fio: error %d, wrote %d, verified %d; want 0, %d, %d\n%s", j.Error, j.Write.IOBytes, j.Read.IOBytes, fioSize, fioSize, fOut.String())
		}
		// What fio wrote is in the destination file too.
		run(t, "fio", "--name=check", "--verify_state_save=0", "--ioengine=psync", "--filename="+destPath,
			"--rw=randwrite", "--bs=4k", fmt.Sprintf("--size=%d", fioSize), "--verify=crc32c", "--verify_only",
			"--output-format=json", "--output="+filepath.Join(d.Dir, "fio-check.json"))
	})
}
