package e2e

import (
	"fmt"
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
)

// barRE is the progress bar's text: percent, rate, ETA.
var barRE = regexp.MustCompile(`c \[[= ]+\]\s+(\d+\.\d)%\s+(\S+) MiB/s\s+ETA (\S+)`)

// TestWatchProgressBarETA draws `nbdclone status NAME --watch` in a real
// terminal (tmux, 120x20) over a hydration throttled to 4 MiB/s (64 MiB:
// about 16 s): the bar shows percent, rate and ETA; an ETA read after 5 s
// is within 30% of the time the hydration really took from then; the bar
// ends at 100% with ETA 0s and the command exits 0. (The bar shows whole
// seconds and the throttle starts with a quarter second of burst: a long
// enough remainder keeps both small next to the 30%.)
func TestWatchProgressBarETA(t *testing.T) {
	tmux := testutil.NeedTool(t, "tmux")
	d := harness.Serve(t)
	const size = 64 << 20
	makeSource(t, d.Dir, 21, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table",
		"0 131072 clone ./md ./dest.img ./src.img 8 1 no_hydration 4 hydration_batch_size 16 hydration_rate 4194304")

	sock := filepath.Join(testutil.ShortDir(t), "tmux")
	tm := func(args ...string) string {
		t.Helper()
		return run(t, tmux, append([]string{"-S", sock}, args...)...)
	}
	script := fmt.Sprintf("cd %s && %s=%s %s status c --watch; echo EXIT=$?; sleep 600",
		d.Dir, daemon.ControlEnv, d.Control, d.Bin)
	tm("new-session", "-d", "-s", "watch", "-x", "120", "-y", "20", "sh", "-c", script)
	t.Cleanup(func() { exec.Command(tmux, "-S", sock, "kill-server").Run() })
	pane := func() string { return tm("capture-pane", "-p", "-t", "watch") }

	waitFor(t, time.Minute, "the bar, hydration disabled", func() bool {
		return strings.Contains(pane(), "[hydration disabled]")
	})
	cli(t, d, "message", "c", "0", "enable_hydration")
	enabled := time.Now()

	var (
		eta     time.Duration
		sampled time.Time
		screen  string
	)
	waitFor(t, time.Minute, "an ETA 5 s into the hydration", func() bool {
		screen = pane()
		m := barRE.FindStringSubmatch(screen)
		if m == nil || time.Since(enabled) < 5*time.Second {
			return false
		}
		e, err := time.ParseDuration(m[3])
		if err != nil {
			return false // "--": not known yet
		}
		eta, sampled = e, time.Now()
		if pct, _ := strconv.ParseFloat(m[1], 64); pct <= 0 || pct >= 100 {
			t.Errorf("percent %v midway", pct)
		}
		if rate, err := strconv.ParseFloat(m[2], 64); err != nil || rate <= 0 {
			t.Errorf("rate %q midway", m[2])
		}
		return true
	})
	waitFor(t, time.Minute, "hydration to complete", func() bool {
		return cloneInfo(t, d, "c").Hydrated
	})
	took := time.Since(sampled)
	t.Logf("bar at %v: %q; ETA %v, really %v", sampled.Sub(enabled).Round(time.Millisecond),
		barRE.FindString(screen), eta, took.Round(time.Millisecond))
	if diff := (eta - took).Abs(); diff > took*3/10 {
		t.Errorf("ETA %v, but hydration took %v more (off by %v, over 30%%)", eta, took, diff)
	}
	for _, line := range strings.Split(screen, "\n") {
		if len([]rune(line)) > 120 {
			t.Errorf("a line wider than the terminal: %q", line)
		}
	}
	waitFor(t, time.Minute, "the final bar and exit 0", func() bool {
		return strings.Contains(pane(), "EXIT=0")
	})
	final := pane()
	if !regexp.MustCompile(`c \[=+\]\s+100\.0%\s+\S+ MiB/s\s+ETA 0s`).MatchString(final) {
		t.Errorf("final screen:\n%s", final)
	}
}
