package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/target"
)

func runCLI(t *testing.T, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	e := &env{
		stdin:  strings.NewReader(stdin),
		stdout: &out,
		stderr: &errOut,
		getenv: func(k string) string {
			if k == "NBDCLONE_CONTROL" {
				return "/nonexistent/nbdclone-test/control.sock"
			}
			return ""
		},
		getwd: func() (string, error) { return "/work", nil },
	}
	code = run(context.Background(), args, e)
	return out.String(), errOut.String(), code
}

func TestHelp(t *testing.T) {
	out, _, code := runCLI(t, "", "help")
	if code != 0 {
		t.Fatalf("help: exit %d", code)
	}
	for _, cmd := range []string{"serve", "create", "load", "suspend", "resume", "message", "status", "table", "remove", "ls", "wait"} {
		if !strings.Contains(out, "\n  "+cmd+" ") {
			t.Errorf("help does not list %s", cmd)
		}
		sub, _, code := runCLI(t, "", cmd, "--help")
		if code != 0 || !strings.Contains(sub, "Usage:\n  nbdclone "+cmd) || !strings.Contains(sub, "Examples:") {
			t.Errorf("%s --help: exit %d\n%s", cmd, code, sub)
		}
	}
	if strings.Contains(out, "completion") {
		t.Error("help lists the completion command")
	}
	// The environment sets the default control socket.
	if !strings.Contains(out, `(default "/nonexistent/nbdclone-test/control.sock")`) {
		t.Errorf("help does not show $NBDCLONE_CONTROL as the default:\n%s", out)
	}
}

func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		stdin  string
		stderr string
	}{
		{[]string{"create"}, "", "nbdclone: create: want NAME\nRun 'nbdclone create --help' for usage.\n"},
		{[]string{"create", "a", "b"}, "", "nbdclone: create: want NAME\nRun 'nbdclone create --help' for usage.\n"},
		{[]string{"create", "a"}, "", "nbdclone: create: no table: give --table LINE or pipe the table line on stdin\nRun 'nbdclone create --help' for usage.\n"},
		{[]string{"message", "a", "0"}, "", "nbdclone: message: want NAME SECTOR ARGS...\nRun 'nbdclone message --help' for usage.\n"},
		{[]string{"status", "-o", "yaml"}, "", "nbdclone: status: unknown output format \"yaml\" (want text or json)\nRun 'nbdclone status --help' for usage.\n"},
		{[]string{"ls", "--bogus"}, "", "nbdclone: unknown flag: --bogus\nRun 'nbdclone ls --help' for usage.\n"},
		{[]string{"bogus"}, "", "nbdclone: unknown command \"bogus\" for \"nbdclone\"\n"},
		{[]string{"serve", "--log-level", "loud"}, "", "nbdclone: serve: unknown log level \"loud\" (want debug, info, warn or error)\nRun 'nbdclone serve --help' for usage.\n"},
		{[]string{"serve", "--listen", "udp:x:1"}, "", "nbdclone: daemon: invalid request: config: listen address \"udp:x:1\": unknown network \"udp\" (want unix or tcp)\n"},
		// Message arguments that look like flags are arguments.
		{[]string{"message", "a", "0", "hydration_threshold", "-1"}, "", "nbdclone: cannot reach the nbdclone daemon at /nonexistent/nbdclone-test/control.sock: is `nbdclone serve` running?\n"},
		{[]string{"create", "a"}, "0 8 linear x 0\n", "nbdclone: cannot reach the nbdclone daemon at /nonexistent/nbdclone-test/control.sock: is `nbdclone serve` running?\n"},
	} {
		stdout, stderr, code := runCLI(t, tc.stdin, tc.args...)
		if code != 1 || stdout != "" || stderr != tc.stderr {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit 1, stderr %q", tc.args, code, stdout, stderr, tc.stderr)
		}
	}
}

func cloneInfo(hydrated, regions uint64) target.Info {
	return target.Info{Type: "clone", Size: int64(regions) * 4096, Clone: &target.CloneInfo{
		RegionSize: 4096, Regions: regions, HydratedRegions: hydrated, Hydrated: hydrated == regions,
	}}
}

func TestProgressLines(t *testing.T) {
	var out bytes.Buffer
	now := time.Unix(1000, 0)
	p := newProgress("c", &out, false, 80, func() time.Time { return now })
	const regions = 1 << 20 // 4 GiB
	p.update(cloneInfo(0, regions))
	for i := 1; i <= 20; i++ {
		now = now.Add(time.Second)
		p.update(cloneInfo(uint64(i)*2560, regions)) // 10 MiB/s
	}
	p.finish(cloneInfo(regions, regions))
	want := "c:   0.0% hydrated (0/1048576 regions), -- MiB/s, ETA --\n" +
		"c:   1.2% hydrated (12800/1048576 regions), 10.0 MiB/s, ETA 6m45s\n" +
		"c:   2.4% hydrated (25600/1048576 regions), 10.0 MiB/s, ETA 6m40s\n" +
		"c:   3.7% hydrated (38400/1048576 regions), 10.0 MiB/s, ETA 6m35s\n" +
		"c:   4.9% hydrated (51200/1048576 regions), 10.0 MiB/s, ETA 6m30s\n" +
		"c: hydrated (1048576/1048576 regions)\n"
	if out.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", out.String(), want)
	}
}

func TestProgressBar(t *testing.T) {
	var out bytes.Buffer
	now := time.Unix(1000, 0)
	p := newProgress("c", &out, true, 60, func() time.Time { return now })
	p.update(cloneInfo(0, 100))
	now = now.Add(time.Second)
	p.update(cloneInfo(50, 100))
	p.finish(cloneInfo(100, 100))
	frames := strings.Split(out.String(), "\r\x1b[K")
	if len(frames) != 4 || frames[0] != "" {
		t.Fatalf("frames %q", frames)
	}
	for _, f := range frames[1:] {
		if l := len(strings.TrimSuffix(f, "\n")); l > 60 {
			t.Errorf("frame %q is %d columns wide", f, l)
		}
	}
	if want := "c [==============               ]  50.0%  0.2 MiB/s  ETA 1s"; frames[2] != want {
		t.Errorf("frame %q, want %q", frames[2], want)
	}
	if !strings.HasSuffix(frames[3], " 100.0%  0.2 MiB/s  ETA 0s\n") || !strings.Contains(frames[3], "["+strings.Repeat("=", 29)+"]") {
		t.Errorf("last frame %q", frames[3])
	}
}

func TestPrintList(t *testing.T) {
	var out bytes.Buffer
	printList(&out, []daemon.Device{
		{Name: "a", State: daemon.StateActive, Connections: 2, URIs: []string{"nbd+unix:///a?socket=/s", "nbd://localhost:10809/a"}},
		{Name: "broken", State: daemon.StateFailed, Error: "Device lookup failed", URIs: []string{"nbd+unix:///broken?socket=/s"}},
	})
	want := "NAME    EXPORT                        STATE   CONNECTIONS  ERROR\n" +
		"a       nbd+unix:///a?socket=/s       active  2\n" +
		"broken  nbd+unix:///broken?socket=/s  failed  0            Device lookup failed\n"
	if out.String() != want {
		t.Errorf("got:\n%q\nwant:\n%q", out.String(), want)
	}
	out.Reset()
	printList(&out, nil)
	if out.String() != "No devices found\n" {
		t.Errorf("empty: %q", out.String())
	}
}
