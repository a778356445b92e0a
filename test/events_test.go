package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/internal/harness"
)

// TestEventsCommand: `nbdclone events` (NDJSON for one device, text for
// all) receives a clone's life in order: create, hydration complete,
// suspend/resume, a table swap (load, then resume: suspended, swapped,
// resumed), remove; both exit by themselves on --until. `status --watch`
// with stdout not a terminal prints plain lines and ends when hydrated.
func TestEventsCommand(t *testing.T) {
	d, url := serveWithMetrics(t)
	const size = 4 << 20
	makeSource(t, d.Dir, 5, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)

	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	start := func(args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
		cmd := exec.CommandContext(ctx, d.Bin, args...)
		cmd.Dir = d.Dir
		cmd.Env = harness.Env(daemon.ControlEnv + "=" + d.Control)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		startProc(t, cmd)
		return cmd, &stdout, &stderr
	}
	jsonCmd, jsonOut, jsonErr := start("events", "c", "-o", "json", "--until", "removed")
	textCmd, textOut, textErr := start("events", "--until", "removed")
	waitFor(t, time.Minute, "both event streams subscribed", func() bool {
		return scrapeMetrics(t, url).get(t, "nbdclone_event_subscribers") == 2
	})

	cli(t, d, "create", "c", "--table", "0 8192 clone ./md ./dest.img ./src.img 8")
	watched := cli(t, d, "status", "c", "--watch")
	if !strings.HasSuffix(watched, "c: hydrated (1024/1024 regions)\n") {
		t.Errorf("status --watch without a terminal printed %q", watched)
	}
	// The hydrated event comes from the clone's watcher: let it land
	// before the next step, so the order is fixed.
	waitFor(t, time.Minute, "the hydrated event", func() bool {
		return scrapeMetrics(t, url).get(t, "nbdclone_events_total", "type=hydrated") == 1
	})
	cli(t, d, "suspend", "c")
	cli(t, d, "resume", "c")
	cli(t, d, "load", "c", "--table", "0 8192 linear ./dest.img 0")
	cli(t, d, "resume", "c")
	cli(t, d, "remove", "c")

	for _, c := range []*exec.Cmd{jsonCmd, textCmd} {
		if err := c.Wait(); err != nil {
			t.Fatalf("%v: %v\nstderr: %s%s", c.Args, err, jsonErr, textErr)
		}
	}
	want := []string{"created", "hydrated", "suspended", "resumed", "loaded", "suspended", "swapped", "resumed", "suspended", "removed"}
	var got []string
	var lastSeq uint64
	for _, line := range strings.Split(strings.TrimSpace(jsonOut.String()), "\n") {
		var ev daemon.Event
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("events -o json line %q: %v", line, err)
		}
		if ev.Device != "c" || ev.Seq <= lastSeq || ev.Time.IsZero() || time.Since(ev.Time) > time.Hour {
			t.Errorf("event %+v after seq %d", ev, lastSeq)
		}
		lastSeq = ev.Seq
		got = append(got, ev.Kind)
		switch ev.Kind {
		case "swapped":
			if !strings.Contains(ev.Table, " linear ") {
				t.Errorf("swapped to %q, want the linear table", ev.Table)
			}
		case "hydrated":
			if ev.Detail != "1024 regions" {
				t.Errorf("hydrated detail %q", ev.Detail)
			}
		}
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("events -o json: %q\nwant %q", got, want)
	}
	lineRE := regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} ([a-z_]+) c(: .+)?$`)
	got = nil
	for _, line := range strings.Split(strings.TrimSpace(textOut.String()), "\n") {
		m := lineRE.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("events line %q does not match %s", line, lineRE)
		}
		got = append(got, m[1])
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("events: %q\nwant %q", got, want)
	}
	if n := scrapeMetrics(t, url).get(t, "nbdclone_event_subscribers"); n != 0 {
		t.Errorf("%v subscribers left after both exited", n)
	}
}
