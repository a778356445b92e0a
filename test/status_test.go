package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// TestStatusFormat: `nbdclone status` prints dm-clone's status line exactly
// (`dmsetup status` shape, values that follow I/O and messages), and
// `nbdclone table` prints the constructor arguments verbatim but for paths,
// which it shows resolved, untouched by messages.
func TestStatusFormat(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	d := harness.Serve(t)
	const size = 64 << 20
	makeSource(t, d.Dir, 2, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest2.img"), size)

	// A fresh 64 MiB clone with 4 KiB regions: 16384 regions, one bitmap
	// chunk (metadata total = chunks + 1 = 2; used = persisted chunks + 1).
	table := "0 131072 clone ./md ./dest.img ./src.img 8 1 no_hydration"
	shown := "0 131072 clone " + inDir(d.Dir, "md", "dest.img", "src.img") + " 8 1 no_hydration"
	cli(t, d, "create", "fresh", "--table", table)
	const freshLine = "0 131072 clone 8 1/2 8 0/16384 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw\n"
	if got := cli(t, d, "status", "fresh"); got != freshLine {
		t.Errorf("status of a fresh clone:\n got %q\nwant %q", got, freshLine)
	}
	parseStatus(t, freshLine) // the regexp accepts what dm prints
	if got := cli(t, d, "table", "fresh"); got != shown+"\n" {
		t.Errorf("table:\n got %q\nwant %q", got, shown+"\n")
	}

	// One whole-region write: one region hydrated, and status (which
	// commits, as dm-clone's does) shows the bitmap chunk persisted.
	qemuIO(t, d.URI("fresh"), "write -P 0x5a 1M 4k")
	const oneLine = "0 131072 clone 8 2/2 8 1/16384 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw\n"
	if got := cli(t, d, "status", "fresh"); got != oneLine {
		t.Errorf("status after one region written:\n got %q\nwant %q", got, oneLine)
	}

	// Messages change the status line, never the table.
	cli(t, d, "message", "fresh", "0", "hydration_threshold", "7")
	cli(t, d, "message", "fresh", "0", "HYDRATION_BATCH_SIZE", "9") // dm compares case-insensitively
	const tunedLine = "0 131072 clone 8 2/2 8 1/16384 0 1 no_hydration 4 hydration_threshold 7 hydration_batch_size 9 rw\n"
	if got := cli(t, d, "status", "fresh"); got != tunedLine {
		t.Errorf("status after threshold/batch messages:\n got %q\nwant %q", got, tunedLine)
	}
	if got := cli(t, d, "table", "fresh"); got != shown+"\n" {
		t.Errorf("table changed by messages: %q, want %q", got, shown)
	}
	// Threshold 0 stops background hydration, so enabling it copies
	// nothing and the status can be checked exactly.
	cli(t, d, "message", "fresh", "0", "hydration_threshold", "0")
	cli(t, d, "message", "fresh", "0", "enable_hydration")
	const enabledLine = "0 131072 clone 8 2/2 8 1/16384 0 0 4 hydration_threshold 0 hydration_batch_size 9 rw\n"
	if got := cli(t, d, "status", "fresh"); got != enabledLine {
		t.Errorf("status with hydration enabled:\n got %q\nwant %q", got, enabledLine)
	}
	cli(t, d, "message", "fresh", "0", "disable_hydration")
	if got := cli(t, d, "status", "fresh"); got != strings.Replace(enabledLine, " 0 0 4 ", " 0 1 no_hydration 4 ", 1) {
		t.Errorf("status after disable_hydration: %q", got)
	}

	// Both features, core arguments and upper-case names: the table keeps
	// them verbatim, the status shows the current features in dm's words.
	// Paths are cleaned: "./sub/../src.img" is the same file as "./src.img".
	if err := os.Mkdir(filepath.Join(d.Dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	const args2 = " 16 2 NO_HYDRATION no_discard_passdown 4 hydration_threshold 3 Hydration_Batch_Size 5"
	table2 := "0 131072 clone ./md2/ dest2.img ./sub/../src.img" + args2
	shown2 := "0 131072 clone " + inDir(d.Dir, "md2", "dest2.img", "src.img") + args2
	cli(t, d, "create", "tuned", "--table", table2)
	const tuned2 = "0 131072 clone 8 1/2 16 0/8192 0 2 no_hydration no_discard_passdown 4 hydration_threshold 3 hydration_batch_size 5 rw\n"
	if got := cli(t, d, "status", "tuned"); got != tuned2 {
		t.Errorf("status with both features:\n got %q\nwant %q", got, tuned2)
	}
	if got := cli(t, d, "table", "tuned"); got != shown2+"\n" {
		t.Errorf("table:\n got %q\nwant %q", got, shown2+"\n")
	}

	// Without a name: one "NAME: line" per device, sorted by name.
	all := cli(t, d, "status")
	want := "fresh: " + strings.Replace(enabledLine, " 0 0 4 ", " 0 1 no_hydration 4 ", 1) + "tuned: " + tuned2
	if all != want {
		t.Errorf("status of all:\n got %q\nwant %q", all, want)
	}
	if got := cli(t, d, "table"); got != "fresh: "+shown+"\ntuned: "+shown2+"\n" {
		t.Errorf("table of all: %q", got)
	}

	// The JSON status agrees with the line.
	var js daemon.DeviceStatus
	if err := json.Unmarshal([]byte(cli(t, d, "status", "-o", "json", "tuned")), &js); err != nil {
		t.Fatal(err)
	}
	ci := js.Info.Clone
	if ci == nil || js.Table != shown2 || ci.Source != filepath.Join(d.Dir, "src.img") || ci.Regions != 8192 || ci.RegionSize != 8192 || ci.HydratedRegions != 0 ||
		ci.HydrationEnabled || ci.DiscardPassdown || ci.HydrationThreshold != 3 || ci.HydrationBatchSize != 5 || ci.Mode != "rw" {
		t.Errorf("status -o json disagrees with the status line: %+v %+v", js.Device, ci)
	}

	// A clone that hydrates to the end: every region hydrated, nothing in
	// flight, no features left.
	harness.MakeImage(t, filepath.Join(d.Dir, "dest3.img"), size)
	cli(t, d, "create", "full", "--table", "0 131072 clone ./md3 ./dest3.img ./src.img 128 0 4 hydration_threshold 16 hydration_batch_size 16")
	cli(t, d, "wait", "full")
	st := status(t, d, "full")
	if st.Hydrated != 1024 || st.Regions != 1024 || st.Hydrating != 0 || len(st.Features) != 0 || st.Mode != "rw" ||
		st.Len != 131072 || st.RegionSectors != 128 || st.Threshold != 16 || st.BatchSize != 16 {
		t.Errorf("status after hydration: %+v", st)
	}
	if got := cli(t, d, "status", "full"); !strings.HasSuffix(got, " 128 1024/1024 0 0 4 hydration_threshold 16 hydration_batch_size 16 rw\n") {
		t.Errorf("status after hydration: %q", got)
	}
}
