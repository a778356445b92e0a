package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

func TestMain(m *testing.M) {
	code := m.Run()
	harness.Cleanup()
	os.Exit(code)
}

// checkLs checks ls output: a header and aligned columns.
func checkLs(t *testing.T, got string, rows [][]string) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(got, "\n"), "\n")
	if len(lines) != len(rows)+1 || strings.Join(strings.Fields(lines[0]), " ") != "NAME EXPORT STATE CONNECTIONS" {
		t.Fatalf("ls:\n%s", got)
	}
	col := strings.Index(lines[0], "STATE")
	for i, row := range rows {
		if f := strings.Fields(lines[i+1]); strings.Join(f, " ") != strings.Join(row, " ") || strings.Index(lines[i+1], row[2]) != col {
			t.Errorf("ls row %d: %q, want %q aligned under the header:\n%s", i, lines[i+1], row, got)
		}
	}
}

const e2eSize = 64 << 20 // 131072 sectors

func TestCLILinear(t *testing.T) {
	nbdinfo := testutil.NeedTool(t, "nbdinfo")
	qemuIO := testutil.NeedTool(t, "qemu-io")
	nbdcopy := testutil.NeedTool(t, "nbdcopy")
	e := harness.Serve(t)
	harness.MakeImage(t, filepath.Join(e.Dir, "a.img"), e2eSize)

	// Relative paths resolve against the CLI's directory; the table may
	// come on stdin.
	e.OK("create", "lin", "--table", "0 131072 linear a.img 0")
	if r := e.CLI("0 2048 linear ./a.img 2048\n", "create", "small"); r.Code != 0 {
		t.Fatalf("create from stdin: %+v", r)
	}

	// What NBD clients see.
	var info struct {
		Exports []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal([]byte(harness.Run(t, nbdinfo, "--json", e.URI("lin"))), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %+v", info)
	}
	ex := info.Exports[0]
	if ex["export-size"] != float64(e2eSize) {
		t.Errorf("export-size %v", ex["export-size"])
	}
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"} {
		if ex[k] != true {
			t.Errorf("%s = %v", k, ex[k])
		}
	}
	if ex["is_read_only"] != false {
		t.Errorf("is_read_only = %v", ex["is_read_only"])
	}

	// Writes land and read back.
	out := harness.Run(t, qemuIO, "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 32M 4M", "-c", "flush",
		"-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 32M 4M", e.URI("lin"))
	if strings.Contains(out, "fail") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io: %s", out)
	}

	// dmsetup-style output.
	if got := e.OK("status", "lin"); got != "0 131072 linear\n" {
		t.Errorf("status lin: %q", got)
	}
	if got := e.OK("status"); got != "lin: 0 131072 linear\nsmall: 0 2048 linear\n" {
		t.Errorf("status: %q", got)
	}
	aImg := filepath.Join(e.Dir, "a.img")
	if got := e.OK("table", "lin"); got != "0 131072 linear "+aImg+" 0\n" {
		t.Errorf("table lin: %q", got)
	}
	if got := e.OK("table"); got != "lin: 0 131072 linear "+aImg+" 0\nsmall: 0 2048 linear "+aImg+" 2048\n" {
		t.Errorf("table: %q", got)
	}
	checkLs(t, e.OK("ls"), [][]string{
		{"lin", e.URI("lin"), "active", "0"},
		{"small", e.URI("small"), "active", "0"},
	})
	var st daemon.DeviceStatus
	if err := json.Unmarshal([]byte(e.OK("status", "-o", "json", "lin")), &st); err != nil || st.Info == nil || st.Info.Type != "linear" || st.SizeBytes != e2eSize {
		t.Errorf("status -o json: %+v %v", st, err)
	}
	e.OK("wait", "lin")

	// Swap to a copy while a reader runs: the reader sees no error and
	// the same data.
	e.OK("suspend", "lin")
	checkLs(t, e.OK("ls"), [][]string{
		{"lin", e.URI("lin"), "suspended", "0"},
		{"small", e.URI("small"), "active", "0"},
	})
	harness.Run(t, "cp", "--sparse=always", aImg, filepath.Join(e.Dir, "b.img"))
	e.OK("resume", "lin")
	want, err := os.ReadFile(aImg)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	readerDone := make(chan error, 1)
	var copies int
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				readerDone <- nil
				return
			default:
			}
			outFile := filepath.Join(e.Dir, fmt.Sprintf("copy%d.img", i%2))
			if out, err := exec.Command(nbdcopy, "--connections=2", e.URI("lin"), outFile).CombinedOutput(); err != nil {
				readerDone <- fmt.Errorf("nbdcopy #%d: %v\n%s", i, err, out)
				return
			}
			got, err := os.ReadFile(outFile)
			if err != nil || !bytes.Equal(got, want) {
				readerDone <- fmt.Errorf("nbdcopy #%d read other data (%v)", i, err)
				return
			}
			copies++
		}
	}()
	for i := range 6 {
		img := []string{"b.img", "a.img"}[i%2]
		if i%2 == 0 {
			e.OK("suspend", "lin", "--timeout", "10s")
		}
		e.OK("load", "lin", "--table", "0 131072 linear "+img+" 0")
		if got := e.OK("table", "--inactive", "lin"); got != "0 131072 linear "+filepath.Join(e.Dir, img)+" 0\n" {
			t.Errorf("table --inactive: %q", got)
		}
		e.OK("resume", "lin")
		if got := e.OK("table", "lin"); got != "0 131072 linear "+filepath.Join(e.Dir, img)+" 0\n" {
			t.Errorf("table after swap: %q", got)
		}
		time.Sleep(150 * time.Millisecond)
	}
	close(stop)
	if err := <-readerDone; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d full copies during the swaps", copies)

	// Errors: the daemon's text, exit 1.
	e.Fails("nbdclone: Device lookup failed: blockdev: open "+filepath.Join(e.Dir, "missing.img")+": open "+
		filepath.Join(e.Dir, "missing.img")+": no such file or directory\n",
		"create", "bad", "--table", "0 131072 linear missing.img 0")
	e.Fails("nbdclone: device lin already exists\n", "create", "lin", "--table", "0 8 linear a.img 0")
	e.Fails("nbdclone: table length differs from the live table: NBD clients cannot see a size change (live 131072 sectors, new 8)\n",
		"load", "lin", "--table", "0 8 linear a.img 0")
	e.Fails("nbdclone: Unsupported message\n", "message", "lin", "0", "enable_hydration")
	e.Fails("nbdclone: Invalid sector\n", "message", "lin", "1", "enable_hydration")
	e.Fails("nbdclone: device nope does not exist\n", "status", "nope")
	e.Fails("nbdclone: create: want NAME\nRun 'nbdclone create --help' for usage.\n", "create")
	e.Fails("nbdclone: cannot reach the nbdclone daemon at /nonexistent/control.sock: is `nbdclone serve` running?\n",
		"--control", "/nonexistent/control.sock", "ls")
	if _, err := os.Stat(filepath.Join(e.State, "bad.json")); !os.IsNotExist(err) {
		t.Error("a failed create left state")
	}

	// remove: busy while a client is connected, unless forced.
	client := exec.Command(qemuIO, "-f", "raw", e.URI("lin"))
	clientIn, _ := client.StdinPipe()
	var clientOut bytes.Buffer
	client.Stdout, client.Stderr = &clientOut, &clientOut
	if err := client.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(e.OK("ls"), "active  1\n") {
		if time.Now().After(deadline) {
			t.Fatalf("the connection never showed in ls:\n%s\nqemu-io: %s", e.OK("ls"), clientOut.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.Fails("nbdclone: device lin is busy: 1 NBD connection(s)\n", "remove", "lin")
	e.OK("remove", "--force", "lin")
	clientIn.Close()
	client.Wait()
	e.OK("remove", "small")
	if got := e.OK("ls"); got != "No devices found\n" {
		t.Errorf("ls after remove: %q", got)
	}
	if ents, _ := os.ReadDir(e.State); len(ents) != 0 {
		t.Errorf("state left: %v", ents)
	}
	// The data written before stays in the file.
	out = harness.Run(t, qemuIO, "-f", "raw", "-r", "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 32M 4M", aImg)
	if strings.Contains(out, "fail") {
		t.Errorf("data lost: %s", out)
	}
}

// TestCLIRestart: devices survive a daemon restart.
func TestCLIRestart(t *testing.T) {
	nbdinfo := testutil.NeedTool(t, "nbdinfo")
	e := harness.Serve(t)
	harness.MakeImage(t, filepath.Join(e.Dir, "a.img"), 1<<20)
	e.OK("create", "keep", "--table", "0 2048 linear a.img 0")
	e.Stop()

	e.Start()
	if got := e.OK("table", "keep"); got != "0 2048 linear "+filepath.Join(e.Dir, "a.img")+" 0\n" {
		t.Errorf("after restart: %q", got)
	}
	if out := harness.Run(t, nbdinfo, "--size", e.URI("keep")); strings.TrimSpace(out) != "1048576" {
		t.Errorf("nbdinfo --size: %q", out)
	}
}

// TestCLICloneFlow is the user's flow of DESIGN.md with a local source:
// create a clone without hydration, read it, enable hydration, wait with
// progress, swap to linear while a reader runs.
func TestCLICloneFlow(t *testing.T) {
	qemuIO := testutil.NeedTool(t, "qemu-io")
	nbdcopy := testutil.NeedTool(t, "nbdcopy")
	e := harness.Serve(t)
	src := filepath.Join(e.Dir, "src.img")
	harness.MakeImage(t, src, e2eSize)
	harness.MakeImage(t, filepath.Join(e.Dir, "dest.img"), e2eSize)
	harness.Run(t, qemuIO, "-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "write -P 0xa5 60M 4M", src)
	os.Chmod(src, 0o444)

	e.Fails("nbdclone: Region size is not a power of 2\n",
		"create", "bad", "--table", "0 131072 clone ./md-bad ./dest.img ./src.img 24")

	e.OK("create", "clone", "--table", "0 131072 clone ./md ./dest.img ./src.img 8 1 no_hydration")
	if got := e.OK("status", "clone"); !strings.HasPrefix(got, "0 131072 clone 8 ") ||
		!strings.HasSuffix(got, " 8 0/16384 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw\n") {
		t.Errorf("status: %q", got)
	}
	// The table reads back with its paths resolved against the CLI's
	// directory, the other arguments as given.
	wantTable := "0 131072 clone " + filepath.Join(e.Dir, "md") + " " + filepath.Join(e.Dir, "dest.img") + " " + src + " 8 1 no_hydration\n"
	if got := e.OK("table", "clone"); got != wantTable {
		t.Errorf("table: %q, want %q", got, wantTable)
	}
	out := harness.Run(t, qemuIO, "-f", "raw", "-c", "read -P 0x5a 0 8M", "-c", "write -P 0x77 16M 1M", "-c", "flush", e.URI("clone"))
	if strings.Contains(out, "fail") {
		t.Fatalf("qemu-io: %s", out)
	}

	e.OK("message", "clone", "0", "enable_hydration")
	progress := e.OK("wait", "clone", "--progress")
	if !strings.HasSuffix(progress, "clone: hydrated (16384/16384 regions)\n") {
		t.Errorf("wait --progress printed %q", progress)
	}
	if got := e.OK("status", "clone"); !strings.Contains(got, " 16384/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw\n") {
		t.Errorf("status after hydration: %q", got)
	}

	// Swap to linear under a reader.
	readerDone := make(chan error, 1)
	go func() {
		out, err := exec.Command(nbdcopy, "--connections=1", "--requests=4", e.URI("clone"), filepath.Join(e.Dir, "copy.img")).CombinedOutput()
		if err != nil {
			err = fmt.Errorf("%v: %s", err, out)
		}
		readerDone <- err
	}()
	e.OK("suspend", "clone")
	e.OK("load", "clone", "--table", "0 131072 linear ./dest.img 0")
	if got, want := e.OK("table", "--inactive", "clone"), "0 131072 linear "+filepath.Join(e.Dir, "dest.img")+" 0\n"; got != want {
		t.Errorf("table --inactive: %q, want %q", got, want)
	}
	time.Sleep(100 * time.Millisecond) // the reader waits at the gate
	e.OK("resume", "clone")
	if err := <-readerDone; err != nil {
		t.Fatal(err)
	}
	if got := e.OK("status", "clone"); got != "0 131072 linear\n" {
		t.Errorf("status after the swap: %q", got)
	}
	out = harness.Run(t, qemuIO, "-f", "raw", "-r", "-c", "read -P 0x5a 0 8M", "-c", "read -P 0x77 16M 1M", "-c", "read -P 0xa5 60M 4M",
		filepath.Join(e.Dir, "dest.img"))
	if strings.Contains(out, "fail") {
		t.Errorf("destination: %s", out)
	}
	e.OK("remove", "clone")
}
