package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// failsWith runs a command that must fail: exit 1, nothing on stdout, and
// one stderr line "nbdclone: <dm's text>..." (the CLI may add the cause
// after dm's text, never before it).
func failsWith(t *testing.T, d *harness.Daemon, dmText string, args ...string) string {
	t.Helper()
	r := d.CLI("", args...)
	msg, ok := strings.CutPrefix(r.Stderr, "nbdclone: ")
	if r.Code != 1 || r.Stdout != "" || !ok || !strings.HasPrefix(msg, dmText) ||
		!strings.HasSuffix(msg, "\n") || strings.Count(msg, "\n") != 1 {
		t.Errorf("nbdclone %s:\n exit %d, stdout %q, stderr %q\nwant exit 1, stderr \"nbdclone: %s...\"",
			strings.Join(args, " "), r.Code, r.Stdout, r.Stderr, dmText)
	}
	return msg
}

// TestConstructorErrorsViaCLI: every constructor error of dm-clone comes out
// of `nbdclone create` with dm-clone's text and exit status 1, in dm-clone's
// checking order; a failed create leaves no device, no state and no
// metadata. Bad messages fail the same way, and metadata made with another
// region or target size is refused.
func TestConstructorErrorsViaCLI(t *testing.T) {
	d := harness.Serve(t)
	const size = 8 << 20 // 16384 sectors
	makeSource(t, d.Dir, 3, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	harness.MakeImage(t, filepath.Join(d.Dir, "small.img"), size/2)
	writeFile(t, filepath.Join(d.Dir, "afile"), []byte("not a directory"))

	ok := func(rest string) string { return "0 16384 clone ./md ./dest.img ./src.img " + rest }
	cases := []struct{ name, table, want string }{
		// 1. argument count
		{"no args", "0 16384 clone", "Invalid number of arguments"},
		{"three args", "0 16384 clone ./md ./dest.img ./src.img", "Invalid number of arguments"},
		// 2. metadata
		{"md parent missing", "0 16384 clone ./nodir/md ./dest.img ./src.img 8", "Error opening metadata device"},
		{"md is a file", "0 16384 clone ./afile ./dest.img ./src.img 8", "Error opening metadata device"},
		// 3. destination
		{"dest missing", "0 16384 clone ./md ./missing.img ./src.img 8", "Error opening destination device"},
		{"dest small", "0 16384 clone ./md ./small.img ./src.img 8", "Device size larger than destination device"},
		// 4. source
		{"src missing", "0 16384 clone ./md ./dest.img ./missing.img 8", "Error opening source device"},
		{"src small", "0 16384 clone ./md ./dest.img ./small.img 8", "Device size larger than source device"},
		// 5. region size
		{"region 4", ok("4"), "Invalid region size"},
		{"region 0", ok("0"), "Invalid region size"},
		{"region -8", ok("-8"), "Invalid region size"},
		{"region word", ok("eight"), "Invalid region size"},
		{"region 2^22", ok("4194304"), "Invalid region size"},
		{"region 2^32+8", ok("4294967304"), "Invalid region size"},
		{"region 24", ok("24"), "Region size is not a power of 2"},
		{"region 4097", ok("4097"), "Region size is not a power of 2"},
		// 7. features
		{"5 features", ok("8 5 no_hydration no_discard_passdown no_read_hints auto_linear no_hydration"), "Invalid number of feature arguments"},
		{"features missing", ok("8 2 no_hydration"), "Invalid number of feature arguments"},
		{"feature count word", ok("8 one no_hydration"), "Invalid number of feature arguments"},
		{"unknown feature", ok("8 1 hydrate"), "Invalid feature argument"},
		// 8. core arguments
		{"8 core args", ok("8 0 8 hydration_threshold 1 hydration_batch_size 1 hydration_rate 1 a b"), "Invalid number of core arguments"},
		{"core args missing", ok("8 0 4 hydration_threshold 1"), "Invalid number of core arguments"},
		{"odd core args", ok("8 0 1 hydration_threshold"), "Number of core arguments must be even"},
		{"3 core args", ok("8 1 no_hydration 3 hydration_threshold 1 hydration_batch_size"), "Number of core arguments must be even"},
		{"threshold negative", ok("8 0 2 hydration_threshold -1"), "Invalid value for argument `hydration_threshold'"},
		{"threshold 2^32", ok("8 0 2 hydration_threshold 4294967296"), "Invalid value for argument `hydration_threshold'"},
		{"batch word", ok("8 0 2 HYDRATION_BATCH_SIZE many"), "Invalid value for argument `hydration_batch_size'"},
		{"unknown core arg", ok("8 0 2 hydration_speed 1"), "Invalid core argument"},
		// dm-clone's order: the first failing check wins.
		{"order md first", "0 16384 clone ./nodir/md ./missing.img ./missing.img 24 1 x", "Error opening metadata device"},
		{"order dest before src", "0 16384 clone ./md ./missing.img ./missing.img 24", "Error opening destination device"},
		{"order src before region", "0 16384 clone ./md ./dest.img ./missing.img 24", "Error opening source device"},
		{"order region before features", ok("24 1 x"), "Region size is not a power of 2"},
		{"order features before core", ok("8 1 x 2 y 1"), "Invalid feature argument"},
		// Trailing arguments: dm-clone ignores them, nbdclone refuses a
		// table it would half ignore.
		{"trailing", ok("8 0 0 extra"), "Invalid number of arguments"},
	}
	for i, c := range cases {
		// A fresh metadata path per case, to check nothing was formatted.
		table := strings.Replace(c.table, "./md ", fmt.Sprintf("./md%d ", i), 1)
		failsWith(t, d, c.want, "create", fmt.Sprintf("bad%d", i), "--table", table)
		if _, err := os.Stat(filepath.Join(d.Dir, fmt.Sprintf("md%d", i))); !os.IsNotExist(err) {
			t.Errorf("%s: a failed create made metadata md%d (%v)", c.name, i, err)
		}
	}

	// Too many regions: more than 2^31 regions of 4 KiB (8 TiB), with
	// sparse devices that are large enough.
	length := int64(1)<<34 + 8 // sectors: 2^31 + 1 regions of 8 sectors
	harness.MakeImage(t, filepath.Join(d.Dir, "huge-src.img"), length*sector)
	harness.MakeImage(t, filepath.Join(d.Dir, "huge-dest.img"), length*sector)
	failsWith(t, d, "Too many regions. Consider increasing the region size",
		"create", "huge", "--table", fmt.Sprintf("0 %d clone ./md-huge ./huge-dest.img ./huge-src.img 8", length))
	if _, err := os.Stat(filepath.Join(d.Dir, "md-huge")); !os.IsNotExist(err) {
		t.Errorf("too many regions: metadata made (%v)", err)
	}

	if got := cli(t, d, "ls"); got != "No devices found\n" {
		t.Errorf("failed creates left devices:\n%s", got)
	}
	if ents, _ := os.ReadDir(d.State); len(ents) != 0 {
		t.Errorf("failed creates left state: %v", ents)
	}

	// Metadata made for another region size or target size is refused
	// (dm-clone: "Failed to load metadata", after logging the mismatch).
	good := "0 16384 clone ./mdm ./dest.img ./src.img 8 1 no_hydration"
	cli(t, d, "create", "m", "--table", good)
	qemuIO(t, d.URI("m"), "write -P 0x42 0 4k", "flush")
	cli(t, d, "remove", "m")
	for _, table := range []string{
		"0 16384 clone ./mdm ./dest.img ./src.img 16 1 no_hydration",
		"0 8192 clone ./mdm ./dest.img ./src.img 8 1 no_hydration",
	} {
		msg := failsWith(t, d, "Failed to load metadata", "create", "m", "--table", table)
		if !strings.Contains(msg, "Region and/or target size don't match the ones in metadata") {
			t.Errorf("reopening metadata with %q: %q does not say why", table, msg)
		}
	}
	// The refused opens did not damage it.
	cli(t, d, "create", "m", "--table", good)
	if st := status(t, d, "m"); st.Hydrated != 1 {
		t.Errorf("metadata reopened with its own sizes: %d hydrated, want 1", st.Hydrated)
	}
	qemuIO(t, d.URI("m"), "read -P 0x42 0 4k")

	// Messages: unknown ones, bad values and missing values fail, and
	// change nothing.
	before := cli(t, d, "status", "m")
	failsWith(t, d, "Unsupported message `hydrate'", "message", "m", "0", "hydrate")
	failsWith(t, d, "Unsupported message `enable_hydration_now'", "message", "m", "0", "enable_hydration_now")
	for _, args := range [][]string{
		{"hydration_threshold"},
		{"hydration_threshold", "-1"},
		{"hydration_threshold", "4294967296"},
		{"hydration_batch_size", "x"},
		{"hydration_batch_size", "1", "2"},
	} {
		r := d.CLI("", append([]string{"message", "m", "0"}, args...)...)
		if r.Code != 1 || r.Stdout != "" || !strings.HasPrefix(r.Stderr, "nbdclone: ") {
			t.Errorf("message %q: %+v, want exit 1 and an error", args, r)
		}
	}
	if got := cli(t, d, "status", "m"); got != before {
		t.Errorf("failed messages changed the status:\n%s\n%s", before, got)
	}

	// Metadata that cannot be written: dm-clone's own message.
	t.Run("ReadOnlyMetadata", func(t *testing.T) {
		testutil.NeedRoot(t)
		testutil.NeedTool(t, "mount")
		testutil.NeedTool(t, "umount")
		cli(t, d, "remove", "m")
		mdm := filepath.Join(d.Dir, "mdm")
		run(t, "mount", "--bind", mdm, mdm)
		t.Cleanup(func() {
			if out, err := runErr("umount", mdm); err != nil {
				t.Errorf("umount %s: %v %s", mdm, err, out)
			}
		})
		run(t, "mount", "-o", "remount,ro,bind", mdm)
		failsWith(t, d, "Unable to get write access to metadata, please check/repair metadata", "create", "m", "--table", good)
	})
}
