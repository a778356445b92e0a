package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/nbdserver"
	"github.com/nbdclone/nbdclone/target"
)

// Clone families: a clone's <source dev> may be "dev:NAME", another device
// of this daemon, read in process through that device's gate. The source
// device is then a parent: read-only to its clients (writes fail with EPERM,
// new connections are told READ_ONLY) and not removable, for as long as any
// table of another device holds it open.

// openSourceFor opens a <source dev> for device child: dev:NAME in
// process, anything else through the shared source pool.
func (r *registry) openSourceFor(ctx context.Context, child, spec string) (blockdev.Reader, error) {
	if parent, ok := target.SourceDevice(spec); ok {
		return r.openDevSource(ctx, child, parent)
	}
	return r.sources.get(ctx, spec)
}

// openDevSource makes child a child of parent and returns a reader of
// parent. Writes to parent already past its check finish before it
// returns, so child never reads a region a write is still changing.
func (r *registry) openDevSource(ctx context.Context, child, parent string) (blockdev.Reader, error) {
	if parent == child {
		return nil, fmt.Errorf("daemon: device %s cannot be its own source", child)
	}
	r.mu.Lock()
	p := r.devices[parent]
	if p == nil {
		r.mu.Unlock()
		return nil, errNotFound(parent)
	}
	p.mu.Lock()
	ok := p.ready && !p.gone
	p.mu.Unlock()
	if !ok {
		r.mu.Unlock()
		return nil, errNotFound(parent)
	}
	// A cycle would make each device read the other for ever. The links
	// (live and loaded tables alike) are the children maps: child must not
	// be among the devices parent reads, directly or through others.
	if r.readsLocked(parent, child) {
		r.mu.Unlock()
		return nil, fmt.Errorf("daemon: device %s reads %s (directly or through other devices): %s cannot read it back", parent, child, child)
	}
	p.mu.Lock()
	if p.children == nil {
		p.children = map[string]int{}
	}
	p.children[child]++
	p.mu.Unlock()
	p.childRefs.Add(1)
	r.mu.Unlock()

	s := &devSource{parent: p, child: child, size: p.size,
		id: target.DeviceSourcePrefix + parent + "@" + p.created.UTC().Format(time.RFC3339Nano)}
	for p.writers.Load() != 0 {
		select {
		case <-ctx.Done():
			s.Close()
			return nil, ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return s, nil
}

// readsLocked reports whether a table of device from reads device target,
// directly or through other devices. Needs r.mu.
func (r *registry) readsLocked(from, target string) bool {
	seen := map[string]bool{from: true}
	queue := []string{from}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		for name, dev := range r.devices {
			dev.mu.Lock()
			isParent := dev.children[cur] > 0
			dev.mu.Unlock()
			if !isParent || seen[name] {
				continue
			}
			if name == target {
				return true
			}
			seen[name] = true
			queue = append(queue, name)
		}
	}
	return false
}

// doWrite runs a write-side I/O (write, write zeroes, trim) unless the
// device is a parent. The count of writers in flight and the count of
// children are each raised before the other is read, so either the write
// sees the child or openDevSource waits for the write.
func (d *device) doWrite(ctx context.Context, io func(target.Target) error) error {
	return d.do(ctx, func(t target.Target) error {
		d.writers.Add(1)
		defer d.writers.Add(-1)
		if d.childRefs.Load() > 0 {
			return d.parentErr()
		}
		return io(t)
	})
}

func (d *device) parentErr() error {
	return fmt.Errorf("daemon: device %s is the source of %s and is read-only: %w",
		d.name, strings.Join(d.childNames(), ", "), syscall.EPERM)
}

// childNames are the devices whose tables read d, sorted.
func (d *device) childNames() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]string, 0, len(d.children))
	for name := range d.children {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}

// devSource is a child's read-only view of its parent device.
type devSource struct {
	parent *device
	child  string
	size   int64
	// id pins the parent by name and creation time: a clone made on one
	// device named a never reads another device later created as a.
	id   string
	once sync.Once
}

func (s *devSource) SourceID() string { return s.id }

func (s *devSource) ReadAt(p []byte, off int64) (int, error) {
	return s.ReadAtContext(context.Background(), p, off)
}

