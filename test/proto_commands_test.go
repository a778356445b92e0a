package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// TestProtoNbdinfoFlags: `nbdinfo --json` shows every transmission flag a
// clone export has, its metadata contexts and block sizes, for a clone and
// for a linear device.
func TestProtoNbdinfoFlags(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	d := harness.Serve(t)
	const size = 16 << 20
	makeSource(t, d.Dir, 30, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	harness.MakeImage(t, filepath.Join(d.Dir, "plain.img"), size)
	cli(t, d, "create", "c", "--table", "0 32768 clone ./md ./dest.img ./src.img 128 1 no_hydration")
	cli(t, d, "create", "l", "--table", "0 32768 linear ./plain.img 0")

	// The test directory is on ext4 here, which zeroes natively
	// (FALLOC_FL_ZERO_RANGE): fast zeroes are offered.
	fastZero := fsZeroesNatively(t, d.Dir)
	type export struct {
		Name      string   `json:"export-name"`
		Size      int64    `json:"export-size"`
		Contexts  []string `json:"contexts"`
		ReadOnly  bool     `json:"is_read_only"`
		Rotating  bool     `json:"is_rotational"`
		Cache     bool     `json:"can_cache"`
		DF        bool     `json:"can_df"`
		FastZero  bool     `json:"can_fast_zero"`
		Flush     bool     `json:"can_flush"`
		FUA       bool     `json:"can_fua"`
		MultiConn bool     `json:"can_multi_conn"`
		Trim      bool     `json:"can_trim"`
		Zero      bool     `json:"can_zero"`
		BlockMin  int64    `json:"block_size_minimum"`
		BlockPref int64    `json:"block_size_preferred"`
		BlockMax  int64    `json:"block_size_maximum"`
	}
	for name, preferred := range map[string]int64{"c": 64 << 10, "l": 4096} {
		out := run(t, "nbdinfo", "--json", d.URI(name))
		var info struct {
			Protocol   string   `json:"protocol"`
			TLS        bool     `json:"TLS"`
			Structured bool     `json:"structured"`
			Exports    []export `json:"exports"`
		}
		if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
			t.Fatalf("nbdinfo --json %s: %v\n%s", name, err, out)
		}
		want := export{
			Name: name, Size: size, Contexts: []string{"base:allocation", "nbdclone:hydrated"},
			Cache: true, DF: true, FastZero: fastZero, Flush: true, FUA: true, MultiConn: true, Trim: true, Zero: true,
			BlockMin: 1, BlockPref: preferred, BlockMax: 32 << 20,
		}
		if got := info.Exports[0]; fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
			t.Errorf("nbdinfo --json %s:\n got %+v\nwant %+v", name, got, want)
		}
		if info.Protocol != "newstyle-fixed" || info.TLS || !info.Structured {
			t.Errorf("nbdinfo --json %s: protocol %q TLS %v structured %v", name, info.Protocol, info.TLS, info.Structured)
		}
	}
}

// fsZeroesNatively: ext4 and XFS zero ranges natively, so nbdclone offers
// fast zeroes on devices there.
func fsZeroesNatively(t testing.TB, dir string) bool {
	t.Helper()
	out, err := exec.Command("stat", "-f", "-c", "%T", dir).Output()
	if err != nil {
		t.Fatal(err)
	}
	fs := strings.TrimSpace(string(out))
	return fs == "ext2/ext3" || fs == "xfs" // stat names ext4 "ext2/ext3"
}

