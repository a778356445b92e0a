package e2e

import (
	"encoding/json"
	"path/filepath"
	"regexp"
	"slices"
	"testing"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// nbdinfoJSON is what `nbdinfo --json` prints.
type nbdinfoJSON struct {
	Protocol string           `json:"protocol"`
	Exports  []map[string]any `json:"exports"`
}

// TestNbdinfoExport: a clone export tells NBD clients its size and that it
// takes every command the target implements (flush, FUA, trim, write
// zeroes, cache) over many connections, writable; `nbdinfo --list` lists
// every device by name, clones and linear alike.
func TestNbdinfoExport(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	d := harness.Serve(t)
	const size = 64 << 20
	makeSource(t, d.Dir, 1, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest2.img"), 32<<20)
	harness.MakeImage(t, filepath.Join(d.Dir, "plain.img"), 8<<20)
	cli(t, d, "create", "clone", "--table", "0 131072 clone ./md ./dest.img ./src.img 8 1 no_hydration")
	cli(t, d, "create", "half", "--table", "0 65536 clone ./md2 ./dest2.img ./src.img 128")
	cli(t, d, "create", "plain", "--table", "0 16384 linear ./plain.img 0")

	var info nbdinfoJSON
	if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--json", d.URI("clone"))), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %d exports: %+v", len(info.Exports), info)
	}
	ex := info.Exports[0]
	if ex["export-name"] != "clone" {
		t.Errorf("export-name %v", ex["export-name"])
	}
	if ex["export-size"] != float64(size) {
		t.Errorf("export-size %v, want %d", ex["export-size"], size)
	}
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_multi_conn"} {
		if ex[k] != true {
			t.Errorf("%s = %v, want true", k, ex[k])
		}
	}
	if ex["is_read_only"] != false {
		t.Errorf("is_read_only = %v, want false", ex["is_read_only"])
	}

	var list nbdinfoJSON
	if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--list", "--json", "nbd+unix://?socket="+d.NBD)), &list); err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, e := range list.Exports {
		name, _ := e["export-name"].(string)
		sz, _ := e["export-size"].(float64)
		got[name] = sz
	}
	want := map[string]float64{"clone": size, "half": 32 << 20, "plain": 8 << 20}
	if len(got) != len(want) {
		t.Errorf("nbdinfo --list: %v, want %v", got, want)
	}
	for name, sz := range want {
		if got[name] != sz {
			t.Errorf("nbdinfo --list: export %q size %v, want %v (all: %v)", name, got[name], sz, got)
		}
	}

	// The plain-text listing names each one too.
	text := run(t, "nbdinfo", "--list", "nbd+unix://?socket="+d.NBD)
	for name := range want {
		if !slices.Contains(exportNames(text), name) {
			t.Errorf("nbdinfo --list does not name %q:\n%s", name, text)
		}
	}

	// Removing a device removes its export.
	cli(t, d, "remove", "half")
	list = nbdinfoJSON{}
	if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--list", "--json", "nbd+unix://?socket="+d.NBD)), &list); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range list.Exports {
		names = append(names, e["export-name"].(string))
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"clone", "plain"}) {
		t.Errorf("after remove, nbdinfo --list: %v", names)
	}
}

var exportLineRE = regexp.MustCompile(`(?m)^export="([^"]*)":$`)

// exportNames picks `export="NAME":` lines out of nbdinfo --list.
func exportNames(text string) []string {
	var names []string
	for _, m := range exportLineRE.FindAllStringSubmatch(text, -1) {
		names = append(names, m[1])
	}
	return names
}

// TestListenerExportAllowlist: a listener given "?exports=A,B" lists and
// opens only those exports (nbdinfo, qemu-io); the default listener still
// serves every device; `ls` URIs name only listeners that serve the device.
func TestListenerExportAllowlist(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	testutil.NeedTool(t, "qemu-io")
	limited := filepath.Join(testutil.ShortDir(t), "tenant.sock")
	d := harness.Serve(t, "--listen", "unix:"+limited+"?exports=a")
	for _, name := range []string{"a", "b"} {
		harness.MakeImage(t, filepath.Join(d.Dir, name+".img"), 8<<20)
		cli(t, d, "create", name, "--table", "0 16384 linear ./"+name+".img 0")
	}
	list := func(sock string) []string {
		var l nbdinfoJSON
		if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--list", "--json", "nbd+unix://?socket="+sock)), &l); err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range l.Exports {
			names = append(names, e["export-name"].(string))
		}
		slices.Sort(names)
		return names
	}
	if got := list(limited); !slices.Equal(got, []string{"a"}) {
		t.Errorf("limited listener lists %v, want [a]", got)
	}
	if got := list(d.NBD); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("default listener lists %v, want [a b]", got)
	}
	qemuIO(t, "nbd+unix:///a?socket="+limited, "write -P 7 0 4k")
	if out, err := runErr("qemu-io", "-f", "raw", "-c", "read 0 4k", "nbd+unix:///b?socket="+limited); err == nil {
		t.Errorf("export b opened on a listener that does not serve it:\n%s", out)
	}
	qemuIO(t, "nbd+unix:///b?socket="+d.NBD, "read 0 4k")
	if got, want := lsDevice(t, d, "a").URIs, []string{"nbd+unix:///a?socket=" + d.NBD, "nbd+unix:///a?socket=" + limited}; !slices.Equal(got, want) {
		t.Errorf("ls -o json: a at %v, want %v", got, want)
	}
	if got, want := lsDevice(t, d, "b").URIs, []string{"nbd+unix:///b?socket=" + d.NBD}; !slices.Equal(got, want) {
		t.Errorf("ls -o json: b at %v, want %v", got, want)
	}
}
