package e2e

import (
	"bufio"
	"io"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
)

// serveWithMetrics starts a daemon with a metrics listener on a free
// loopback port and returns it with its /metrics URL (from its log).
func serveWithMetrics(t *testing.T, extra ...string) (*harness.Daemon, string) {
	t.Helper()
	d := harness.Serve(t, append([]string{"--metrics", "tcp:127.0.0.1:0"}, extra...)...)
	return d, fromLog(t, d, `metrics=(http://127\.0\.0\.1:\d+/metrics)`, "the metrics address")
}

// fromLog waits for the daemon's log to match pattern and returns the
// first submatch: an address it chose, say.
func fromLog(t *testing.T, d *harness.Daemon, pattern, what string) string {
	t.Helper()
	re := regexp.MustCompile(pattern)
	var got string
	waitFor(t, 30*time.Second, what+" in the daemon's log", func() bool {
		m := re.FindStringSubmatch(d.Log())
		if m != nil {
			got = m[1]
		}
		return m != nil
	})
	return got
}

// metricsScrape is one /metrics read: series (`name{label="v",...}`, labels
// sorted) to value, and the HELP text of each family.
type metricsScrape struct {
	series map[string]float64
	help   map[string]string
}

var seriesRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$`)
var labelRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

func scrapeMetrics(t testing.TB, url string) metricsScrape {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("scrape %s: %s\n%s", url, resp.Status, b)
	}
	s := metricsScrape{series: map[string]float64{}, help: map[string]string{}}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "# HELP "); ok {
			name, text, _ := strings.Cut(rest, " ")
			s.help[name] = text
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		m := seriesRE.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("unparsable metrics line %q", line)
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		var labels []string
		for _, l := range labelRE.FindAllStringSubmatch(m[2], -1) {
			labels = append(labels, l[1]+"="+l[2])
		}
		s.series[seriesKey(m[1], labels...)] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return s
}

func seriesKey(name string, labels ...string) string {
	sort.Strings(labels)
	return name + "{" + strings.Join(labels, ",") + "}"
}

// get is a series' value; labels are "k=v". Missing fails the test.
func (s metricsScrape) get(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	v, ok := s.series[seriesKey(name, labels...)]
	if !ok {
		t.Fatalf("metrics lack %s", seriesKey(name, labels...))
	}
	return v
}

// has reports whether a series exists.
func (s metricsScrape) has(name string, labels ...string) bool {
	_, ok := s.series[seriesKey(name, labels...)]
	return ok
}

// families is every metric family name present (histogram series folded
// into their family).
func (s metricsScrape) families() map[string]bool {
	out := map[string]bool{}
	for k := range s.series {
		name, _, _ := strings.Cut(k, "{")
		out[name] = true
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suf); ok {
				out[base] = true
			}
		}
	}
	return out
}