// nbdshScript exercises every command and flag on a clone with 64 KiB
// regions, then every error reply the export can produce; the Go test
// checks the image afterwards. It prints one line per check.
const nbdshScript = `
import errno, os
uri, R = os.environ["URI"], int(os.environ["REGION"])

def expect_err(what, code, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        if e.errnum != code:
            raise AssertionError("%s: %s (%s), want %s" % (what, errno.errorcode.get(e.errnum), e.string, errno.errorcode[code]))
        print("ok", what, "->", errno.errorcode[code])
        return
    raise AssertionError(what + ": succeeded")

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("nbdclone:hydrated")
h.connect_uri(uri)
size = h.get_size()
for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_df", "can_multi_conn", "can_meta_context"]:
    ok = getattr(h, flag)("base:allocation") if flag == "can_meta_context" else getattr(h, flag)()
    assert ok, flag
assert h.can_meta_context("nbdclone:hydrated")
assert not h.is_read_only()
fast = h.can_fast_zero()
print("ok flags, fast zero:", fast)

# READ, WRITE (FUA), FLUSH.
src5 = h.pread(R, 5 * R)
h.pwrite(b"\xaa" * R, 0, nbd.CMD_FLAG_FUA)            # region 0 overwritten whole
assert h.pread(R, 0) == b"\xaa" * R
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, status, len(buf)))
    return 0
h.pread_structured(65536, R, chunk, nbd.CMD_FLAG_DF)   # DF: one data chunk
assert chunks == [(R, nbd.READ_DATA, 65536)], chunks
h.pwrite(b"x" * 10, 2 * R + 5)                         # region 2: copied, then written
h.flush()
print("ok read write flush")

# WRITE_ZEROES: NO_HOLE, FAST_ZERO.
h.zero(R, 3 * R, nbd.CMD_FLAG_NO_HOLE)                 # region 3, whole: zeroed and marked
assert h.pread(R, 3 * R) == bytes(R)
if fast:
    h.zero(100, 2 * R + 1000, nbd.CMD_FLAG_FAST_ZERO)  # inside hydrated region 2: fast
    assert h.pread(100, 2 * R + 1000) == bytes(100)
    h.zero(R, 6 * R, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)  # whole unhydrated region 6: fast
    assert h.pread(R, 6 * R) == bytes(R)
    # A sliver of unhydrated region 5 would need a copy: refused at once, untouched.
    expect_err("fast zero needing a copy", errno.ENOTSUP, h.zero, 100, 5 * R + 1, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(R, 5 * R) == src5
else:
    expect_err("fast zero without native zeroing", errno.EINVAL, h.zero, 100, 6 * R, nbd.CMD_FLAG_FAST_ZERO)
h.zero(10, 7 * R + 3)                                  # region 7: copied, then zeroed
print("ok write zeroes")

# TRIM (FUA), CACHE.
h.trim(2 * R, 8 * R, nbd.CMD_FLAG_FUA)                 # regions 8-9 discarded
h.cache(R, 12 * R)                                     # region 12 hydrated now
print("ok trim cache")

# BLOCK_STATUS in both contexts, whole export and REQ_ONE.
seen = {}
def record(ctx, off, entries, err):
    seen.setdefault(ctx, []).append((off, list(entries)))
    return 0
h.block_status(size, 0, record)
hyd = seen["nbdclone:hydrated"][0][1]
runs, at = [], 0
for i in range(0, len(hyd), 2):
    if hyd[i + 1]:
        runs.append((at // R, (at + hyd[i]) // R))
    at += hyd[i]
assert at == size, (at, size)
want = [(0, 1), (2, 4), (6, 10), (12, 13)] if fast else [(0, 1), (2, 4), (7, 10), (12, 13)]
assert runs == want, runs
assert sum(seen["base:allocation"][0][1][0::2]) == size
seen.clear()
h.block_status(3 * R, 11 * R, record, nbd.CMD_FLAG_REQ_ONE)
for ctx in ("base:allocation", "nbdclone:hydrated"):
    entries = seen[ctx][0][1]
    assert len(entries) == 2 and 0 < entries[0] <= 3 * R, (ctx, entries)
assert seen["nbdclone:hydrated"][0][1] == [R, 0], seen
print("ok block status", runs)

# Error replies, sent as-is: libnbd's own checks are off.
h.set_strict_mode(0)
expect_err("read past the end", errno.EINVAL, h.pread, 512, size)
expect_err("read across the end", errno.EINVAL, h.pread, 1024, size - 512)
expect_err("write past the end", errno.ENOSPC, h.pwrite, b"x" * 512, size)
expect_err("zero past the end", errno.ENOSPC, h.zero, 512, size)
expect_err("trim past the end", errno.EINVAL, h.trim, 512, size)
expect_err("cache past the end", errno.EINVAL, h.cache, 512, size)
expect_err("block status past the end", errno.EINVAL, h.block_status, 512, size, record)
expect_err("block status of 0 bytes", errno.EINVAL, h.block_status, 0, 0, record)
expect_err("read over the maximum block size", errno.EINVAL, h.pread, (32 << 20) + 512, 0)
expect_err("REQ_ONE on a read", errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
expect_err("NO_HOLE on a write", errno.EINVAL, h.pwrite, b"x", 0, nbd.CMD_FLAG_NO_HOLE)
expect_err("DF on a write", errno.EINVAL, h.pwrite, b"x", 0, nbd.CMD_FLAG_DF)
expect_err("FAST_ZERO on a trim", errno.EINVAL, h.trim, 512, 0, nbd.CMD_FLAG_FAST_ZERO)
expect_err("unknown flag", errno.EINVAL, h.pread, 512, 0, 1 << 9)
h.flush(nbd.CMD_FLAG_FUA)  # FUA is valid on every command once advertised
h.pread(512, 0, nbd.CMD_FLAG_FUA)
# The connection survives all of them.
assert h.pread(R, 0) == b"\xaa" * R
h.shutdown()
print("ok errors")
`

