package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
	"github.com/nbdclone/nbdclone/nbdkernel"
)

// TestSwapPauseUnderFio: fio's verified random writes (crc32c in every
// block, all read back at the end) run through the export while the device
// is swapped back and forth between linear and a clone on its hydrated
// metadata, as many times as fio lasts. fio sees no error and no
// disconnect; the pause of each swap (I/O held from suspend to resume) is
// reported as p50/p99/max, with fio's own write latency percentiles.
func TestSwapPauseUnderFio(t *testing.T) {
	testutil.NeedTool(t, "fio")
	d := harness.Serve(t)
	const size = 64 << 20
	makeSource(t, d.Dir, 21, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cloneTable := "0 131072 clone ./md ./dest.img ./src.img 128 1 no_hydration 4 hydration_threshold 64 hydration_batch_size 64"
	linearTable := "0 131072 linear ./dest.img 0"
	cli(t, d, "create", "dev", "--table", cloneTable)
	cli(t, d, "message", "dev", "0", "enable_hydration")
	cli(t, d, "wait", "dev")

	c, err := daemon.Dial(d.Control)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()

	const fioSize = 32 << 20
	jsonPath := filepath.Join(d.Dir, "fio.json")
	f := exec.CommandContext(ctx, "fio", "--name=pause", "--thread", "--verify_state_save=0", "--ioengine=nbd", "--uri="+d.URI("dev"),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", fmt.Sprintf("--size=%d", fioSize),
		"--verify=crc32c", "--do_verify=1", "--end_fsync=1", "--rate_iops=,1000",
		"--output-format=json", "--output="+jsonPath)
	var fOut bytes.Buffer
	f.Stdout, f.Stderr = &fOut, &fOut
	f.WaitDelay = 10 * time.Second
	if err := f.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan error, 1)
	go func() { fioDone <- f.Wait() }()
	t.Cleanup(func() { cancel() }) // kills fio if the test ends first
	waitFor(t, toolTimeout, "fio's writes", func() bool { return fioBlocks(t, filepath.Join(d.Dir, "dest.img"), fioSize, 4096) >= 16 })

	var pauses []time.Duration
	tables := []string{linearTable, cloneTable}
	var fioErr error
swaps:
	for i := 0; ; i++ {
		select {
		case fioErr = <-fioDone:
			break swaps
		default:
		}
		if n := connections(t, d, "dev"); n == 0 {
			// fio is done (a disconnect would fail it: checked below).
			fioErr = <-fioDone
			break
		}
		start := time.Now()
		if err := c.Suspend(ctx, "dev", 0); err != nil {
			t.Fatalf("swap %d: suspend: %v", i, err)
		}
		if err := c.Load(ctx, "dev", tables[i%2], d.Dir); err != nil {
			t.Fatalf("swap %d: load: %v", i, err)
		}
		if err := c.Resume(ctx, "dev"); err != nil {
			t.Fatalf("swap %d: resume: %v", i, err)
		}
		pauses = append(pauses, time.Since(start))
		time.Sleep(200 * time.Millisecond) // let fio run between swaps
	}
	if fioErr != nil {
		t.Fatalf("fio across %d swaps: %v\n%s", len(pauses), fioErr, fOut.String())
	}
	if len(pauses) == 0 {
		t.Fatalf("fio finished before the first swap (its writes are rate-capped to last seconds)")
	}
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
				Clat    struct {
					Max        float64            `json:"max"`
					Percentile map[string]float64 `json:"percentile"`
				} `json:"clat_ns"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	raw := readFile(t, jsonPath)
	if i := bytes.IndexByte(raw, '{'); i > 0 {
		raw = raw[i:]
	}
	if err := json.Unmarshal(raw, &res); err != nil || len(res.Jobs) != 1 {
		t.Fatalf("fio JSON: %v\n%s", err, raw)
	}
	j := res.Jobs[0]
	if j.Error != 0 || j.Write.IOBytes != fioSize || j.Read.IOBytes != fioSize {
		t.Errorf("fio: error %d, wrote %d, verified %d; want 0, %d, %d\n%s", j.Error, j.Write.IOBytes, j.Read.IOBytes, fioSize, fioSize, fOut.String())
	}
	sorted := slices.Clone(pauses)
	slices.Sort(sorted)
	pct := func(p float64) time.Duration { return sorted[min(len(sorted)-1, int(p*float64(len(sorted))))] }
	ms := func(ns float64) string { return time.Duration(ns).Round(10 * time.Microsecond).String() }
	t.Logf("%d swaps (linear <-> clone) under fio: pause p50 %v, p99 %v, max %v; fio write latency p99 %s, p99.9 %s, max %s",
		len(pauses), pct(0.5).Round(time.Microsecond), pct(0.99).Round(time.Microsecond), sorted[len(sorted)-1].Round(time.Microsecond),
		ms(j.Write.Clat.Percentile["99.000000"]), ms(j.Write.Clat.Percentile["99.900000"]), ms(j.Write.Clat.Max))
}

// TestDeviceLife: a device suspended when the daemon is killed comes back
// active with its data; a kill -9 while hydration runs under flushed
// writes loses nothing acknowledged by a FLUSH, and hydration then
// completes to the expected image; attach errors are clear without a
// kernel NBD driver.
func TestDeviceLife(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "nbdcopy")
	d := harness.Serve(t)
	const (
		size = 64 << 20
		M    = 1 << 20
	)
	src := makeSource(t, d.Dir, 31, size)
	expected := bytes.Clone(src)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "dev", "--table", "0 131072 clone ./md ./dest.img ./src.img 8 1 no_hydration")
	uri := d.URI("dev")

	t.Run("SuspendedAtCrash", func(t *testing.T) {
		w := imageWrite{off: 3 * M, n: 5000, fill: 0x31}
		writeAndCheck(t, uri, expected, w)
		qemuIO(t, uri, "flush")
		cli(t, d, "suspend", "dev")
		if got := lsState(t, d, "dev"); got != daemon.StateSuspended {
			t.Fatalf("state before the crash: %s", got)
		}
		d.Kill()
		d.Start()
		if got := lsState(t, d, "dev"); got != daemon.StateActive {
			t.Errorf("state after a crash while suspended: %s, want %s", got, daemon.StateActive)
		}
		qemuIO(t, uri, w.readCmd())
	})

	t.Run("KillDuringHydrationUnderWrites", func(t *testing.T) {
		cli(t, d, "message", "dev", "0", "hydration_threshold", "1")
		cli(t, d, "message", "dev", "0", "hydration_batch_size", "1")
		cli(t, d, "message", "dev", "0", "enable_hydration")
		// Writes while regions are copied, then a FLUSH: once qemu-io
		// returns, they are acknowledged after a flush.
		flushed := []imageWrite{
			{off: 10*M + 7, n: 9000, fill: 0x41},
			{off: 40 * M, n: 64 << 10, fill: 0x42},
			{off: 63*M + 100, n: 3000, fill: 0x43},
		}
		var cmds []string
		for _, w := range flushed {
			cmds = append(cmds, w.cmd())
			w.apply(expected)
		}
		qemuIO(t, uri, append(cmds, "flush")...)
		at := cloneInfo(t, d, "dev")
		d.Kill()
		t.Logf("killed with %d/%d regions hydrated", at.HydratedRegions, at.Regions)
		d.Start()
		if st := status(t, d, "dev"); !slices.Contains(st.Features, "no_hydration") {
			t.Errorf("after restart, no_hydration from the table: %+v", st)
		}
		for _, w := range flushed {
			qemuIO(t, uri, w.readCmd())
		}
		cli(t, d, "message", "dev", "0", "hydration_threshold", "64")
		cli(t, d, "message", "dev", "0", "hydration_batch_size", "64")
		cli(t, d, "message", "dev", "0", "enable_hydration")
		cli(t, d, "wait", "dev")
		if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "dest.img")), expected); diff != "" {
			t.Errorf("destination after hydration: %s", diff)
		}
	})

	t.Run("AttachErrors", func(t *testing.T) {
		file := filepath.Join(d.Dir, "dest.img")
		r := d.CLI("", "attach", "dev", file)
		want := "nbdclone: nbdkernel: not an nbd device: " + file + " is not /dev/nbdN (a block device of major 43)\n"
		if r.Code != 1 || r.Stderr != want {
			t.Errorf("attach to a file: exit %d, %q; want %q", r.Code, r.Stderr, want)
		}
		d.Fails("nbdclone: device nope does not exist\n", "attach", "nope", "/dev/nbd0")
		harness.MakeImage(t, filepath.Join(d.Dir, "dest2.img"), 1<<20)
		cli(t, d, "create", "half", "--table", "0 2048 clone ./md2 ./dest2.img ./src.img 8 1 no_hydration")
		d.Fails("nbdclone: device half is not fully hydrated (0/256 regions): a linear table would expose the unhydrated regions of the destination; wait for hydration (nbdclone wait half) or load with --force\n",
			"load", "half", "--table", "0 2048 linear ./dest2.img 0")
		cli(t, d, "load", "half", "--force", "--table", "0 2048 linear ./dest2.img 0")
		if nbdkernel.ModuleLoaded() {
			t.Log("the nbd module is loaded here: the missing-module error is covered by the VM test")
			return
		}
		if _, err := os.Stat("/dev/nbd0"); err == nil {
			t.Fatalf("/dev/nbd0 exists without the nbd module")
		}
		d.Fails("nbdclone: the nbd kernel module is not loaded: modprobe nbd\n", "attach", "dev", "/dev/nbd0")
		d.Fails("nbdclone: the nbd kernel module is not loaded: modprobe nbd\n", "detach", "/dev/nbd0")
		if got := cli(t, d, "ls"); strings.Contains(got, "ATTACHED") {
			t.Errorf("ls after failed attaches: %q", got)
		}
	})
}

// lsState is the state `nbdclone ls` shows for a device.
func lsState(t testing.TB, d *harness.Daemon, name string) string {
	t.Helper()
	return lsDevice(t, d, name).State
}
