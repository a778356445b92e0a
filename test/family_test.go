package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// showFamily is `nbdclone show -o json NAME`.
func showFamily(t testing.TB, d *harness.Daemon, name string) daemon.Family {
	t.Helper()
	var f daemon.Family
	if err := json.Unmarshal([]byte(cli(t, d, "show", "-o", "json", name)), &f); err != nil {
		t.Fatal(err)
	}
	return f
}

// exportSum copies an export with nbdcopy and returns the copy's sha256.
func exportSum(t testing.TB, uri, dir, name string) string {
	t.Helper()
	out := filepath.Join(dir, name)
	run(t, "nbdcopy", uri, out)
	sum := sha256File(t, out)
	os.Remove(out)
	return sum
}

// TestCloneFamilyChain: golden → a → b, with writes at each level (golden
// is written before a is made, a before b is made), reads back right
// through b (qemu-img compare against the expected image). While b reads
// a, a refuses writes with EPERM on a connection opened before b existed
// (nbdsh, libnbd) and is advertised read-only to new ones, and `remove a`
// fails naming b. `show` gives the chain and children. `redirect b` moves
// b onto golden with its data unchanged (checksum), a can then be removed,
// and b survives a daemon restart; `split b` leaves a linear device that
// equals what b showed.
func TestCloneFamilyChain(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "nbdcopy")
	testutil.NeedTool(t, "nbdinfo")
	d := harness.Serve(t)
	const size = 32<<20 + 3*4096 // a partial 64 KiB-cache block at the end
	golden := filepath.Join(d.Dir, "golden.img")
	img := randomBytes(91, size)
	// Level 0: the golden image, with a pattern of its own.
	copy(img[1<<20:], pattern(0x60, 12345))
	writeFile(t, golden, img)

	// Level 1: a, a clone of golden, written.
	harness.MakeImage(t, filepath.Join(d.Dir, "a.dst"), size)
	cli(t, d, "create", "a", "--table", fmt.Sprintf("0 %d clone a.md a.dst golden.img 8 1 no_hydration", size/sector))
	writeAndCheck(t, d.URI("a"), img,
		imageWrite{off: 4096, n: 8192, fill: 0xa1},        // whole regions: no copy
		imageWrite{off: 3<<20 + 100, n: 5000, fill: 0xa2}, // partial: copied first
		imageWrite{off: 5 << 20, n: 1 << 20, zero: true},  // write zeroes
		imageWrite{off: size - 3000, n: 3000, fill: 0xa3}, // the tail
	)

	// A connection to a opened while it is still writable.
	sh := nbdshell(t)
	script := fmt.Sprintf(`
import subprocess, nbd
subprocess.run([%q, "create", "b", "--table", %q], check=True, cwd=%q, env=%s)
try:
    h.pwrite(b"x" * 4096, 0)
    print("WRITE-OK")
except nbd.Error as e:
    print("WRITE-ERRNO", e.errno)
try:
    h.zero(4096, 8192)
    print("ZERO-OK")
except nbd.Error as e:
    print("ZERO-ERRNO", e.errno)
`, d.Bin, fmt.Sprintf("0 %d clone b.md b.dst dev:a 8 1 no_hydration", size/sector), d.Dir, pyEnv(d))
	harness.MakeImage(t, filepath.Join(d.Dir, "b.dst"), size)
	out, err := runErr(sh[0], append(sh[1:], "-u", d.URI("a"), "-c", script)...)
	if err != nil || !strings.Contains(out, "WRITE-ERRNO EPERM") || !strings.Contains(out, "ZERO-ERRNO EPERM") {
		t.Fatalf("write to a after b was created on it: %v\n%s", err, out)
	}
	// New connections are told a is read-only.
	var info struct {
		Exports []struct {
			ReadOnly bool `json:"is_read_only"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--json", d.URI("a"))), &info); err != nil || len(info.Exports) != 1 || !info.Exports[0].ReadOnly {
		t.Fatalf("nbdinfo a: %v %+v, want read-only", err, info)
	}
	d.Fails("nbdclone: device a is the source of b: remove, redirect or split them first\n", "remove", "a")
	d.Fails("nbdclone: device a is the source of b: remove, redirect or split them first\n", "remove", "--force", "a")
	// a parent takes no table over other data, and (even forced) cannot
	// read b back, nor itself.
	d.Fails("nbdclone: device a is the source of b: a table over other data would change what they read (load --force to do it anyway)\n",
		"load", "a", "--table", fmt.Sprintf("0 %d clone a2.md a.dst dev:b 8", size/sector))
	d.Fails("nbdclone: Error opening source device: daemon: device b reads a (directly or through other devices): a cannot read it back\n",
		"load", "--force", "a", "--table", fmt.Sprintf("0 %d clone a2.md a.dst dev:b 8", size/sector))
	d.Fails("nbdclone: Error opening source device: daemon: device a cannot be its own source\n",
		"load", "--force", "a", "--table", fmt.Sprintf("0 %d clone a2.md a.dst dev:a 8", size/sector))

	// Level 2: b, written; everything reads back through b.
	writeAndCheck(t, d.URI("b"), img,
		imageWrite{off: 3<<20 + 4096, n: 4096, fill: 0xb1}, // next to a's partial write
		imageWrite{off: 1<<20 + 10, n: 100, fill: 0xb2},    // inside golden's pattern
		imageWrite{off: 16 << 20, n: 2 << 20, fill: 0xb3},
	)
	expected := filepath.Join(d.Dir, "expected.img")
	writeFile(t, expected, img)
	compareImage(t, d.URI("b"), expected)
	sum := exportSum(t, d.URI("b"), d.Dir, "b.copy")

	f := showFamily(t, d, "b")
	if want := []string{"dev:a", golden}; strings.Join(f.Chain, " ") != strings.Join(want, " ") || f.Depth != 2 || f.Hydration != "disabled" || f.Type != "clone" {
		t.Fatalf("show b: %+v, want chain %q", f, want)
	}
	if fa := showFamily(t, d, "a"); strings.Join(fa.Children, ",") != "b" || fa.Depth != 1 {
		t.Fatalf("show a: %+v, want child b", fa)
	}

	// Redirect b onto golden, then a can go.
	if got := cli(t, d, "redirect", "b"); got != golden+"\n" {
		t.Fatalf("redirect b printed %q, want %q", got, golden)
	}
	if f := showFamily(t, d, "b"); len(f.Chain) != 1 || f.Chain[0] != golden {
		t.Fatalf("show b after redirect: %+v", f)
	}
	if fa := showFamily(t, d, "a"); len(fa.Children) != 0 {
		t.Fatalf("show a after redirect: children %v", fa.Children)
	}
	cli(t, d, "remove", "a")
	if got := exportSum(t, d.URI("b"), d.Dir, "b.copy"); got != sum {
		t.Fatalf("b changed across redirect and the removal of a: sha256 %s, was %s", got, sum)
	}
	d.Stop()
	d.Start()
	if got := cli(t, d, "table", "b"); !strings.Contains(got, " "+golden+" ") {
		t.Fatalf("table of b after a restart: %q, want the golden source", got)
	}
	compareImage(t, d.URI("b"), expected)

	// Split b: linear, equal to what it showed.
	cli(t, d, "split", "b")
	if got := cli(t, d, "table", "b"); got != fmt.Sprintf("0 %d linear %s 0\n", size/sector, filepath.Join(d.Dir, "b.dst")) {
		t.Fatalf("table of b after split: %q", got)
	}
	if f := showFamily(t, d, "b"); f.Type != "linear" || f.Depth != 0 || f.HydratedFraction != 1 {
		t.Fatalf("show b after split: %+v", f)
	}
	compareImage(t, d.URI("b"), expected)
	if diff := firstDiff(readFile(t, filepath.Join(d.Dir, "b.dst")), img); diff != "" {
		t.Fatalf("b's destination after split: %s", diff)
	}
}

// pyEnv is the daemon's CLI environment as a Python dict literal.
func pyEnv(d *harness.Daemon) string {
	var b strings.Builder
	b.WriteString("{")
	for _, kv := range harness.Env(daemon.ControlEnv + "=" + d.Control) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		fmt.Fprintf(&b, "%q: %q, ", k, v)
	}
	b.WriteString("}")
	return b.String()
}

// TestManyClonesShareSource: 8 clones of one 256 MiB source (nbdkit with
// its stats filter, over a unix socket) in one daemon with --source-cache,
// each read fully by nbdcopy at the same time: nbdkit serves about the
// source's size once, not 8 times, and every clone reads right. The JSON
// status counts each clone's cache hits and misses.
func TestManyClonesShareSource(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	d := harness.Serve(t, "--source-cache", "64M")
	const (
		size   = 256 << 20
		clones = 8
	)
	srcPath := filepath.Join(d.Dir, "src.img")
	makeSource(t, d.Dir, 77, size)
	stats := filepath.Join(d.Dir, "stats.txt")
	s := startNBDKit(t, "--filter=stats", "file", srcPath, "statsfile="+stats)
	for i := range clones {
		createClone(t, d, fmt.Sprintf("c%d", i), size, s.uri(), "1 no_hydration")
	}
	want := sha256File(t, srcPath)
	sums := make(chan string, clones)
	for i := range clones {
		go func() {
			out := filepath.Join(d.Dir, fmt.Sprintf("copy%d.img", i))
			o, err := runErr("nbdcopy", d.URI(fmt.Sprintf("c%d", i)), out)
			if err != nil {
				sums <- fmt.Sprintf("nbdcopy c%d: %v: %s", i, err, o)
				return
			}
			defer os.Remove(out)
			data, err := os.ReadFile(out)
			if err != nil {
				sums <- err.Error()
				return
			}
			sums <- fmt.Sprintf("%x", sha256.Sum256(data))
		}()
	}
	for range clones {
		if got := <-sums; got != want {
			t.Errorf("a clone read through nbdcopy: %s, want sha256 %s", got, want)
		}
	}
	var hits, misses uint64
	for i := range clones {
		info := cloneInfo(t, d, fmt.Sprintf("c%d", i))
		sc := info.SourceCache
		if sc == nil || sc.Users != clones || sc.CapacityBytes != 64<<20 || sc.UsedBytes > sc.CapacityBytes {
			t.Fatalf("c%d source cache: %+v", i, sc)
		}
		if info.Stats.SourceReadBytes != size {
			t.Errorf("c%d read %d bytes from its source, want %d", i, info.Stats.SourceReadBytes, size)
		}
		hits += sc.DeviceHits
		misses += sc.DeviceMisses
		if i == clones-1 {
			t.Logf("shared source cache: %+v", *sc)
		}
	}
	for i := range clones {
		cli(t, d, "remove", fmt.Sprintf("c%d", i)) // nbdkit waits for its clients before exiting
	}
	s.stop(syscall.SIGTERM) // the stats filter writes its file at exit
	ops, read := statsReadOps(t, stats)
	t.Logf("%d clones of %d MiB read fully: nbdkit served %d reads, %.0f bytes (%.2f× the source); cache lookups %d hits, %d misses",
		clones, size>>20, ops, read, read/size, hits, misses)
	if read < size || read > 1.25*size {
		t.Fatalf("nbdkit served %.0f bytes for %d clones of a %d-byte source: want about the source's size", read, clones, size)
	}
	if hits == 0 || misses == 0 || hits+misses < uint64(clones*size/(64<<10)) {
		t.Fatalf("cache lookups: %d hits, %d misses", hits, misses)
	}
}

// TestCloneFamilyRestart: a child whose name sorts before its parent's
// comes back after a clean restart and after a crash (the parent is
// restored first), still reads through its parent, and the parent is
// still read-only and not removable.
func TestCloneFamilyRestart(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	d := harness.Serve(t)
	const size = 8 << 20
	img := makeSource(t, d.Dir, 5, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "zz.dst"), size)
	cli(t, d, "create", "zz", "--table", fmt.Sprintf("0 %d clone zz.md zz.dst src.img 8 1 no_hydration", size/sector))
	writeAndCheck(t, d.URI("zz"), img, imageWrite{off: 12345, n: 70000, fill: 0x5a})
	harness.MakeImage(t, filepath.Join(d.Dir, "aa.dst"), size)
	cli(t, d, "create", "aa", "--table", fmt.Sprintf("0 %d clone aa.md aa.dst dev:zz 8 1 no_hydration", size/sector))
	writeAndCheck(t, d.URI("aa"), img, imageWrite{off: 1 << 20, n: 4096, fill: 0xaa})
	expected := filepath.Join(d.Dir, "expected.img")
	writeFile(t, expected, img)
	for _, restart := range []string{"stop", "kill"} {
		if restart == "stop" {
			d.Stop()
		} else {
			d.Kill()
		}
		d.Start()
		for _, dev := range lsDevices(t, d) {
			if dev.State != daemon.StateActive {
				t.Fatalf("after %s and start: %s is %s (%s)", restart, dev.Name, dev.State, dev.Error)
			}
		}
		compareImage(t, d.URI("aa"), expected)
		d.Fails("nbdclone: device zz is the source of aa: remove, redirect or split them first\n", "remove", "zz")
		if out, err := runErr("qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", d.URI("zz")); err == nil && !strings.Contains(out, "failed") && !strings.Contains(out, "read-only") && !strings.Contains(out, "not permitted") {
			t.Fatalf("write to the parent zz after %s: %s", restart, out)
		}
	}
	cli(t, d, "remove", "aa")
	qemuIO(t, d.URI("zz"), "write -P 2 0 4096", "read -P 2 0 4096") // writable again
}

// du is `du -B1 PATH` (allocated bytes) as a number.
func du(t testing.TB, path string) int64 {
	t.Helper()
	var n int64
	if _, err := fmt.Sscan(run(t, "du", "-s", "-B1", path), &n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestThinClones: four clones of one 256 MiB golden image on sparse
// destinations, with no_hydration, take no destination space until
// written: reading one through entirely allocates nothing, and each write
// costs what it covers rounded up to regions (du, and show's
// allocated_bytes). The figures go to the README.
func TestThinClones(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "nbdcopy")
	testutil.NeedTool(t, "du")
	d := harness.Serve(t)
	const (
		size   = 256 << 20
		region = 64 << 10 // 128 sectors
	)
	makeSource(t, d.Dir, 3, size)
	for i := range 4 {
		name := fmt.Sprintf("vm%d", i)
		harness.MakeImage(t, filepath.Join(d.Dir, name+".dst"), size)
		cli(t, d, "create", name, "--table", fmt.Sprintf("0 %d clone %s.md %s.dst src.img 128 1 no_hydration", size/sector, name, name))
	}
	dst := func(i int) string { return filepath.Join(d.Dir, fmt.Sprintf("vm%d.dst", i)) }
	run(t, "nbdcopy", d.URI("vm0"), "null:")
	for i := range 4 {
		if got := du(t, dst(i)); got != 0 {
			t.Fatalf("vm%d's destination takes %d bytes before any write", i, got)
		}
	}
	// vm1: 1 MiB of whole regions; vm2: 100 bytes (one region copied
	// first); vm3: 4 MiB scattered over 64 regions, 4 KiB each.
	qemuIO(t, d.URI("vm1"), "write -P 1 16M 1M", "flush")
	qemuIO(t, d.URI("vm2"), "write -P 2 1000 100", "flush")
	var cmds []string
	for k := range 64 {
		cmds = append(cmds, fmt.Sprintf("write -P 3 %d 4096", int64(k)*3<<20+4096))
	}
	qemuIO(t, d.URI("vm3"), append(cmds, "flush")...)
	want := []int64{0, 1 << 20, region, 64 * region}
	for i := range 4 {
		got := du(t, dst(i))
		f := showFamily(t, d, fmt.Sprintf("vm%d", i))
		// The filesystem may add an extent-tree block or so.
		if got < want[i] || got > want[i]+16<<10 || f.AllocatedBytes != got {
			t.Errorf("vm%d: du %d bytes, show %d, want %d (+ at most 16 KiB of extent blocks)", i, got, f.AllocatedBytes, want[i])
		}
		t.Logf("vm%d: destination %d MiB apparent, %d KiB allocated (du); metadata %d KiB (du)",
			i, size>>20, got>>10, du(t, filepath.Join(d.Dir, fmt.Sprintf("vm%d.md", i)))>>10)
	}
}

// TestSplitParent: a parent is split (hydrated, swapped to linear) while
// its child reads it: the child reads the same, the parent stays
// read-only and not removable; redirecting the child onto a linear parent
// is refused; once the child is split too, the parent can go.
func TestSplitParent(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	d := harness.Serve(t)
	const size = 16 << 20
	img := makeSource(t, d.Dir, 8, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "a.dst"), size)
	cli(t, d, "create", "a", "--table", fmt.Sprintf("0 %d clone a.md a.dst src.img 8 1 no_hydration", size/sector))
	writeAndCheck(t, d.URI("a"), img, imageWrite{off: 100, n: 10000, fill: 0x11})
	harness.MakeImage(t, filepath.Join(d.Dir, "b.dst"), size)
	cli(t, d, "create", "b", "--table", fmt.Sprintf("0 %d clone b.md b.dst dev:a 8 1 no_hydration", size/sector))
	writeAndCheck(t, d.URI("b"), img, imageWrite{off: 8 << 20, n: 4096, fill: 0x22})
	expected := filepath.Join(d.Dir, "expected.img")
	writeFile(t, expected, img)

	cli(t, d, "split", "a")
	if f := showFamily(t, d, "a"); f.Type != "linear" || strings.Join(f.Children, ",") != "b" {
		t.Fatalf("show a after split: %+v", f)
	}
	compareImage(t, d.URI("b"), expected)
	d.Fails("nbdclone: device a is the source of b: remove, redirect or split them first\n", "remove", "a")
	d.Fails("nbdclone: device b reads a, a linear device without a source to redirect onto: split b instead\n", "redirect", "b")
	harness.MakeImage(t, filepath.Join(d.Dir, "other.img"), size)
	d.Fails("nbdclone: device a is the source of b: a table over other data would change what they read (load --force to do it anyway)\n",
		"load", "a", "--table", fmt.Sprintf("0 %d linear other.img 0", size/sector))
	cli(t, d, "load", "a", "--table", fmt.Sprintf("0 %d linear a.dst 0", size/sector)) // the same data: allowed
	cli(t, d, "resume", "a")
	cli(t, d, "split", "b")
	compareImage(t, d.URI("b"), expected)
	cli(t, d, "remove", "a")
	compareImage(t, d.URI("b"), expected)
	qemuIO(t, d.URI("b"), "write -P 3 0 4096", "read -P 3 0 4096")
}

// TestRedirectUnderWriter: b (a clone of a, itself a written clone of
// golden) is redirected onto golden while fio writes to b with checksums
// and then verifies them: fio sees no error and verifies every block, and
// the part of b fio does not touch still holds a's writes and golden's
// data.
func TestRedirectUnderWriter(t *testing.T) {
	testutil.NeedTool(t, "fio")
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "nbdcopy")
	d := harness.Serve(t)
	const size, half = 32 << 20, 16 << 20
	img := makeSource(t, d.Dir, 12, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "a.dst"), size)
	cli(t, d, "create", "a", "--table", fmt.Sprintf("0 %d clone a.md a.dst src.img 8 1 no_hydration", size/sector))
	var writes []imageWrite
	for k := range int64(40) {
		writes = append(writes, imageWrite{off: k*(half/40) + 777, n: 3000 + 100*k, fill: byte(0x40 + k)})
	}
	writeAndCheck(t, d.URI("a"), img, writes...)
	harness.MakeImage(t, filepath.Join(d.Dir, "b.dst"), size)
	cli(t, d, "create", "b", "--table", fmt.Sprintf("0 %d clone b.md b.dst dev:a 8 1 no_hydration", size/sector))

	jsonPath := filepath.Join(d.Dir, "fio.json")
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	f := exec.CommandContext(ctx, "fio", "--name=redirect", "--thread", "--verify_state_save=0", "--ioengine=nbd", "--uri="+d.URI("b"),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", fmt.Sprintf("--offset=%d", half), fmt.Sprintf("--size=%d", half),
		"--verify=crc32c", "--do_verify=1", "--end_fsync=1", "--rate_iops=,1500",
		"--output-format=json", "--output="+jsonPath)
	var fOut bytes.Buffer
	f.Stdout, f.Stderr = &fOut, &fOut
	startProc(t, f)
	waitFor(t, toolTimeout, "fio's writes", func() bool { return cloneInfo(t, d, "b").HydratedRegions >= 64 })
	if got := cli(t, d, "redirect", "b"); got != filepath.Join(d.Dir, "src.img")+"\n" {
		t.Fatalf("redirect printed %q", got)
	}
	if n := connections(t, d, "b"); n == 0 {
		t.Fatalf("fio left before the redirect ended (its writes are rate-capped): %s", fOut.String())
	}
	cli(t, d, "remove", "a")
	if err := f.Wait(); err != nil {
		t.Fatalf("fio across the redirect: %v\n%s", err, fOut.String())
	}
	res := readFioJSON(t, jsonPath)
	if j := res.Jobs[0]; j.Error != 0 || j.Write.IOBytes != half || j.Read.IOBytes != half {
		t.Fatalf("fio: error %d, wrote %d, verified %d; want 0, %d, %d\n%s", j.Error, j.Write.IOBytes, j.Read.IOBytes, half, half, fOut.String())
	}
	out := filepath.Join(d.Dir, "b.copy")
	run(t, "nbdcopy", d.URI("b"), out)
	if diff := firstDiff(readFile(t, out)[:half], img[:half]); diff != "" {
		t.Fatalf("the half of b fio did not write: %s", diff)
	}
}

// TestRedirectCrashWindow: a crash after the metadata recorded a redirect
// but before the state file got the new table leaves the old table (still
// reading through the parent): the device comes back and reads the same,
// and the redirect can be run again.
func TestRedirectCrashWindow(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	d := harness.Serve(t)
	const size = 8 << 20
	img := makeSource(t, d.Dir, 21, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "a.dst"), size)
	cli(t, d, "create", "a", "--table", fmt.Sprintf("0 %d clone a.md a.dst src.img 8 1 no_hydration", size/sector))
	writeAndCheck(t, d.URI("a"), img, imageWrite{off: 5000, n: 20000, fill: 0x71})
	harness.MakeImage(t, filepath.Join(d.Dir, "b.dst"), size)
	cli(t, d, "create", "b", "--table", fmt.Sprintf("0 %d clone b.md b.dst dev:a 8 1 no_hydration", size/sector))
	writeAndCheck(t, d.URI("b"), img, imageWrite{off: 3 << 20, n: 4096, fill: 0x72})
	expected := filepath.Join(d.Dir, "expected.img")
	writeFile(t, expected, img)
	statePath := filepath.Join(d.State, "b.json")
	oldState := readFile(t, statePath)
	cli(t, d, "redirect", "b")
	d.Kill()
	if strings.Contains(string(oldState), "src.img") || !strings.Contains(string(readFile(t, statePath)), "src.img") {
		t.Fatalf("state of b before/after the redirect:\n%s\n%s", oldState, readFile(t, statePath))
	}
	writeFile(t, statePath, oldState) // as if the crash came before the state save
	d.Start()
	if got := cli(t, d, "table", "b"); !strings.Contains(got, " dev:a ") {
		t.Fatalf("table of b: %q", got)
	}
	compareImage(t, d.URI("b"), expected)
	cli(t, d, "redirect", "b")
	cli(t, d, "remove", "a")
	compareImage(t, d.URI("b"), expected)
	d.Stop()
	d.Start()
	compareImage(t, d.URI("b"), expected)
}

// TestSuspendParent: while a parent is suspended, its child serves what it
// holds and its reads of other regions wait (they do not fail) until the
// parent resumes.
func TestSuspendParent(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	d := harness.Serve(t)
	const size = 8 << 20
	img := makeSource(t, d.Dir, 31, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "a.dst"), size)
	cli(t, d, "create", "a", "--table", fmt.Sprintf("0 %d clone a.md a.dst src.img 8 1 no_hydration", size/sector))
	harness.MakeImage(t, filepath.Join(d.Dir, "b.dst"), size)
	cli(t, d, "create", "b", "--table", fmt.Sprintf("0 %d clone b.md b.dst dev:a 8 1 no_hydration", size/sector))
	writeAndCheck(t, d.URI("b"), img, imageWrite{off: 0, n: 64 << 10, fill: 0x33})
	expected := filepath.Join(d.Dir, "expected.img")
	writeFile(t, expected, img)

	cli(t, d, "suspend", "a")
	d.Fails("nbdclone: device a is suspended: resume it first\n", "redirect", "b")
	d.Fails("nbdclone: device a is suspended: resume it first\n", "split", "b")
	qemuIO(t, d.URI("b"), "read -P 0x33 0 64k") // b's own regions
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	reader := exec.CommandContext(ctx, "qemu-io", "-f", "raw", "-c", "read 4M 64k", d.URI("b"))
	var out bytes.Buffer
	reader.Stdout, reader.Stderr = &out, &out
	startProc(t, reader)
	done := make(chan error, 1)
	go func() { done <- reader.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("a read of b's unhydrated regions ended while its parent was suspended: %v\n%s", err, out.String())
	case <-time.After(500 * time.Millisecond):
	}
	cli(t, d, "resume", "a")
	if err := <-done; err != nil || strings.Contains(out.String(), "failed") {
		t.Fatalf("the held read after resume: %v\n%s", err, out.String())
	}
	compareImage(t, d.URI("b"), expected)
}

// TestFamilyNoCycleThroughLoadedTables: tables loaded and not yet resumed
// count: a reads b in a's loaded table, so b cannot load a table reading a.
func TestFamilyNoCycleThroughLoadedTables(t *testing.T) {
	d := harness.Serve(t)
	const size = 1 << 20
	makeSource(t, d.Dir, 1, size)
	for _, n := range []string{"a", "b"} {
		harness.MakeImage(t, filepath.Join(d.Dir, n+".dst"), size)
		cli(t, d, "create", n, "--table", fmt.Sprintf("0 %d clone %s.md %s.dst src.img 8", size/sector, n, n))
	}
	cli(t, d, "load", "a", "--table", fmt.Sprintf("0 %d clone a2.md a.dst dev:b 8", size/sector))
	d.Fails("nbdclone: Error opening source device: daemon: device a reads b (directly or through other devices): b cannot read it back\n",
		"load", "--force", "b", "--table", fmt.Sprintf("0 %d clone b2.md b.dst dev:a 8", size/sector))
	if f := showFamily(t, d, "b"); strings.Join(f.Children, ",") != "a" {
		t.Fatalf("b's children with a's table loaded: %v", f.Children)
	}
}
