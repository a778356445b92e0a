package target

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestConstructorErrors checks every dm-clone constructor error, in
// dm-clone's order, with its own message.
func TestConstructorErrors(t *testing.T) {
	f := newFixture(t, 64<<10, 1)
	small := filepath.Join(f.dir, "small.img")
	os.WriteFile(small, make([]byte, 4096), 0o600)
	notDir := filepath.Join(f.dir, "file")
	os.WriteFile(notDir, nil, 0o600)
	base := "0 128 clone " + f.md + " " + f.dst + " " + f.src
	tests := []struct{ line, want string }{
		{"0 128 clone a b c", "Invalid number of arguments"},
		{"0 128 clone " + notDir + " " + f.dst + " " + f.src + " 8", "Error opening metadata device"},
		{"0 128 clone /nonexistent/dir/md " + f.dst + " " + f.src + " 8", "Error opening metadata device"},
		{"0 128 clone " + f.md + " /nonexistent " + f.src + " 8", "Error opening destination device"},
		{"0 128 clone " + f.md + " " + small + " " + f.src + " 8", "Device size larger than destination device"},
		{"0 128 clone " + f.md + " " + f.dst + " /nonexistent 8", "Error opening source device"},
		{"0 128 clone " + f.md + " " + f.dst + " " + small + " 8", "Device size larger than source device"},
		{base + " x", "Invalid region size"},
		{base + " 4", "Invalid region size"},
		{base + " 4194304", "Invalid region size"},
		{base + " 24", "Region size is not a power of 2"},
		{base + " 8 5 no_hydration no_discard_passdown no_read_hints auto_linear no_hydration", "Invalid number of feature arguments"},
		{base + " 8 2 no_hydration", "Invalid number of feature arguments"},
		{base + " 8 1 bogus", "Invalid feature argument"},
		{base + " 8 0 8 a 1 b 2 c 3 d 4", "Invalid number of core arguments"},
		{base + " 8 0 2 hydration_rate -5", "Invalid value for argument `hydration_rate'"},
		{base + " 8 0 3 hydration_threshold 1 x", "Number of core arguments must be even"},
		{base + " 8 0 2 hydration_threshold -1", "Invalid value for argument `hydration_threshold'"},
		{base + " 8 0 2 hydration_batch_size 4294967296", "Invalid value for argument `hydration_batch_size'"},
		{base + " 8 0 2 bogus 1", "Invalid core argument"},
		{base + " 8 0 0 extra", "Invalid number of arguments"},
	}
	for _, tc := range tests {
		tb, err := ParseTable(tc.line)
		if err != nil {
			t.Fatalf("%q: %v", tc.line, err)
		}
		tg, err := Build(context.Background(), tb, Env{})
		if err == nil {
			tg.Close()
			t.Errorf("%q: built, want %q", tc.line, tc.want)
			continue
		}
		var dm *DMError
		if !errors.As(err, &dm) || dm.Msg != tc.want && !strings.HasPrefix(dm.Msg, tc.want) {
			t.Errorf("%q: error %q, want %q", tc.line, err, tc.want)
		}
	}
	if _, err := os.Stat(f.md); err == nil {
		t.Fatal("a failed constructor formatted the metadata directory")
	}
}

func TestTooManyRegions(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big")
	os.WriteFile(big, nil, 0o600)
	size := int64(1<<31+1) * 4096
	if err := os.Truncate(big, size); err != nil {
		t.Skip("sparse 8 TiB file not possible here:", err)
	}
	line := "0 " + strconv.FormatInt(size/512, 10) + " clone " + filepath.Join(dir, "md") + " " + big + " " + big + " 8"
	tb, _ := ParseTable(line)
	_, err := Build(context.Background(), tb, Env{})
	var dm *DMError
	if !errors.As(err, &dm) || dm.Msg != "Too many regions. Consider increasing the region size" {
		t.Fatalf("err = %v", err)
	}
}

func TestMetadataMismatchAndLock(t *testing.T) {
	f := newFixture(t, 64<<10, 2)
	c := f.build(t, 8, "")
	// The store is locked while the clone is open.
	tb, _ := ParseTable(f.line(8, ""))
	_, err := Build(context.Background(), tb, Env{})
	var dm *DMError
	if !errors.As(err, &dm) || dm.Msg != "Failed to load metadata" {
		t.Fatalf("second open: %v", err)
	}
	c.Suspend(context.Background())
	c.Close()
	tb, _ = ParseTable(f.line(16, ""))
	_, err = Build(context.Background(), tb, Env{})
	if err == nil || !strings.Contains(err.Error(), "Region and/or target size don't match the ones in metadata") {
		t.Fatalf("other region size: %v", err)
	}
}

