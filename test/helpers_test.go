package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
	"github.com/nbdclone/nbdclone/target"
)

func TestMain(m *testing.M) {
	code := m.Run()
	harness.Cleanup()
	os.Exit(code)
}

const (
	// toolTimeout only stops a hung tool; nothing here takes near it.
	toolTimeout = 3 * time.Minute
	sector      = 512
)

// randomBytes is size bytes of reproducible random data.
func randomBytes(seed uint64, size int64) []byte {
	var s [32]byte
	s[0], s[1] = byte(seed), byte(seed>>8)
	b := make([]byte, size)
	rand.NewChaCha8(s).Read(b)
	return b
}

// writeFile writes data to path (mode 0644).
func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sha256File(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// firstDiff describes where two images differ, or "" when they are equal.
func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	if bytes.Equal(got, want) {
		return ""
	}
	// Whole 4 KiB blocks first: a byte loop over 64 MiB is slow under -race.
	i := 0
	for i+4096 <= len(got) && bytes.Equal(got[i:i+4096], want[i:i+4096]) {
		i += 4096
	}
	for got[i] == want[i] {
		i++
	}
	differ := 0
	for j := i; j < len(got); j++ {
		if got[j] != want[j] {
			differ++
		}
		if j-i > 1<<20 {
			break
		}
	}
	return fmt.Sprintf("first difference at byte %d (%d of the next MiB differ)", i, differ)
}

// run runs an external tool that must succeed (exit 0) within toolTimeout
// and returns its combined output.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", toolTimeout, err)
	}
	return string(out), err
}

// qemuIO runs `qemu-io -f raw` with one -c per command against uri (or a
// file) and fails the test if any command failed: qemu-io exits 1 then, and
// says "failed" (write/read errors, "Pattern verification failed").
func qemuIO(t testing.TB, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := runErr("qemu-io", append(args, uri)...)
	if err != nil || strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io %q on %s: %v\n%s", cmds, uri, err, out)
	}
	return out
}

