package e2e

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// TestMetadataSurvivesRestart: a clone's hydrated regions and data survive
// a clean daemon restart (SIGTERM), a crash (SIGKILL) after a FLUSH or a FUA
// write, remove + create with the same table, and a reload of a new clone
// table on the same metadata. Writes not flushed before a crash are either
// there or not, region by region, never garbage; crashes during hydration
// leave nothing wrong behind.
func TestMetadataSurvivesRestart(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "nbdcopy")
	d := harness.Serve(t)
	const (
		size = 64 << 20
		R    = 64 << 10 // 128-sector regions: 1024 of them
		M    = 1 << 20
	)
	src := makeSource(t, d.Dir, 8, size)
	expected := bytes.Clone(src)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	table := "0 131072 clone ./md ./dest.img ./src.img 128 1 no_hydration"
	paths := inDir(d.Dir, "md", "dest.img", "src.img") // as tables show ./md ./dest.img ./src.img
	shown := "0 131072 clone " + paths + " 128 1 no_hydration"
	cli(t, d, "create", "clone", "--table", table)
	uri := d.URI("clone")

	// Whole and partial regions, write-zeroes and a discard (fstrim's
	// command), then a flush.
	writes := []imageWrite{
		{off: 0, n: R, fill: 0x11},               // region 0 whole
		{off: 1*M + 100, n: 5000, fill: 0x22},    // region 16 partial
		{off: 2 * M, n: 3 * R, fill: 0x33},       // regions 32-34 whole
		{off: 16 * M, n: 2 * R, zero: true},      // regions 256-257 zeroed
		{off: 3*M - 10, n: 20, fill: 0x44},       // regions 47 and 48 partial
		{off: 60*M + 4095, n: 2 * R, fill: 0x45}, // 960 and 962 partial, 961 whole
	}
	writeAndCheck(t, uri, expected, writes...)
	qemuIO(t, uri, fmt.Sprintf("discard %d %d", 8*M, 16*R), "flush") // regions 128-143 skipped
	const hydrated = 1 + 1 + 3 + 2 + 2 + 3 + 16
	before := cli(t, d, "status", "clone")
	if st := parseStatus(t, before); st.Hydrated != hydrated {
		t.Fatalf("before restart: %d hydrated, want %d", st.Hydrated, hydrated)
	}
	checkData := func() {
		t.Helper()
		var reads []string
		for _, w := range writes {
			reads = append(reads, imageWrite{off: w.off, n: w.n, fill: expected[w.off]}.readCmd())
		}
		qemuIO(t, uri, reads...)
		// Untouched regions still read from the source.
		qemuIO(t, uri, fmt.Sprintf("read -P 0x%02x %d 1", src[40*M], 40*M))
	}

	t.Run("SIGTERM", func(t *testing.T) {
		d.Stop()
		d.Start()
		if got := cli(t, d, "table", "clone"); got != shown+"\n" {
			t.Errorf("table after restart: %q, want %q", got, shown)
		}
		if after := cli(t, d, "status", "clone"); after != before {
			t.Errorf("status after a clean restart:\n%s\nwant\n%s", after, before)
		}
		checkData()
	})

	t.Run("SIGKILL", func(t *testing.T) {
		// Flushed: a whole-region and a partial write. FUA: a partial
		// write of its own, after the flush.
		flushed := []imageWrite{
			{off: 4 * M, n: R, fill: 0x55},
			{off: 5*M + 1, n: 10, fill: 0x56},
		}
		writeAndCheck(t, uri, expected, flushed...)
		writes = append(writes, flushed...)
		atFlush := cloneInfo(t, d, "clone").HydratedRegions
		fua := imageWrite{off: 6*M + 3, n: 100, fill: 0x57}
		qemuIO(t, uri, "write -f -P 0x57 "+fmt.Sprint(fua.off)+" "+fmt.Sprint(fua.n))
		fua.apply(expected)
		writes = append(writes, fua)
		// Not flushed: may or may not survive, but each region either
		// reads its new data or its source data.
		loose := []imageWrite{
			{off: 7 * M, n: R, fill: 0x58},       // whole region 112
			{off: 9*M + 1000, n: 50, fill: 0x59}, // inside region 144
		}
		var cmds []string
		for _, w := range loose {
			cmds = append(cmds, w.cmd())
		}
		qemuIO(t, uri, cmds...)
		d.Kill()
		d.Start()

		after := status(t, d, "clone")
		if after.Hydrated < atFlush+1 || after.Hydrated > atFlush+3 {
			t.Errorf("after SIGKILL: %d hydrated; at the flush %d, then one FUA region and two unflushed", after.Hydrated, atFlush)
		}
		checkData()
		out := filepath.Join(d.Dir, "after-kill.img")
		run(t, "nbdcopy", uri, out)
		got := readFile(t, out)
		for _, w := range loose {
			r := w.off / R * R
			newRegion := bytes.Clone(src[r : r+R])
			copy(newRegion[w.off-r:], pattern(w.fill, int(w.n)))
			switch {
			case bytes.Equal(got[r:r+R], newRegion):
				copy(expected[r:r+R], newRegion)
			case bytes.Equal(got[r:r+R], src[r:r+R]):
			default:
				t.Errorf("after SIGKILL, region %d is neither its unflushed write nor its source data (%s)",
					r/R, firstDiff(got[r:r+R], newRegion))
			}
		}
		if diff := firstDiff(got, withUnspecified(got, expected, 8*M, 16*R)); diff != "" {
			t.Errorf("after SIGKILL, the clone: %s", diff)
		}
	})

	t.Run("RemoveCreate", func(t *testing.T) {
		before := cli(t, d, "status", "clone")
		cli(t, d, "remove", "clone")
		if got := cli(t, d, "ls"); !strings.Contains(got, "No devices found") {
			t.Fatalf("ls after remove: %q", got)
		}
		cli(t, d, "create", "clone", "--table", table)
		if after := cli(t, d, "status", "clone"); after != before {
			t.Errorf("status after remove + create:\n%s\nwant\n%s", after, before)
		}
		checkData()
		out := filepath.Join(d.Dir, "recreated.img")
		run(t, "nbdcopy", uri, out)
		got := readFile(t, out)
		if diff := firstDiff(got, withUnspecified(got, expected, 8*M, 16*R)); diff != "" {
			t.Errorf("after remove + create, the clone: %s", diff)
		}
	})

	t.Run("ReloadSameMetadata", func(t *testing.T) {
		// A new clone table on the live clone's metadata (dm's way to change
		// features) keeps every hydrated region.
		before := status(t, d, "clone")
		const tunedArgs = " 128 2 no_hydration no_discard_passdown 4 hydration_threshold 5 hydration_batch_size 7"
		tuned := "0 131072 clone ./md ./dest.img ./src.img" + tunedArgs
		tunedShown := "0 131072 clone " + paths + tunedArgs
		cli(t, d, "suspend", "clone")
		cli(t, d, "load", "clone", "--table", tuned)
		cli(t, d, "resume", "clone")
		after := status(t, d, "clone")
		if after.Hydrated != before.Hydrated || strings.Join(after.Features, " ") != "no_hydration no_discard_passdown" ||
			after.Threshold != 5 || after.BatchSize != 7 {
			t.Errorf("after reloading on the same metadata: %+v, before %+v", after, before)
		}
		if got := cli(t, d, "table", "clone"); got != tunedShown+"\n" {
			t.Errorf("table after reload: %q, want %q", got, tunedShown)
		}
		// A table the metadata refuses fails at resume, and the device
		// keeps running its old table.
		cli(t, d, "load", "clone", "--table", "0 131072 clone ./md ./dest.img ./src.img 256 1 no_hydration")
		msg := failsWith(t, d, "Failed to load metadata", "resume", "clone")
		if !strings.Contains(msg, "Region and/or target size don't match the ones in metadata") {
			t.Errorf("resume with a mismatched region size: %q", msg)
		}
		if got := cli(t, d, "table", "clone"); got != tunedShown+"\n" {
			t.Errorf("table after a failed resume: %q, want %q", got, tunedShown)
		}
		if st := status(t, d, "clone"); st.Hydrated != before.Hydrated {
			t.Errorf("after a failed resume: %+v", st)
		}
		checkData()
	})

	t.Run("StatusCommits", func(t *testing.T) {
		// dm-clone commits metadata before it answers a status query, so
		// what status reports survives a crash right after, even without a
		// flush (the periodic commit is up to a second away).
		w := imageWrite{off: 50 * M, n: R, fill: 0x5c}
		qemuIO(t, uri, w.cmd())
		w.apply(expected)
		writes = append(writes, w)
		seen := status(t, d, "clone")
		d.Kill()
		d.Start()
		if st := status(t, d, "clone"); st.Hydrated != seen.Hydrated {
			t.Errorf("status said %d hydrated, after SIGKILL %d", seen.Hydrated, st.Hydrated)
		}
		checkData()
	})

	t.Run("KillDuringHydration", func(t *testing.T) {
		// Crashes while regions are being copied: after each restart the
		// table's no_hydration holds (messages do not survive, as in dm),
		// and when hydration finally completes the clone and its
		// destination are the source overlaid with the writes.
		for i := range 3 {
			cli(t, d, "message", "clone", "0", "hydration_threshold", "2")
			cli(t, d, "message", "clone", "0", "hydration_batch_size", "1")
			cli(t, d, "message", "clone", "0", "enable_hydration")
			waitFor(t, toolTimeout, "some background copies", func() bool {
				ci := cloneInfo(t, d, "clone")
				return ci.Stats.HydratedBackgroundBytes > int64(i)*R || ci.HydratedRegions == ci.Regions
			})
			d.Kill()
			d.Start()
			if st := status(t, d, "clone"); len(st.Features) == 0 || st.Features[0] != "no_hydration" {
				t.Errorf("after restart %d: %+v", i, st)
			}
		}
		cli(t, d, "message", "clone", "0", "hydration_threshold", "64")
		cli(t, d, "message", "clone", "0", "hydration_batch_size", "64")
		cli(t, d, "message", "clone", "0", "enable_hydration")
		cli(t, d, "wait", "clone")
		checkData()
		out := filepath.Join(d.Dir, "hydrated.img")
		run(t, "nbdcopy", uri, out)
		got := readFile(t, out)
		if diff := firstDiff(got, withUnspecified(got, expected, 8*M, 16*R)); diff != "" {
			t.Errorf("hydrated after crashes, the clone: %s", diff)
		}
		dest := readFile(t, filepath.Join(d.Dir, "dest.img"))
		if diff := firstDiff(dest, withUnspecified(dest, expected, 8*M, 16*R)); diff != "" {
			t.Errorf("hydrated after crashes, the destination: %s", diff)
		}
	})
}

// withUnspecified returns want with [off, off+n) taken from got: discarded
// bytes read back as whatever the device says.
func withUnspecified(got, want []byte, off, n int64) []byte {
	w := bytes.Clone(want)
	copy(w[off:off+n], got[off:off+n])
	return w
}