func (s *devSource) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("daemon: negative offset %d", off)
	}
	if off >= s.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), s.size-off)
	if n == 0 {
		return 0, nil
	}
	// The NBD server never asks for more than its maximum payload; a
	// copier may, so long reads are split.
	const maxRead = 32 << 20
	for done := int64(0); done < n; done += maxRead {
		k := min(maxRead, n-done)
		if err := s.parent.ReadAt(ctx, p[done:done+k], off+done); err != nil {
			return int(done), fmt.Errorf("daemon: reading source device %s: %w", s.parent.name, err)
		}
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// SpliceTo splices a child's read from its parent when the parent's live
// target can (blockdev.Splicer): a family's reads are not copied either.
// ctx is the child's request's, as for ReadAtContext: a suspended parent
// does not hold a closed connection's worker.
func (s *devSource) SpliceTo(ctx context.Context, pipe int, off int64, n int, dataOnly bool) error {
	if off < 0 || off+int64(n) > s.size {
		return fmt.Errorf("daemon: splice %d+%d beyond source device %s: %w", off, n, s.parent.name, blockdev.ErrNoSplice)
	}
	if err := s.parent.SpliceTo(ctx, []nbdserver.SplicePiece{{Pipe: pipe, Off: off, N: n}}, dataOnly); err != nil {
		return fmt.Errorf("daemon: splicing from source device %s: %w", s.parent.name, err)
	}
	return nil
}

func (s *devSource) Size() int64             { return s.size }
func (s *devSource) LogicalBlockSize() int64 { return 512 }

// Close ends the parent-child link; idempotent.
func (s *devSource) Close() error {
	s.once.Do(func() {
		p := s.parent
		p.mu.Lock()
		if p.children[s.child]--; p.children[s.child] <= 0 {
			delete(p.children, s.child)
		}
		p.mu.Unlock()
		p.childRefs.Add(-1)
	})
	return nil
}

// refuseParent fails when other devices read d.
func refuseParent(d *device) error {
	if names := d.childNames(); len(names) > 0 {
		return newErr(ErrBusy, "device %s is the source of %s: remove, redirect or split them first",
			d.name, strings.Join(names, ", "))
	}
	return nil
}

// parentOf is the device a table reads ("" when its source is not a
// device).
func parentOf(tbl target.Table) string {
	src, _ := target.CloneSource(tbl)
	name, _ := target.SourceDevice(src)
	return name
}

// familyOrder returns names ordered so that every device comes after the
// device its table reads (parents first); names in a cycle or reading a
// missing device keep their place at the end, in name order.
func familyOrder(names []string, parent func(string) string) []string {
	sort.Strings(names)
	known := map[string]bool{}
	for _, n := range names {
		known[n] = true
	}
	placed := map[string]bool{}
	var out []string
	for len(out) < len(names) {
		progress := false
		for _, n := range names {
			if placed[n] {
				continue
			}
			if p := parent(n); p == "" || !known[p] || placed[p] {
				placed[n] = true
				out = append(out, n)
				progress = true
			}
		}
		if !progress {
			for _, n := range names {
				if !placed[n] {
					placed[n] = true
					out = append(out, n)
				}
			}
		}
	}
	return out
}

// restoreOrder sorts state entries so a parent is restored before its
// children.
func restoreOrder(ents []stateEntry) []stateEntry {
	byName := map[string]stateEntry{}
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		byName[e.name] = e
		names = append(names, e.name)
	}
	order := familyOrder(names, func(n string) string {
		e := byName[n]
		if e.err != nil {
			return ""
		}
		tbl, err := target.ParseTable(e.rec.Table)
		if err != nil {
			return ""
		}
		return parentOf(tbl)
	})
	out := make([]stateEntry, len(order))
	for i, n := range order {
		out[i] = byName[n]
	}
	return out
}

// shutdownOrder sorts devices children first, so a child's last copies
// still read a running parent.
func shutdownOrder(devs []*device) []*device {
	byName := map[string]*device{}
	names := make([]string, 0, len(devs))
	for _, d := range devs {
		byName[d.name] = d
		names = append(names, d.name)
	}
	order := familyOrder(names, func(n string) string {
		d := byName[n]
		d.mu.Lock()
		defer d.mu.Unlock()
		return parentOf(d.table)
	})
	slices.Reverse(order)
	out := make([]*device, len(order))
	for i, n := range order {
		out[i] = byName[n]
	}
	return out
}

