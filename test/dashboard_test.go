package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"testing"
)

// dashboard is the part of a Grafana dashboard the tests read.
type dashboard struct {
	Title      string `json:"title"`
	UID        string `json:"uid"`
	Templating struct {
		List []struct {
			Name string `json:"name"`
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		ID      int    `json:"id"`
		Type    string `json:"type"`
		Title   string `json:"title"`
		GridPos struct {
			H, W, X, Y int
		} `json:"gridPos"`
		Targets []struct {
			Expr  string `json:"expr"`
			RefID string `json:"refId"`
		} `json:"targets"`
	} `json:"panels"`
}

func dashboardPath() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "scripts", "grafana-dashboard.json")
}

// loadDashboard parses scripts/grafana-dashboard.json and checks its
// shape: a uid, the datasource and device variables, unique panel ids,
// panels inside the 24-column grid, a query in every panel.
func loadDashboard(t testing.TB) dashboard {
	t.Helper()
	raw, err := os.ReadFile(dashboardPath())
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("dashboard uid %q, title %q", d.UID, d.Title)
	}
	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		vars[v.Name] = true
	}
	if !vars["datasource"] || !vars["device"] {
		t.Errorf("dashboard variables %v: want datasource and device", vars)
	}
	ids := map[int]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.X < 0 || p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 || p.GridPos.H <= 0 {
			t.Errorf("panel %q outside the grid: %+v", p.Title, p.GridPos)
		}
		if p.Type != "row" && (len(p.Targets) == 0 || p.Targets[0].Expr == "") {
			t.Errorf("panel %q has no query", p.Title)
		}
	}
	return d
}

var metricNameRE = regexp.MustCompile(`\bnbdclone_[a-z_]+\b`)

// dashboardMetrics are the metric names the dashboard's queries use.
func dashboardMetrics(d dashboard) []string {
	seen := map[string]bool{}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			for _, m := range metricNameRE.FindAllString(tg.Expr, -1) {
				seen[m] = true
			}
		}
	}
	var out []string
	for m := range seen {
		out = append(out, m)
	}
	sort.Strings(out)
	return out
}

// TestGrafanaDashboardShape: the dashboard parses, is well formed and
// queries nbdclone's metrics (TestMetricsFollowHydration checks each one
// exists in a real scrape).
func TestGrafanaDashboardShape(t *testing.T) {
	d := loadDashboard(t)
	if n := len(dashboardMetrics(d)); n < 20 {
		t.Errorf("the dashboard uses %d metrics", n)
	}
}

// checkDashboardMetrics: every metric the dashboard queries is in the
// scrape s (series names, so a histogram's _bucket counts).
func checkDashboardMetrics(t testing.TB, s metricsScrape) {
	t.Helper()
	names := map[string]bool{}
	for k := range s.series {
		name, _, _ := cutLabels(k)
		names[name] = true
	}
	for _, m := range dashboardMetrics(loadDashboard(t)) {
		if !names[m] {
			t.Errorf("the Grafana dashboard queries %s, which the daemon does not export", m)
		}
	}
}

func cutLabels(series string) (name, labels string, ok bool) {
	for i := range series {
		if series[i] == '{' {
			return series[:i], series[i:], true
		}
	}
	return series, "", false
}
