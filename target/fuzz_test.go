package target

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// FuzzParseTable: any input either parses into a table whose canonical form
// parses back to the same table, or fails with ErrTable; never a panic.
func FuzzParseTable(f *testing.F) {
	for _, s := range []string{
		"0 2097152 clone ./md ./dest.img ./src.img 8 1 no_hydration",
		"0 8 linear /dev/sdb 0", "", "0", "0 8", "1 8 linear a 0", "0 -1 linear a 0",
		"0 99999999999999999999 linear a 0", "0 8 linear a 0\n0 8 linear b 0", "0 8 x;y",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		tb, err := ParseTable(line)
		if err != nil {
			if !errors.Is(err, ErrTable) {
				t.Fatalf("ParseTable(%q): error %v is not ErrTable", line, err)
			}
			return
		}
		again, err := ParseTable(tb.String())
		if err != nil || again.String() != tb.String() || again.Bytes() != tb.Bytes() {
			t.Fatalf("%q → %q does not round-trip: %v", line, tb.String(), err)
		}
		if tb.Start != 0 || tb.Length == 0 || tb.Bytes() <= 0 {
			t.Fatalf("%q parsed into an impossible table %+v", line, tb)
		}
	})
}

// dmMessages are the constructor errors a clone table may produce (the
// messages and the prefixes of those with details).
var dmMessages = regexp.MustCompile(`^(Invalid number of arguments|Error opening (metadata|destination|source) device|` +
	`Device size larger than (destination|source) device|Invalid region size|Region size is not a power of 2|` +
	`Region size is not a multiple of device logical block size|Too many regions\. Consider increasing the region size|` +
	`Invalid number of feature arguments|Invalid feature argument|Invalid number of core arguments|` +
	`Number of core arguments must be even|Invalid value for argument ` + "`" + `hydration_(threshold|batch_size)'|` +
	`Invalid core argument|Failed to load metadata|Unable to get write access to metadata)`)

// FuzzCloneArgs builds clone tables with fuzzed arguments after the three
// devices: every outcome is a working target or one of dm-clone's errors;
// never a panic, never another error.
func FuzzCloneArgs(f *testing.F) {
	for _, s := range []string{
		"8", "8 1 no_hydration", "8 2 no_hydration no_discard_passdown",
		"16 0 4 hydration_threshold 5 hydration_batch_size 7", "8 0 2 HYDRATION_THRESHOLD 0",
		"7", "24", "8 3 a b c", "8 1", "8 0 3 a 1 b", "8 0 2 hydration_threshold x", "8 0 0 extra",
		"4294967296", "8 1 no_hydration 2 hydration_batch_size 4294967295",
	} {
		f.Add(s)
	}
	fx := newFixture(f, 64*4096, 5)
	f.Fuzz(func(t *testing.T, tail string) {
		if strings.ContainsAny(tail, "\n;") {
			return // one table line
		}
		md := filepath.Join(t.TempDir(), "md")
		tb, err := ParseTable("0 512 clone " + md + " " + fx.dst + " " + fx.src + " " + tail)
		if err != nil {
			return
		}
		tg, err := Build(context.Background(), tb, Env{})
		if err != nil {
			var dm *DMError
			if !errors.As(err, &dm) || !dmMessages.MatchString(dm.Msg) {
				t.Fatalf("%q: error %v is not one of dm-clone's", tail, err)
			}
			if _, serr := os.Stat(md); serr == nil && !strings.HasPrefix(dm.Msg, "Failed to load metadata") {
				t.Fatalf("%q: a failed constructor (%v) created the metadata directory", tail, err)
			}
			return
		}
		defer tg.Close()
		if s := tg.Status(); !statusRE.MatchString(s) {
			t.Fatalf("%q: status %q", tail, s)
		}
	})
}

var statusRE = regexp.MustCompile(`^8 \d+/\d+ \d+ \d+/\d+ \d+ \d+( \w+)* 4 hydration_threshold \d+ hydration_batch_size \d+ (rw|ro)$`)

// TestCorruptMetadataIsRefusedAndKept: a metadata directory whose files are
// damaged is refused with "Failed to load metadata", and nothing in it is
// rewritten by the attempt.
func TestCorruptMetadataIsRefusedAndKept(t *testing.T) {
	f := newFixture(t, 64*4096, 6)
	c := f.build(t, 8, "1 no_hydration")
	c.WriteAt(bg, fill(4096, 1), 0, true)
	c.Suspend(bg)
	c.Close()
	// Damage the superblock's slot in the store's file.
	p := filepath.Join(f.md, "nbdclone.meta")
	b, err := os.ReadFile(p)
	if err != nil || len(b) < 64 {
		t.Fatalf("the store's file: %d bytes, %v", len(b), err)
	}
	for i := range 64 {
		b[i] ^= 0x5a
	}
	os.WriteFile(p, b, 0o600)
	before := snapshotDir(t, f.md)
	tb, _ := ParseTable(f.line(8, "1 no_hydration"))
	_, err = Build(bg, tb, Env{})
	var dm *DMError
	if !errors.As(err, &dm) || dm.Msg != "Failed to load metadata" {
		t.Fatalf("corrupt metadata: %v, want Failed to load metadata", err)
	}
	after := snapshotDir(t, f.md)
	for name, content := range before {
		if after[name] != content {
			t.Errorf("the failed open changed %s", name)
		}
	}
}

func snapshotDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = string(b)
	}
	return m
}