// Family is what `nbdclone show` prints: a device's place in its clone
// family and how much of it is local.
type Family struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	State string `json:"state"`
	// Chain are the sources from the device's own up to the root: "dev:A"
	// for a device of this daemon, then the root's path or URI. Empty for
	// a linear device.
	Chain []string `json:"chain"`
	// Depth is the number of devices and sources above this one
	// (len(Chain)).
	Depth int `json:"depth"`
	// Children are the devices whose tables read this one.
	Children  []string `json:"children"`
	SizeBytes int64    `json:"size_bytes"`
	Regions   uint64   `json:"regions,omitempty"`
	// HydratedRegions and HydratedFraction: 1 for a linear device.
	HydratedRegions  uint64  `json:"hydrated_regions,omitempty"`
	HydratedFraction float64 `json:"hydrated_fraction"`
	// Hydration: "linear", "complete", "enabled", "disabled" or
	// "stopped" (on errors).
	Hydration   string `json:"hydration"`
	Destination string `json:"destination,omitempty"`
	// AllocatedBytes is the destination's allocated space (st_blocks × 512):
	// a sparse destination costs only what was written or hydrated.
	AllocatedBytes int64                      `json:"allocated_bytes"`
	SourceCache    *blockdev.SourceCacheStats `json:"source_cache,omitempty"`
}

// family is `show NAME`.
func (r *registry) family(ctx context.Context, name string) (Family, error) {
	d, err := r.get(name)
	if err != nil {
		return Family{}, err
	}
	sum := r.summary(d)
	f := Family{Name: name, Type: sum.Type, State: sum.State, SizeBytes: sum.SizeBytes, Children: d.childNames(), Chain: []string{}}
	d.mu.Lock()
	tbl := d.table
	d.mu.Unlock()
	// The chain, through the tables of this daemon's devices.
	seen := map[string]bool{name: true}
	for t := tbl; ; {
		src, ok := target.CloneSource(t)
		if !ok {
			break
		}
		f.Chain = append(f.Chain, src)
		parent, ok := target.SourceDevice(src)
		if !ok || seen[parent] {
			break
		}
		seen[parent] = true
		pd, err := r.get(parent)
		if err != nil {
			break
		}
		pd.mu.Lock()
		t = pd.table
		pd.mu.Unlock()
	}
	f.Depth = len(f.Chain)
	h, err := d.acquire(ctx)
	switch {
	case errors.Is(err, ErrFailed):
		f.Hydration = "failed"
		return f, nil
	case err != nil:
		return Family{}, err
	}
	info := h.t.Info()
	h.release()
	switch c := info.Clone; {
	case c == nil:
		f.Hydration, f.HydratedFraction = "linear", 1
		if len(tbl.Args) > 0 {
			f.Destination = tbl.Args[0]
		}
	default:
		f.Regions, f.HydratedRegions, f.Destination = c.Regions, c.HydratedRegions, c.Destination
		if c.Regions > 0 {
			f.HydratedFraction = float64(c.HydratedRegions) / float64(c.Regions)
		}
		f.SourceCache = c.SourceCache
		switch {
		case c.Hydrated:
			f.Hydration = "complete"
		case c.HydrationStopped != "":
			f.Hydration = "stopped"
		case c.HydrationEnabled:
			f.Hydration = "enabled"
		default:
			f.Hydration = "disabled"
		}
	}
	if f.Destination != "" {
		var st syscall.Stat_t
		if err := syscall.Stat(f.Destination, &st); err == nil {
			f.AllocatedBytes = st.Blocks * 512
		} else if !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("show: stat of the destination", "err", err)
		}
	}
	return f, nil
}

// hydratedExtents calls fn for each run of [0, size) that p reports
// hydrated in the nbdclone:hydrated context (through its gate).
func hydratedExtents(ctx context.Context, p *device, fn func(off, n int64) error) error {
	const span = 1 << 30
	for off := int64(0); off < p.size; {
		exts, err := p.Extents(ctx, ContextHydrated, off, min(span, p.size-off), 4096)
		if err != nil {
			return err
		}
		if len(exts) == 0 {
			return fmt.Errorf("daemon: %s: no hydration extents at %d", p.name, off)
		}
		for _, e := range exts {
			n := min(e.Length, p.size-off)
			if e.Flags&StateHydrated != 0 {
				if err := fn(off, n); err != nil {
					return err
				}
			}
			off += n
		}
	}
	return nil
}

