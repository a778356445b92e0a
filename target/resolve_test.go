package target

import (
	"slices"
	"strings"
	"testing"
)

// TestResolve: a table's path arguments (a clone's metadata, destination
// and local source, a linear target's device) come out absolute against
// the CLI's directory and cleaned; URIs, every other argument and every
// other target type stay exactly as written, and short argument lists are
// left for the constructor to refuse.
func TestResolve(t *testing.T) {
	const dir = "/home/u/work"
	tests := []struct {
		name      string
		typ, dir  string
		args      string // space-separated; "" is none
		wantArgs  string
		wantTable string // when set, the whole Table.String
	}{
		{name: "clone relative", typ: "clone", dir: dir,
			args:     "md dest.img src.img 8",
			wantArgs: "/home/u/work/md /home/u/work/dest.img /home/u/work/src.img 8"},
		{name: "clone dot slash and trailing slash", typ: "clone", dir: dir,
			args:     "./md/ ./dest.img ./src.img 8 1 no_hydration",
			wantArgs: "/home/u/work/md /home/u/work/dest.img /home/u/work/src.img 8 1 no_hydration"},
		{name: "clone absolute kept", typ: "clone", dir: dir,
			args:     "/var/md /dev/sdb /dev/sdc 8",
			wantArgs: "/var/md /dev/sdb /dev/sdc 8"},
		// Absolute paths stay as written: lexical cleaning of "a/../b"
		// could name another file than the kernel opens through a symlink.
		{name: "clone absolute kept as written", typ: "clone", dir: dir,
			args:     "/var//lib/./md/ /dev/../dev/sdb /srv/a/../src.img 8",
			wantArgs: "/var//lib/./md/ /dev/../dev/sdb /srv/a/../src.img 8"},
		{name: "clone dot dot", typ: "clone", dir: dir,
			args:     "../md sub/../dest.img ../../../../src.img 8",
			wantArgs: "/home/u/md /home/u/work/dest.img /src.img 8"},
		{name: "clone dir is root", typ: "clone", dir: "/",
			args:     "md ./dest.img ../src.img 8",
			wantArgs: "/md /dest.img /src.img 8"},
		{name: "clone URI source", typ: "clone", dir: dir,
			args:     "md dest.img nbd://backup:10809/disk 8",
			wantArgs: "/home/u/work/md /home/u/work/dest.img nbd://backup:10809/disk 8"},
		{name: "clone unix URI source", typ: "clone", dir: dir,
			args:     "md dest.img nbd+unix:///disk?socket=/run/x/../nbd.sock 8",
			wantArgs: "/home/u/work/md /home/u/work/dest.img nbd+unix:///disk?socket=/run/x/../nbd.sock 8"},
		{name: "clone path with :// after a directory is a path", typ: "clone", dir: dir,
			args:     "md dest.img ./odd://name 8",
			wantArgs: "/home/u/work/md /home/u/work/dest.img /home/u/work/odd:/name 8"},
		{name: "clone other args verbatim", typ: "clone", dir: dir,
			args:     "md dest.img src.img 0008 2 NO_HYDRATION ./x/../y 4 Hydration_Threshold 010 hydration_batch_size ../z",
			wantArgs: "/home/u/work/md /home/u/work/dest.img /home/u/work/src.img 0008 2 NO_HYDRATION ./x/../y 4 Hydration_Threshold 010 hydration_batch_size ../z"},
		{name: "clone no dir: unchanged", typ: "clone", dir: "",
			args:     "./md/ a/../dest.img /srv//src.img 8",
			wantArgs: "./md/ a/../dest.img /srv//src.img 8"},
		{name: "clone no args", typ: "clone", dir: dir,
			args: "", wantArgs: ""},
		{name: "clone one arg", typ: "clone", dir: dir,
			args: "md", wantArgs: "/home/u/work/md"},
		{name: "clone two args", typ: "clone", dir: dir,
			args: "md ./dest.img", wantArgs: "/home/u/work/md /home/u/work/dest.img"},
		{name: "clone three args", typ: "clone", dir: dir,
			args: "md dest.img src.img", wantArgs: "/home/u/work/md /home/u/work/dest.img /home/u/work/src.img"},
		{name: "linear relative", typ: "linear", dir: dir,
			args: "./dest.img 0", wantArgs: "/home/u/work/dest.img 0"},
		{name: "linear offset verbatim", typ: "linear", dir: dir,
			args: "../disks/dest.img 02048", wantArgs: "/home/u/disks/dest.img 02048"},
		{name: "linear only arg 0 is a path", typ: "linear", dir: dir,
			args: "/dev//sdb ./x/../y", wantArgs: "/dev//sdb ./x/../y"},
		{name: "linear no args", typ: "linear", dir: dir,
			args: "", wantArgs: ""},
		{name: "linear one arg", typ: "linear", dir: dir,
			args: "dest.img", wantArgs: "/home/u/work/dest.img"},
		{name: "unknown type untouched", typ: "striped", dir: dir,
			args: "./a.img ../b.img /c//d", wantArgs: "./a.img ../b.img /c//d"},
		{name: "type is case-sensitive", typ: "Clone", dir: dir,
			args: "md dest.img src.img 8", wantArgs: "md dest.img src.img 8"},
		{name: "whole line", typ: "clone", dir: dir,
			args:      "md dest.img src.img 8",
			wantArgs:  "/home/u/work/md /home/u/work/dest.img /home/u/work/src.img 8",
			wantTable: "0 2048 clone /home/u/work/md /home/u/work/dest.img /home/u/work/src.img 8"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := Table{Start: 0, Length: 2048, Type: tc.typ, Args: strings.Fields(tc.args)}
			given := slices.Clone(in.Args)
			got := Resolve(in, tc.dir)
			if want := strings.Fields(tc.wantArgs); !slices.Equal(got.Args, want) {
				t.Errorf("args %q, want %q", got.Args, want)
			}
			if got.Start != in.Start || got.Length != in.Length || got.Type != in.Type {
				t.Errorf("Resolve changed the rest of the table: %+v from %+v", got, in)
			}
			if tc.wantTable != "" && got.String() != tc.wantTable {
				t.Errorf("table %q, want %q", got.String(), tc.wantTable)
			}
			// The caller's table is not modified (its Args are not shared).
			if !slices.Equal(in.Args, given) {
				t.Errorf("Resolve modified its input: %q, was %q", in.Args, given)
			}
			// A resolved table is canonical: resolving it again, from
			// anywhere, changes nothing (the daemon resolves a state
			// file's table again when it restores it).
			if tc.dir != "" {
				if again := Resolve(got, "/elsewhere"); !slices.Equal(again.Args, got.Args) {
					t.Errorf("resolving again gave %q, want %q", again.Args, got.Args)
				}
			}
		})
	}
}