// nbdshEIO runs after the test made the source unreadable: reads of
// unhydrated regions fail with EIO; the rest works.
const nbdshEIO = `
import errno, os
uri, R = os.environ["URI"], int(os.environ["REGION"])
h = nbd.NBD()
h.connect_uri(uri)
for what, f, args in [("read of an unhydrated region", h.pread, (512, 20 * R)),
                      ("read running past the end of the source", h.pread, (2 * R, 15 * R))]:
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errnum == errno.EIO, (what, e.errnum, e.string)
        print("ok", what, "-> EIO:", e.string)
        continue
    raise AssertionError(what + ": succeeded")
assert h.pread(R, 0) == b"\xaa" * R                   # hydrated: the destination
h.pwrite(b"z" * R, 22 * R)                            # whole region: no copy needed
h.flush()
h.shutdown()
`

// TestProtoNbdsh runs the scripts above with python3-libnbd (nbdsh).
func TestProtoNbdsh(t *testing.T) {
	sh := nbdshell(t)
	testutil.NeedTool(t, "nbdcopy")
	d := harness.Serve(t)
	const (
		R    = 64 << 10
		size = 32 * R
	)
	src := makeSource(t, d.Dir, 31, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img %d 1 no_hydration", size/sector, R/sector))
	nbdsh := func(script string) string {
		cmd := exec.Command(sh[0], append(sh[1:], "-n", "-c", script)...)
		cmd.Env = append(os.Environ(), "URI="+d.URI("c"), fmt.Sprintf("REGION=%d", R))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("nbdsh: %v\n%s", err, out)
		}
		return string(out)
	}
	out := nbdsh(nbdshScript)
	t.Logf("nbdsh:\n%s", out)
	if !strings.Contains(out, "ok errors") {
		t.Fatalf("nbdsh did not finish:\n%s", out)
	}
	fast := strings.Contains(out, "fast zero: True")
	if fast != fsZeroesNatively(t, d.Dir) {
		t.Errorf("fast zero offered: %v on this filesystem", fast)
	}

	// The image is what the script did, byte for byte (discarded regions
	// read as zeroes on a file destination).
	img := bytes.Clone(src)
	copy(img[0:R], pattern(0xaa, R))
	copy(img[2*R+5:], "xxxxxxxxxx")
	clear(img[3*R : 4*R])
	if fast {
		clear(img[2*R+1000 : 2*R+1100])
		clear(img[6*R : 7*R])
	}
	clear(img[7*R+3 : 7*R+13])
	clear(img[8*R : 10*R])
	outImg := filepath.Join(d.Dir, "out.img")
	run(t, "nbdcopy", d.URI("c"), outImg)
	if diff := firstDiff(readFile(t, outImg), img); diff != "" {
		t.Fatalf("image after the nbdsh script: %s", diff)
	}
	hydrated := 7 // regions 0, 2, 3, 7, 8, 9, 12
	if fast {
		hydrated++ // 6
	}
	if info := cloneInfo(t, d, "c"); info.HydratedRegions != uint64(hydrated) {
		t.Errorf("%d regions hydrated, want %d", info.HydratedRegions, hydrated)
	}

	// EIO: the source shrinks under the clone, so unhydrated regions past
	// its new end cannot be read.
	if err := os.Truncate(filepath.Join(d.Dir, "src.img"), 16*R); err != nil {
		t.Fatal(err)
	}
	out = nbdsh(nbdshEIO)
	t.Logf("nbdsh:\n%s", out)
	if strings.Count(out, "-> EIO") != 2 {
		t.Fatalf("EIO script:\n%s", out)
	}
}