// redirect detaches device name from its parent: every region the parent
// holds (hydrated or written) that name has not hydrated is copied into
// name from the parent, then name's source becomes the parent's own
// source. The metadata records the switch before the new table is built,
// and the state directory keeps the new table. Returns the new source.
//
// Correctness: the parent is read-only while it has children, so the
// regions it holds only grow by copies of its own source, which read the
// same either way. Once every region the parent held is hydrated in the
// child, the child's remaining unhydrated regions read the same through
// the parent as from the parent's source: a crash between the metadata
// record and the state file leaves a table that still reads right.
func (r *registry) redirect(ctx context.Context, name string) (string, error) {
	d, err := r.get(name)
	if err != nil {
		return "", err
	}
	d.mu.Lock()
	tbl := d.table
	d.mu.Unlock()
	src, _ := target.CloneSource(tbl)
	pname, ok := target.SourceDevice(src)
	if !ok {
		return "", newErr(ErrInvalid, "device %s does not read another device (its source is %q): nothing to redirect", name, src)
	}
	p, err := r.get(pname)
	if err != nil {
		return "", err
	}
	p.mu.Lock()
	ptbl := p.table
	p.mu.Unlock()
	newSrc, ok := target.CloneSource(ptbl)
	if !ok {
		return "", newErr(ErrInvalid, "device %s reads %s, a %s device without a source to redirect onto: split %s instead",
			name, pname, ptbl.Type, name)
	}

	if err := r.refuseSuspended(d); err != nil {
		return "", err
	}
	// Copy what the parent holds while the child serves I/O: CACHE takes
	// the child's region locks like any copy.
	copied := int64(0)
	err = hydratedExtents(ctx, p, func(off, n int64) error {
		copied += n
		return d.Cache(target.CommandCopy(ctx), off, n)
	})
	if err != nil {
		return "", wrapErr(ErrInternal, err, "redirect %s: copying the regions %s holds", name, pname)
	}

	unlock, err := d.lockOps(ctx)
	if err != nil {
		return "", err
	}
	defer unlock()
	h := d.liveOpsHeld()
	d.mu.Lock()
	manual := d.inactive != nil
	d.mu.Unlock()
	switch {
	case h == nil:
		return "", d.failedErr(nil)
	case h.table.String() != tbl.String():
		return "", newErr(ErrBusy, "device %s: its table changed during the redirect; run it again", name)
	case manual:
		return "", newErr(ErrBusy, "device %s has a loaded table: resume or replace it first", name)
	}
	rec, ok := h.t.(target.SourceRecorder)
	ext, ok2 := h.t.(target.Extenter)
	if !ok || !ok2 {
		return "", newErr(ErrInvalid, "device %s is not a clone", name)
	}
	if err := r.suspendOpsHeld(ctx, d, r.suspendTimeout); err != nil {
		return "", err
	}
	// Suspended (metadata committed): check that nothing the parent holds
	// is missing here (a region whose copy failed, ro metadata).
	err = hydratedExtents(ctx, p, func(off, n int64) error {
		exts, err := ext.Hydration(ctx, off, n, 1)
		if err != nil {
			return err
		}
		if len(exts) == 0 || !exts[0].Hydrated || exts[0].Length < n {
			return fmt.Errorf("region at %d of %s is held by %s but not hydrated here", off, name, pname)
		}
		return nil
	})
	if err == nil {
		err = rec.RecordSource(newSrc)
	}
	if err != nil {
		r.resumeOldOpsHeld(d, h)
		return "", wrapErr(ErrInternal, err, "redirect %s", name)
	}
	// The live clone holds the metadata store: the new table is built once
	// it is closed (a deferred build; the old table is rebuilt on failure).
	if err := r.swapOpsHeld(ctx, d, &loaded{table: target.WithSource(h.table, newSrc), dir: h.dir}); err != nil {
		return "", err
	}
	d.log.Info("redirected", "from", src, "to", newSrc, "bytes_checked", copied)
	return newSrc, nil
}

// split makes device name independent of every source: it hydrates every
// region (CACHE: with priority, whatever the hydration settings), commits,
// and swaps it to linear on its destination as auto_linear does. NBD
// clients stay connected.
func (dm *Daemon) split(ctx context.Context, name string) error {
	r := dm.reg
	d, err := r.get(name)
	if err != nil {
		return err
	}
	if err := r.refuseSuspended(d); err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		h, err := d.acquire(ctx)
		if err != nil {
			return err
		}
		info := h.t.Info()
		h.release()
		c := info.Clone
		if c == nil {
			return nil // linear already
		}
		if c.Hydrated {
			done, err := dm.auto.swap(ctx, d, h)
			switch {
			case err != nil:
				return wrapErr(ErrInternal, err, "split %s: swapping to linear", name)
			case done:
				return nil
			default:
				return newErr(ErrBusy, "device %s is suspended or has a loaded table: resume it first", name)
			}
		}
		if attempt >= 3 {
			return newErr(ErrFailed, "device %s: %d/%d regions hydrated after %d passes (metadata mode %s)",
				name, c.HydratedRegions, c.Regions, attempt, c.Mode)
		}
		const span = 256 << 20
		for off := int64(0); off < d.size; off += span {
			if err := d.Cache(target.CommandCopy(ctx), off, min(span, d.size-off)); err != nil {
				return wrapErr(ErrInternal, err, "split %s: hydrating", name)
			}
		}
		if err := d.Flush(ctx); err != nil {
			return wrapErr(ErrInternal, err, "split %s: committing", name)
		}
	}
}

