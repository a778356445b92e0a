package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/internal/rate"
	"github.com/nbdclone/nbdclone/target"
)

const (
	progressPoll = 250 * time.Millisecond
	// progressLineEvery paces progress lines when stdout is not a terminal.
	progressLineEvery = 5 * time.Second
)

// waitProgress long-polls Wait while polling the JSON status for a
// progress display.
func waitProgress(ctx context.Context, cl *daemon.Client, name string, out io.Writer, now func() time.Time) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		info target.Info
		err  error
	}
	done := make(chan result, 1)
	// Always received from below before returning.
	go func() {
		info, err := cl.Wait(ctx, name)
		done <- result{info, err}
	}()
	p := newProgress(name, out, isTerminal(out), terminalWidth(out, 80), now)
	tick := time.NewTicker(progressPoll)
	defer tick.Stop()
	for {
		select {
		case r := <-done:
			if r.err != nil {
				p.abort()
				return r.err
			}
			p.finish(r.info)
			return nil
		case <-tick.C:
			if st, err := cl.Info(ctx, name); err == nil && st.Info != nil {
				p.update(*st.Info)
			}
		}
	}
}

// progress renders hydration progress: a redrawn bar on a terminal, a line
// every progressLineEvery otherwise.
type progress struct {
	name string
	// showState adds why hydration waits (status --watch).
	showState bool
	out       io.Writer
	tty       bool
	width     int
	now       func() time.Time

	rate     *rate.Estimator // shared with the daemon's rate and ETA metrics
	lastLine time.Time
	drawn    bool // a bar is on screen without a newline
}

func newProgress(name string, out io.Writer, tty bool, width int, now func() time.Time) *progress {
	return &progress{name: name, out: out, tty: tty, width: width, now: now, rate: rate.New(rate.Window)}
}

func hydratedBytes(info target.Info) int64 {
	c := info.Clone
	if c == nil {
		return info.Size
	}
	return min(int64(c.HydratedRegions)*c.RegionSize, info.Size)
}

func (p *progress) update(info target.Info) {
	c := info.Clone
	if c == nil || c.Regions == 0 {
		return
	}
	t := p.now()
	p.rate.Add(t, hydratedBytes(info))
	if p.tty {
		p.drawBar(info)
		return
	}
	if p.lastLine.IsZero() || t.Sub(p.lastLine) >= progressLineEvery {
		p.lastLine = t
		fmt.Fprintln(p.out, p.line(info))
	}
}

func (p *progress) fraction(info target.Info) float64 {
	c := info.Clone
	if c == nil || c.Regions == 0 {
		return 1
	}
	return float64(c.HydratedRegions) / float64(c.Regions)
}

// stats is "12.3 MiB/s, ETA 1m20s" (or unknowns).
func (p *progress) stats(info target.Info) (rateText, eta string) {
	r := p.rate.Rate()
	if r < 0 {
		return "-- MiB/s", "--"
	}
	rateText = fmt.Sprintf("%.1f MiB/s", r/(1<<20))
	left, ok := p.rate.ETA(info.Size - hydratedBytes(info))
	if !ok {
		return rateText, "--"
	}
	return rateText, left.Round(time.Second).String()
}

// line is the non-terminal progress line.
func (p *progress) line(info target.Info) string {
	c := info.Clone
	rate, eta := p.stats(info)
	return fmt.Sprintf("%s: %5.1f%% hydrated (%d/%d regions), %s, ETA %s%s",
		p.name, 100*p.fraction(info), c.HydratedRegions, c.Regions, rate, eta, p.state(info))
}

func (p *progress) drawBar(info target.Info) {
	rate, eta := p.stats(info)
	frac := p.fraction(info)
	tail := fmt.Sprintf(" %5.1f%%  %s  ETA %s%s", 100*frac, rate, eta, p.state(info))
	barWidth := p.width - len(p.name) - len(tail) - 4
	bar := ""
	if barWidth >= 10 {
		filled := int(frac * float64(barWidth))
		bar = " [" + strings.Repeat("=", filled) + strings.Repeat(" ", barWidth-filled) + "]"
	}
	// \r and erase-line redraw in place.
	fmt.Fprintf(p.out, "\r\x1b[K%s%s%s", p.name, bar, tail)
	p.drawn = true
}

func (p *progress) finish(info target.Info) {
	c := info.Clone
	switch {
	case c == nil:
		p.abort()
		fmt.Fprintf(p.out, "%s: nothing to hydrate (%s table)\n", p.name, info.Type)
	case p.tty:
		p.drawBar(info)
		fmt.Fprintln(p.out)
		p.drawn = false
	default:
		fmt.Fprintf(p.out, "%s: hydrated (%d/%d regions)\n", p.name, c.HydratedRegions, c.Regions)
	}
}

// abort ends a bar line so what follows starts on its own line.
func (p *progress) abort() {
	if p.drawn {
		fmt.Fprintln(p.out)
		p.drawn = false
	}
}

// state is why hydration waits, for status --watch ("" otherwise).
func (p *progress) state(info target.Info) string {
	c := info.Clone
	if !p.showState || c == nil || c.Hydrated {
		return ""
	}
	switch {
	case c.Mode != "rw":
		return "  [metadata " + c.Mode + "]"
	case c.HydrationStopped != "":
		return "  [stopped on errors]"
	case !c.HydrationEnabled:
		return "  [hydration disabled]"
	case c.BackingOff:
		return "  [retrying after errors]"
	case c.BusyPaused:
		return "  [yielding to I/O]"
	}
	return ""
}

// watchProgress is status --watch: the progress display of waitProgress,
// from polls of the JSON status alone, until the clone is hydrated or ctx
// ends (Ctrl-C: a normal end). It never fails on the hydration's state.
func watchProgress(ctx context.Context, cl *daemon.Client, name string, out io.Writer, now func() time.Time) error {
	p := newProgress(name, out, isTerminal(out), terminalWidth(out, 80), now)
	p.showState = true
	tick := time.NewTicker(progressPoll)
	defer tick.Stop()
	for {
		st, err := cl.Info(ctx, name)
		switch {
		case ctx.Err() != nil:
			p.abort()
			return nil
		case err != nil:
			p.abort()
			return err
		case st.Info == nil:
			p.abort()
			return fmt.Errorf("device %s failed: %s", name, st.Error)
		case st.Info.Clone == nil || st.Info.Clone.Hydrated:
			p.finish(*st.Info)
			return nil
		}
		p.update(*st.Info)
		select {
		case <-tick.C:
		case <-ctx.Done():
			p.abort()
			return nil
		}
	}
}