// TestProtoQemuIO: qemu-io's read, write, discard, write -z (with and
// without unmap, and without fallback) and flush on a clone, checked
// byte for byte.
func TestProtoQemuIO(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-img")
	d := harness.Serve(t)
	const (
		R    = 64 << 10
		size = 64 * R
	)
	src := makeSource(t, d.Dir, 32, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img %d 1 no_hydration", size/sector, R/sector))
	uri := d.URI("c")
	img := bytes.Clone(src)
	cmds := []string{
		"write -P 0x31 1000 5000",
		"write -f -P 0x32 65536 65536",
		fmt.Sprintf("write -z %d %d", 3*R+17, 100),
		fmt.Sprintf("write -z -u %d %d", 5*R, 2*R),
		fmt.Sprintf("discard %d %d", 10*R, 3*R),
		"flush",
		"read -P 0x31 1000 5000",
		"read -P 0x32 65536 65536",
		fmt.Sprintf("read -P 0 %d %d", 3*R+17, 100),
		fmt.Sprintf("read -P 0 %d %d", 5*R, 2*R),
		fmt.Sprintf("read -P 0 %d %d", 10*R, 3*R),
	}
	if fsZeroesNatively(t, d.Dir) {
		// Without fallback: a whole region zeroes fast; qemu-io fails
		// the command when the server says it cannot.
		cmds = append(cmds, fmt.Sprintf("write -z -n %d %d", 20*R, R), fmt.Sprintf("read -P 0 %d %d", 20*R, R))
		clear(img[20*R : 21*R])
	}
	qemuIO(t, uri, cmds...)
	copy(img[1000:], pattern(0x31, 5000))
	copy(img[65536:], pattern(0x32, 65536))
	clear(img[3*R+17 : 3*R+117])
	clear(img[5*R : 7*R])
	clear(img[10*R : 13*R])
	expected := filepath.Join(d.Dir, "expected.img")
	writeFile(t, expected, img)
	compareImage(t, uri, expected)
}

// TestProtoNbdcopy: nbdcopy with 4 connections and 64 requests in flight
// each, into a clone and out of it.
func TestProtoNbdcopy(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	d := harness.Serve(t)
	const size = 48 << 20
	makeSource(t, d.Dir, 33, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 8", size/sector))
	in := randomBytes(34, size)
	clear(in[8<<20 : 16<<20]) // zeroes: nbdcopy may send them as WRITE_ZEROES
	inPath := filepath.Join(d.Dir, "in.img")
	writeFile(t, inPath, in)
	run(t, "nbdcopy", "--connections=4", "--threads=4", "--requests=64", inPath, d.URI("c"))
	outPath := filepath.Join(d.Dir, "out.img")
	run(t, "nbdcopy", "--connections=4", "--threads=4", "--requests=64", d.URI("c"), outPath)
	if diff := firstDiff(readFile(t, outPath), in); diff != "" {
		t.Fatalf("nbdcopy round trip: %s", diff)
	}
	if n := strings.Count(d.Log(), "transmission started"); n < 8 {
		t.Errorf("%d NBD connections for two nbdcopy runs with --connections=4", n)
	}
}