// redirectResponse is the reply to a redirect.
type redirectResponse struct {
	Source string `json:"source"`
}

func (d *Daemon) familyRoutes(mux *http.ServeMux) {
	r := d.reg
	mux.HandleFunc("GET /v1/devices/{name}/family", func(w http.ResponseWriter, req *http.Request) {
		f, err := r.family(req.Context(), req.PathValue("name"))
		if err != nil {
			d.writeError(w, req, err)
			return
		}
		writeJSON(w, http.StatusOK, f)
	})
	mux.HandleFunc("POST /v1/devices/{name}/redirect", func(w http.ResponseWriter, req *http.Request) {
		src, err := r.redirect(req.Context(), req.PathValue("name"))
		if err != nil {
			d.writeError(w, req, err)
			return
		}
		writeJSON(w, http.StatusOK, redirectResponse{Source: src})
	})
	mux.HandleFunc("POST /v1/devices/{name}/split", func(w http.ResponseWriter, req *http.Request) {
		d.reply(w, req, d.split(req.Context(), req.PathValue("name")))
	})
}

// Family is `nbdclone show NAME`: the device's source chain, children,
// hydration and destination allocation.
func (c *Client) Family(ctx context.Context, name string) (Family, error) {
	var f Family
	err := c.do(ctx, http.MethodGet, devPath(name, "family"), nil, &f)
	return f, err
}

// Redirect detaches a clone of another device onto that device's own
// source and returns the new source.
func (c *Client) Redirect(ctx context.Context, name string) (string, error) {
	var resp redirectResponse
	err := c.do(ctx, http.MethodPost, devPath(name, "redirect"), struct{}{}, &resp)
	return resp.Source, err
}

// Split hydrates a clone fully and swaps it to linear.
func (c *Client) Split(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, devPath(name, "split"), struct{}{}, nil)
}

// checkParentLoad refuses, unless forced, a table that could change what a
// parent's children read: only a table over the same data may replace a
// parent's (a linear table over its clone's destination, or a clone with
// the same destination and source, say with other features).
func checkParentLoad(d *device, tbl target.Table, force bool) error {
	names := d.childNames()
	if force || len(names) == 0 {
		return nil
	}
	d.mu.Lock()
	cur := d.table
	d.mu.Unlock()
	if sameData(cur, tbl) {
		return nil
	}
	return newErr(ErrBusy, "device %s is the source of %s: a table over other data would change what they read (load --force to do it anyway)",
		d.name, strings.Join(names, ", "))
}

// sameData reports whether table next reads the same data as cur.
func sameData(cur, next target.Table) bool {
	data := func(t target.Table) (string, bool) {
		switch {
		case t.Type == "clone" && len(t.Args) >= 3:
			return filepath.Clean(t.Args[1]), true
		case t.Type == "linear" && len(t.Args) == 2 && t.Args[1] == "0":
			return filepath.Clean(t.Args[0]), true
		}
		return "", false
	}
	a, ok1 := data(cur)
	b, ok2 := data(next)
	if !ok1 || !ok2 || a != b {
		return false
	}
	switch {
	case next.Type == "linear":
		return true // a clone's destination once hydrated (checkLinearLoad)
	case cur.Type == "clone":
		return cur.Args[0] == next.Args[0] && cur.Args[2] == next.Args[2]
	default:
		return false // a clone over a linear device's data: unknown metadata
	}
}

// refuseSuspended fails when d or a device it reads through dev: sources
// is suspended: the copies of a redirect or split would wait at its gate
// until it is resumed.
func (r *registry) refuseSuspended(d *device) error {
	seen := map[string]bool{}
	for dev := d; dev != nil && !seen[dev.name]; {
		seen[dev.name] = true
		if dev.isSuspended() {
			return newErr(ErrBusy, "device %s is suspended: resume it first", dev.name)
		}
		dev.mu.Lock()
		parent := parentOf(dev.table)
		dev.mu.Unlock()
		if parent == "" {
			return nil
		}
		next, err := r.get(parent)
		if err != nil {
			return nil
		}
		dev = next
	}
	return nil
}