// cli runs an nbdclone command that must succeed within toolTimeout (the
// harness's d.OK has no timeout, and `wait` could otherwise hang the whole
// test binary, leaving mounts behind).
func cli(t testing.TB, d *harness.Daemon, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, d.Bin, args...)
	cmd.Dir = d.Dir
	cmd.Env = harness.Env(daemon.ControlEnv + "=" + d.Control)
	cmd.WaitDelay = 10 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stderr.Len() != 0 {
		t.Fatalf("nbdclone %s: %v (timeout %v)\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, toolTimeout, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// cloneInfo is the JSON status of a clone device (never commits metadata).
func cloneInfo(t testing.TB, d *harness.Daemon, name string) target.CloneInfo {
	t.Helper()
	c, err := daemon.Dial(d.Control)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := c.Info(ctx, name)
	if err != nil {
		t.Fatalf("info %s: %v", name, err)
	}
	if st.Info == nil || st.Info.Clone == nil {
		t.Fatalf("info %s: not a clone: %+v", name, st)
	}
	return *st.Info.Clone
}

// lsDevices is what `nbdclone ls -o json` prints.
func lsDevices(t testing.TB, d *harness.Daemon) []daemon.Device {
	t.Helper()
	var devs []daemon.Device
	if err := json.Unmarshal([]byte(cli(t, d, "ls", "-o", "json")), &devs); err != nil {
		t.Fatal(err)
	}
	return devs
}

// lsDevice is one device of `nbdclone ls -o json`.
func lsDevice(t testing.TB, d *harness.Daemon, name string) daemon.Device {
	t.Helper()
	for _, dev := range lsDevices(t, d) {
		if dev.Name == name {
			return dev
		}
	}
	t.Fatalf("ls: no device %s", name)
	return daemon.Device{}
}

// connections is the number of NBD connections `nbdclone ls` counts.
func connections(t testing.TB, d *harness.Daemon, name string) int {
	t.Helper()
	return lsDevice(t, d, name).Connections
}

// statusRE is dm-clone's status line as `dmsetup status` prints it.
var statusRE = regexp.MustCompile(`^0 (\d+) clone 8 (\d+)/(\d+) (\d+) (\d+)/(\d+) (\d+) (\d+)((?: [a-z_]+)*) 4 hydration_threshold (\d+) hydration_batch_size (\d+) (rw|ro)$`)

// cloneStatus is a parsed status line.
type cloneStatus struct {
	Len, MDUsed, MDTotal, RegionSectors, Hydrated, Regions, Hydrating uint64
	Features                                                          []string
	Threshold, BatchSize                                              uint64
	Mode                                                              string
}

func parseStatus(t testing.TB, line string) cloneStatus {
	t.Helper()
	m := statusRE.FindStringSubmatch(strings.TrimSuffix(line, "\n"))
	if m == nil {
		t.Fatalf("status line %q does not match %s", line, statusRE)
	}
	n := func(i int) uint64 {
		v, err := strconv.ParseUint(m[i], 10, 64)
		if err != nil {
			t.Fatalf("status %q field %d: %v", line, i, err)
		}
		return v
	}
	st := cloneStatus{
		Len: n(1), MDUsed: n(2), MDTotal: n(3), RegionSectors: n(4), Hydrated: n(5), Regions: n(6), Hydrating: n(7),
		Features: strings.Fields(m[9]), Threshold: n(10), BatchSize: n(11), Mode: m[12],
	}
	if uint64(len(st.Features)) != n(8) {
		t.Fatalf("status %q: feature count %d but %d features", line, n(8), len(st.Features))
	}
	if st.MDUsed > st.MDTotal || st.Hydrated > st.Regions {
		t.Fatalf("status %q: used > total", line)
	}
	return st
}

// status is `nbdclone status NAME`, parsed (it commits metadata first).
func status(t testing.TB, d *harness.Daemon, name string) cloneStatus {
	t.Helper()
	return parseStatus(t, cli(t, d, "status", name))
}

// pattern returns n bytes of b.
func pattern(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// imageWrite is one write a test sends and mirrors into its expected image.
type imageWrite struct {
	off, n int64
	fill   byte
	zero   bool // write -z (WRITE_ZEROES) instead of write -P
}

func (w imageWrite) cmd() string {
	if w.zero {
		return fmt.Sprintf("write -z %d %d", w.off, w.n)
	}
	return fmt.Sprintf("write -P 0x%02x %d %d", w.fill, w.off, w.n)
}

// readCmd reads the range back and checks its pattern.
func (w imageWrite) readCmd() string {
	fill := w.fill
	if w.zero {
		fill = 0
	}
	return fmt.Sprintf("read -P 0x%02x %d %d", fill, w.off, w.n)
}

func (w imageWrite) apply(img []byte) {
	fill := w.fill
	if w.zero {
		fill = 0
	}
	copy(img[w.off:w.off+w.n], pattern(fill, int(w.n)))
}

// writeAndCheck sends the writes with qemu-io, flushes, reads each back,
// and mirrors them into img.
func writeAndCheck(t testing.TB, uri string, img []byte, writes ...imageWrite) {
	t.Helper()
	var cmds []string
	for _, w := range writes {
		cmds = append(cmds, w.cmd())
		w.apply(img)
	}
	cmds = append(cmds, "flush")
	// Read back what the last write to each range left: later writes may
	// overlap earlier ones, so check against img, one read per write.
	for _, w := range writes {
		if !bytes.Equal(img[w.off:w.off+w.n], pattern(img[w.off], int(w.n))) {
			continue // partly overwritten later; the full image compare covers it
		}
		cmds = append(cmds, imageWrite{off: w.off, n: w.n, fill: img[w.off]}.readCmd())
	}
	qemuIO(t, uri, cmds...)
}

// compareImage checks with qemu-img that an export equals an image file.
func compareImage(t testing.TB, uri, img string) {
	t.Helper()
	out := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", uri, img)
	if !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare %s %s: %s", uri, img, out)
	}
}

// inDir is how tables show path arguments given relative to dir (the
// directory the CLI ran in): each made absolute, space-separated.
func inDir(dir string, names ...string) string {
	paths := make([]string, len(names))
	for i, n := range names {
		paths[i] = filepath.Join(dir, n)
	}
	return strings.Join(paths, " ")
}

// makeSource writes a random source image of size bytes and returns it.
func makeSource(t testing.TB, dir string, seed uint64, size int64) []byte {
	t.Helper()
	src := randomBytes(seed, size)
	writeFile(t, filepath.Join(dir, "src.img"), src)
	return src
}

// waitFor polls cond every 20 ms until it holds, failing after timeout
// (which only stops hangs).
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// nbdshell returns a command line that runs nbdsh (libnbd's Python shell).
// nbdsh runs the first python3 in PATH, which may lack the nbd module (a
// pyenv python ahead of the system's); the system python that
// python3-libnbd installs into is tried next.
func nbdshell(t testing.TB) []string {
	t.Helper()
	testutil.NeedTool(t, "nbdsh")
	if err := exec.Command("nbdsh", "-c", "pass").Run(); err == nil {
		return []string{"nbdsh"}
	}
	for _, py := range []string{"/usr/bin/python3", "/usr/local/bin/python3"} {
		if err := exec.Command(py, "-c", "import nbd").Run(); err == nil {
			return []string{py, "-m", "nbd"}
		}
	}
	testutil.Unavailable(t, "nbdsh: no python3 with the nbd module (python3-libnbd)")
	return nil
}

// startProc starts a tool whose end the test waits for; Cleanup kills it
// (by its pid) if the test ends first.
func startProc(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	// A child of the tool (fio forks its jobs unless --thread) may hold its
	// output pipes after it is killed: do not wait on them for ever.
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: %v", cmd.Path, err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
}

// fioResult is the part of fio's JSON output the tests read.
type fioResult struct {
	Jobs []struct {
		Name  string `json:"jobname"`
		Error int    `json:"error"`
		Read  struct {
			IOBytes int64 `json:"io_bytes"`
		} `json:"read"`
		Write struct {
			IOBytes int64 `json:"io_bytes"`
		} `json:"write"`
	} `json:"jobs"`
}

func readFioJSON(t testing.TB, path string) fioResult {
	t.Helper()
	raw := readFile(t, path)
	if i := bytes.IndexByte(raw, '{'); i > 0 {
		raw = raw[i:] // fio may print a warning line first
	}
	var res fioResult
	if err := json.Unmarshal(raw, &res); err != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio JSON %s: %v\n%s", path, err, raw)
	}
	return res
}

// fioBlocks counts the blocks of size bs in the first n bytes of the file
// at path that hold fio's verify header for their own offset: proof that
// fio's writes are landing (its first NBD connection only asks the size).
// The header starts with magic 0xacca, the verify type, the length and the
// random seed, then the block's offset (fio's verify.h; little-endian).
func fioBlocks(t testing.TB, path string, n, bs int64) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, bs)
	count := 0
	for off := int64(0); off+bs <= n; off += bs {
		if _, err := f.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if binary.LittleEndian.Uint16(buf[0:]) == 0xacca && int64(binary.LittleEndian.Uint32(buf[4:])) == bs &&
			int64(binary.LittleEndian.Uint64(buf[16:])) == off {
			count++
		}
	}
	return count
}
