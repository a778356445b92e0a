package nbdserver

// End-to-end tests with real NBD clients nobody here wrote: libnbd's
// nbdinfo and nbdcopy, QEMU's qemu-io and qemu-img, and fio's nbd engine.
// Missing tools fail the test under CI=true and skip it elsewhere.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/testutil"
)

func nbdURI(sock, export string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, sock)
}

// runTool runs a tool to completion and returns its combined output; a
// non-zero exit fails the test.
func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runToolErr(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runToolErr(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	path := testutil.NeedTool(t, name)
	// A bound against hangs, not an assertion on speed.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, args...).CombinedOutput()
	return string(out), err
}

func randomBytes(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func TestNbdinfoJSON(t *testing.T) {
	e := newMemExports(t)
	e.add("rw", "everything", newMemExport(3<<20, allFlags))
	e.add("ro", "nothing but reads", newMemExport(5<<20+512, ExportFlags{ReadOnly: true}))
	e.add("some", "", newMemExport(1<<20, ExportFlags{Flush: true, Zeroes: true, Cache: true}))
	srv := startServer(t, e, Options{MaxPayload: 4 << 20})

	type export struct {
		Name        string `json:"export-name"`
		Description string `json:"description"`
		Size        int64  `json:"export-size"`
		ReadOnly    bool   `json:"is_read_only"`
		Cache       bool   `json:"can_cache"`
		DF          bool   `json:"can_df"`
		FastZero    bool   `json:"can_fast_zero"`
		Flush       bool   `json:"can_flush"`
		FUA         bool   `json:"can_fua"`
		MultiConn   bool   `json:"can_multi_conn"`
		Trim        bool   `json:"can_trim"`
		Zero        bool   `json:"can_zero"`
		BlockMin    int64  `json:"block_size_minimum"`
		BlockPref   int64  `json:"block_size_preferred"`
		BlockMax    int64  `json:"block_size_maximum"`
	}
	type info struct {
		Protocol   string   `json:"protocol"`
		Structured bool     `json:"structured"`
		Exports    []export `json:"exports"`
	}
	for name, m := range e.exports {
		var got info
		out := runTool(t, "nbdinfo", "--json", nbdURI(srv.sock, name))
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if len(got.Exports) != 1 {
			t.Fatalf("%s: %s", name, out)
		}
		x, f := got.Exports[0], m.flags
		want := export{
			Name: name, Description: e.descriptions[name], Size: m.Size(),
			ReadOnly: f.ReadOnly, Cache: f.Cache, DF: true, FastZero: f.FastZero, Flush: f.Flush,
			FUA: f.FUA, MultiConn: f.MultiConn, Trim: f.Trim, Zero: f.Zeroes,
			BlockMin: 1, BlockPref: 4096, BlockMax: 4 << 20,
		}
		if x != want || got.Protocol != "newstyle-fixed" || !got.Structured {
			t.Errorf("%s: nbdinfo says\n%+v\nwant\n%+v\n%s", name, x, want, out)
		}
	}
}

func TestNbdinfoList(t *testing.T) {
	e := newMemExports(t)
	e.add("alpha", "first disk", newMemExport(1<<20, allFlags))
	e.add("beta", "second disk", newMemExport(2<<20, ExportFlags{ReadOnly: true}))
	srv := startServer(t, e, Options{})
	var got struct {
		Exports []struct {
			Name        string `json:"export-name"`
			Description string `json:"description"`
			Size        int64  `json:"export-size"`
		} `json:"exports"`
	}
	out := runTool(t, "nbdinfo", "--list", "--json", nbdURI(srv.sock, ""))
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var lines []string
	for _, x := range got.Exports {
		lines = append(lines, fmt.Sprintf("%s|%s|%d", x.Name, x.Description, x.Size))
	}
	if want := "alpha|first disk|1048576,beta|second disk|2097152"; strings.Join(lines, ",") != want {
		t.Fatalf("list %q, want %q\n%s", lines, want, out)
	}
	// The plain-text form names every export too.
	out = runTool(t, "nbdinfo", "--list", nbdURI(srv.sock, ""))
	for _, name := range []string{`export="alpha"`, `export="beta"`} {
		if !strings.Contains(out, name) {
			t.Errorf("nbdinfo --list lacks %s:\n%s", name, out)
		}
	}
}

func TestQemuIO(t *testing.T) {
	e := newMemExports(t)
	disk := e.add("disk", "", newMemExport(4<<20, allFlags))
	e.add("ro", "", newMemExport(1<<20, ExportFlags{ReadOnly: true}))
	srv := startServer(t, e, Options{})
	uri := nbdURI(srv.sock, "disk")

	out := runTool(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 1000 5000", // unaligned start and length
		"-c", "write -P 0xcd 65537 131071",
		"-c", "write -z 8192 4096",
		"-c", "write -P 0xee 1048576 1048576",
		"-c", "discard 1310720 65536",
		"-c", "write -P 0x11 3145728 512",
		"-c", "write -z 3145728 512",
		"-c", "flush",
		"-c", "read -P 0xab 1000 5000",
		"-c", "read -P 0xcd 65537 131071",
		"-c", "read -P 0 8192 4096",
		"-c", "read -P 0 3145728 512",
		"-c", "read -P 0 0 1000",
		uri)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	// The export holds what qemu-io wrote, byte for byte.
	want := make([]byte, 4<<20)
	fill := func(off, n int, b byte) {
		for i := off; i < off+n; i++ {
			want[i] = b
		}
	}
	fill(1000, 5000, 0xab)
	fill(65537, 131071, 0xcd)
	fill(8192, 4096, 0)
	fill(1048576, 1048576, 0xee)
	fill(1310720, 65536, 0) // memExport's trim zeroes
	got := disk.snapshot()
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("export differs from qemu-io's writes at byte %d: %#x, want %#x\n%s", i, got[i], want[i], out)
	}
	if disk.flushes.Load() == 0 {
		t.Error("qemu-io's flush did not reach the export")
	}

	// A read-only export refuses writes; reads work.
	roURI := nbdURI(srv.sock, "ro")
	runTool(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4096", roURI)
	if out, err := runToolErr(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 512", roURI); err == nil {
		t.Fatalf("write to a read-only export succeeded:\n%s", out)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

func TestNbdcopyBothWays(t *testing.T) {
	const size = 24 << 20
	content := randomBytes(1, size)
	clear(content[8<<20 : 12<<20]) // a zero run: nbdcopy may zero rather than write it

	e := newMemExports(t)
	src := e.add("src", "", newMemExport(size, allFlags))
	src.fill(content)
	dst := e.add("dst", "", newMemExport(size, allFlags))
	dst.fill(randomBytes(2, size)) // garbage that must all be overwritten
	single := e.add("single", "", newMemExport(size, ExportFlags{Flush: true}))
	srv := startServer(t, e, Options{})

	file := filepath.Join(t.TempDir(), "copy.img")
	opens := e.opens.Load()
	runTool(t, "nbdcopy", "--connections=4", nbdURI(srv.sock, "src"), file)
	if got, err := os.ReadFile(file); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("export → file: bytes differ (%v, first at %d)", err, firstDiff(got, content))
	}
	if n := e.opens.Load() - opens; n < 2 {
		t.Errorf("nbdcopy opened %d connection(s) to a multi-conn export", n)
	}

	opens = e.opens.Load()
	runTool(t, "nbdcopy", "--connections=4", file, nbdURI(srv.sock, "dst"))
	if i := firstDiff(dst.snapshot(), content); i >= 0 {
		t.Fatalf("file → export: bytes differ at %d", i)
	}
	if n := e.opens.Load() - opens; n < 2 {
		t.Errorf("nbdcopy opened %d connection(s) to a multi-conn export", n)
	}

	// Without CAN_MULTI_CONN, a client must stick to one connection.
	opens = e.opens.Load()
	runTool(t, "nbdcopy", "--connections=4", file, nbdURI(srv.sock, "single"))
	if i := firstDiff(single.snapshot(), content); i >= 0 {
		t.Fatalf("file → single-connection export: bytes differ at %d", i)
	}
	if n := e.opens.Load() - opens; n != 1 {
		t.Errorf("nbdcopy opened %d connections to an export without multi-conn", n)
	}

	// Export to export, through two connections of the same server.
	clear(content[:1<<20])
	src.fill(content)
	runTool(t, "nbdcopy", nbdURI(srv.sock, "src"), nbdURI(srv.sock, "dst"))
	if i := firstDiff(dst.snapshot(), content); i >= 0 {
		t.Fatalf("export → export: bytes differ at %d", i)
	}
}

func TestQemuImgCompare(t *testing.T) {
	const size = 6<<20 + 512
	content := randomBytes(3, size)
	e := newMemExports(t)
	e.add("disk", "", newMemExport(size, allFlags)).fill(content)
	srv := startServer(t, e, Options{})
	file := filepath.Join(t.TempDir(), "same.img")
	if err := os.WriteFile(file, content, 0o600); err != nil {
		t.Fatal(err)
	}
	uri := nbdURI(srv.sock, "disk")
	runTool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", uri, file)

	// One byte off must be found (exit status 1), at that offset.
	content[size-100] ^= 0xff
	if err := os.WriteFile(file, content, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := runToolErr(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", uri, file)
	if exitErr, ok := err.(*exec.ExitError); !ok || exitErr.ExitCode() != 1 {
		t.Fatalf("qemu-img compare of different images: %v\n%s", err, out)
	}
	// qemu-img reports the start of the sector it found the difference in.
	var at int
	if _, err := fmt.Sscanf(strings.TrimSpace(out), "Content mismatch at offset %d!", &at); err != nil || at > size-100 || size-100-at >= 512 {
		t.Errorf("mismatch reported at the wrong place (%v):\n%s", err, out)
	}
}

// corruptingExport flips one bit in every read: fio's verification must
// notice, which shows the passing run above is not vacuous.
type corruptingExport struct{ *memExport }

func (c corruptingExport) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := c.memExport.ReadAt(ctx, p, off); err != nil {
		return err
	}
	p[len(p)/2] ^= 1
	return nil
}

type fixedExports map[string]Export

func (f fixedExports) Lookup(name string) (Export, bool) { x, ok := f[name]; return x, ok }
func (f fixedExports) Open(name string) (Export, func(), bool) {
	x, ok := f[name]
	return x, func() {}, ok
}
func (f fixedExports) List() []ExportInfo { return nil }

func runFio(t *testing.T, uri string) (string, error) {
	return runToolErr(t, "fio",
		"--name=nbdserver-verify",
		"--verify_state_save=0",
		"--ioengine=nbd",
		"--uri="+uri,
		"--rw=randrw",
		"--bs=4k",
		"--iodepth=32",
		"--size=16m",
		"--verify=crc32c",
		"--do_verify=1",
		"--verify_fatal=1",
		"--randseed=42",
	)
}

func TestFioVerify(t *testing.T) {
	e := newMemExports(t)
	disk := e.add("disk", "", newMemExport(16<<20, allFlags))
	// The first request is held until a second one reaches the export: a
	// server that ran one request at a time would hang here (and fail at
	// runTool's bound), fio sending 32 at once.
	var requests atomic.Int64
	second := make(chan struct{})
	secondArrived := sync.OnceFunc(func() { close(second) })
	disk.hook = func(ctx context.Context, op string, off, n int64) error {
		if requests.Add(1) == 1 {
			<-second
		} else {
			secondArrived()
		}
		return nil
	}
	srv := startServer(t, e, Options{})
	t.Cleanup(secondArrived)
	if out, err := runFio(t, nbdURI(srv.sock, "disk")); err != nil || !strings.Contains(out, "err= 0") {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	if disk.maxInFlight.Load() < 2 {
		t.Errorf("fio at iodepth 32 never had two requests in flight (max %d)", disk.maxInFlight.Load())
	}

	before := runtime.NumGoroutine()
	sock := testutil.Sock(t, "bad.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	bad, err := NewServer(fixedExports{"bad": corruptingExport{newMemExport(16<<20, allFlags)}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	go bad.Serve(context.Background(), l)
	out, err := runFio(t, nbdURI(sock, "bad"))
	bad.Close()
	checkGoroutineCount(t, before)
	if err == nil {
		t.Fatalf("fio verified an export that corrupts every read:\n%s", out)
	}
	if !strings.Contains(out, "crc32c") && !strings.Contains(out, "verify") {
		t.Fatalf("fio failed, but not on verification:\n%s", out)
	}
}