func TestStatusLine(t *testing.T) {
	f := newFixture(t, 64<<20, 3) // dm-clone's reference: 64 MiB, 4 KiB regions
	c := f.build(t, 8, "1 no_hydration")
	want := "8 1/2 8 0/16384 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw"
	if got := c.Status(); got != want {
		t.Fatalf("status\n got %q\nwant %q", got, want)
	}
	if got := c.Table(); got != f.md+" "+f.dst+" "+f.src+" 8 1 no_hydration" {
		t.Fatalf("table %q", got)
	}
	for _, m := range [][]string{{"hydration_threshold", "7"}, {"HYDRATION_BATCH_SIZE", "3"}, {"enable_hydration"}, {"disable_hydration"}} {
		if err := c.Message(context.Background(), m); err != nil {
			t.Fatalf("message %v: %v", m, err)
		}
	}
	// Between enable_hydration and disable_hydration the sweep may copy
	// a few regions: the counts are not compared.
	after := regexp.MustCompile(`^8 [12]/2 8 \d+/16384 0 1 no_hydration 4 hydration_threshold 7 hydration_batch_size 3 rw$`)
	if got := c.Status(); !after.MatchString(got) {
		t.Fatalf("status after messages\n got %q\nwant %s", got, after)
	}
	bad := map[string][]string{
		"Invalid argument":          {},
		"Unsupported message `foo'": {"foo"},
	}
	for msg, args := range bad {
		var dm *DMError
		if err := c.Message(context.Background(), args); !errors.As(err, &dm) || dm.Msg != msg {
			t.Errorf("message %v: %v, want %q", args, err, msg)
		}
	}
	for _, args := range [][]string{{"hydration_threshold"}, {"hydration_threshold", "x"}, {"hydration_batch_size", "-1"}, {"hydration_threshold", "1", "2"}} {
		if err := c.Message(context.Background(), args); err == nil {
			t.Errorf("message %v accepted", args)
		}
	}
	if got := c.Table(); !strings.HasSuffix(got, "8 1 no_hydration") {
		t.Fatalf("messages must not change the table: %q", got)
	}
}

func TestLinear(t *testing.T) {
	f := newFixture(t, 64<<10, 4)
	tb, _ := ParseTable("0 64 linear " + f.src + " 8")
	tg, err := Build(context.Background(), tb, Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	p := make([]byte, 512)
	if err := tg.ReadAt(context.Background(), p, 512); err != nil {
		t.Fatal(err)
	}
	if string(p) != string(f.srcData[8*512+512:8*512+1024]) {
		t.Fatal("linear maps at the wrong offset")
	}
	if err := tg.ReadAt(context.Background(), p, 64*512-256); !errors.Is(err, ErrRange) {
		t.Fatalf("read past the end: %v", err)
	}
	if tg.Table() != f.src+" 8" || tg.Status() != "" {
		t.Fatalf("table %q status %q", tg.Table(), tg.Status())
	}
	for line, want := range map[string]string{
		"0 64 linear " + f.src:         "Invalid argument count",
		"0 64 linear " + f.src + " x":  "Invalid device sector",
		"0 64 linear /nonexistent 0":   "Device lookup failed",
		"0 200 linear " + f.src + " 0": "too small for target",
	} {
		tb, _ := ParseTable(line)
		_, err := Build(context.Background(), tb, Env{})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", line, err, want)
		}
	}
}

func TestParseTable(t *testing.T) {
	for _, bad := range []string{"", "0 8", "1 8 linear x 0", "0 0 linear x 0", "0 x linear", "0 8 linear a 0\n0 8 linear b 0"} {
		if _, err := ParseTable(bad); !errors.Is(err, ErrTable) {
			t.Errorf("ParseTable(%q) = %v, want ErrTable", bad, err)
		}
	}
	tb, err := ParseTable("  0 16 clone a b c 8  ")
	if err != nil || tb.String() != "0 16 clone a b c 8" || tb.Bytes() != 8192 {
		t.Fatalf("%v %q", err, tb.String())
	}
}

func TestMetadataOfAnotherDestination(t *testing.T) {
	f := newFixture(t, 64<<10, 3)
	c := f.build(t, 8, "1 no_hydration")
	c.Suspend(context.Background())
	c.Close()
	other := filepath.Join(f.dir, "other.img")
	if err := os.WriteFile(other, make([]byte, f.size), 0o600); err != nil {
		t.Fatal(err)
	}
	line := strings.Replace(f.line(8, "1 no_hydration"), f.dst, other, 1)
	tb, err := ParseTable(line)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Build(context.Background(), tb, Env{})
	var dm *DMError
	if !errors.As(err, &dm) || dm.Msg != "Failed to load metadata" || !strings.Contains(err.Error(), "made for another destination device") {
		t.Fatalf("metadata of another destination: %v", err)
	}
	// The right destination still opens it.
	f.build(t, 8, "1 no_hydration")
}
