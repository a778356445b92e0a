package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/nbdserver"
	"github.com/nbdclone/nbdclone/target"
)

// Device states, as ls shows them.
const (
	StateActive    = "active"
	StateSuspended = "suspended"
	StateFailed    = "failed"
)

// Device is one device as the control API lists it.
type Device struct {
	Name  string `json:"name"`
	State string `json:"state"` // StateActive, StateSuspended or StateFailed
	// Error says why a failed device has no live table.
	Error     string `json:"error,omitempty"`
	Type      string `json:"type"`
	SizeBytes int64  `json:"size_bytes"`
	// Table is the live table line, its relative paths resolved (target.Resolve).
	Table string `json:"table"`
	// InactiveTable is the table loaded and not yet resumed, if any.
	InactiveTable string `json:"inactive_table,omitempty"`
	// Dir is the directory the table was given in.
	Dir         string    `json:"dir,omitempty"`
	Connections int       `json:"connections"`
	URIs        []string  `json:"uris"`
	Created     time.Time `json:"created"`

	// Attached is the /dev/nbdX the device is attached to, if any.
	Attached string `json:"attached,omitempty"`
}

// DeviceStatus is the JSON status of a device: Device plus the live
// target's Info snapshot (absent when the device failed). Reading it never
// commits metadata.
type DeviceStatus struct {
	Device
	Info *target.Info `json:"info,omitempty"`
}

// buildFunc is target.Build; tests substitute fakes.
type buildFunc func(ctx context.Context, t target.Table, env target.Env) (target.Target, error)

// registry is the device table (name → device) and dm's operations on it.
// It implements nbdserver.Exports.
type registry struct {
	log            *slog.Logger
	state          stateDir
	build          buildFunc
	now            func() time.Time
	suspendTimeout time.Duration
	// disconnect drops a device's NBD connections; nil without a server.
	disconnect func(name string) int
	// uris lists a device's export URIs; nil lists none.
	uris func(name string) []string
	// sources shares clone sources by path or URI (sources.go); dev:NAME
	// sources are other devices (family.go).
	sources *sourcePool
	// hooks are the daemon's extensions (hooks.go); zero in unit tests.
	hooks registryHooks

	mu sync.Mutex
	// Guarded by mu. Lock order: registry.mu before device.mu.
	devices map[string]*device
	closed  bool
}

func newRegistry(log *slog.Logger, state stateDir, build buildFunc) *registry {
	return &registry{
		log:            log,
		state:          state,
		build:          build,
		now:            time.Now,
		suspendTimeout: DefaultSuspendTimeout,
		devices:        map[string]*device{},
		// Clone sources: paths, nbd[s][+unix]:// URIs, http(s):// URLs.
		sources: newSourcePool(func(ctx context.Context, spec string) (blockdev.Reader, error) {
			return blockdev.OpenSource(ctx, spec, blockdev.SourceOptions{Logger: log})
		}, 0),
	}
}

func (r *registry) env(name, dir string) target.Env {
	return target.Env{Logger: r.log.With("device", name), Dir: dir,
		OpenSource: func(ctx context.Context, spec string) (blockdev.Reader, error) {
			return r.openSourceFor(ctx, name, spec)
		}}
}

// get returns a device that finished its create.
func (r *registry) get(name string) (*device, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, newErr(ErrClosed, "the nbdclone daemon is shutting down")
	}
	d := r.devices[name]
	if d == nil {
		return nil, errNotFound(name)
	}
	d.mu.Lock()
	ready := d.ready
	d.mu.Unlock()
	if !ready {
		return nil, errNotFound(name)
	}
	return d, nil
}

// all returns the ready devices, sorted by name.
func (r *registry) all() []*device {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*device, 0, len(r.devices))
	for _, d := range r.devices {
		d.mu.Lock()
		ready := d.ready
		d.mu.Unlock()
		if ready {
			out = append(out, d)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// reserve registers a device that is not ready yet, so a second create of
// the name fails while the first builds.
func (r *registry) reserve(d *device) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return newErr(ErrClosed, "the nbdclone daemon is shutting down")
	}
	if _, ok := r.devices[d.name]; ok {
		return newErr(ErrExists, "device %s already exists", d.name)
	}
	r.devices[d.name] = d
	return nil
}

// unregister removes d from the table and wakes everything waiting on it.
func (r *registry) unregister(d *device) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unregisterLocked(d)
}

func (r *registry) unregisterLocked(d *device) {
	if r.devices[d.name] == d {
		delete(r.devices, d.name)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.gone {
		d.gone = true
		close(d.removed)
	}
}

// buildErr turns a Build failure into the error users see: dm's own text
// for constructor errors and table syntax.
func buildErr(err error) error {
	var dm *target.DMError
	switch {
	case errors.As(err, &dm), errors.Is(err, target.ErrTable):
		return wrapErr(ErrInvalid, err, "")
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	default:
		return wrapErr(ErrInternal, err, "")
	}
}

func parseTable(line, dir string) (target.Table, error) {
	tbl, err := target.ParseTable(line)
	if err != nil {
		return target.Table{}, wrapErr(ErrInvalid, err, "")
	}
	if dir != "" && !filepath.IsAbs(dir) {
		return target.Table{}, newErr(ErrInvalid, "working directory %q is not absolute", dir)
	}
	// Relative paths mean something only in the creator's directory: the
	// table is kept, shown and persisted with them resolved.
	return target.Resolve(tbl, dir), nil
}

// create is dmsetup create: build the table, resume it, register and
// persist the device.
func (r *registry) create(ctx context.Context, name, line, dir string) (err error) {
	if err := validName(name); err != nil {
		return err
	}
	tbl, err := parseTable(line, dir)
	if err != nil {
		return err
	}
	d := newDevice(name, tbl, dir, r.now().UTC(), r.log)
	// Held until the device is complete, so a shutdown meanwhile waits
	// for it instead of missing its target.
	unlock, err := d.lockOps(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if err := r.reserve(d); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			r.unregister(d)
		}
	}()
	t, err := r.build(ctx, tbl, r.env(name, dir))
	if err != nil {
		return buildErr(err)
	}
	h := &handle{t: t, table: tbl, dir: dir}
	if err := t.Resume(); err != nil {
		t.Close()
		return wrapErr(ErrInternal, err, "resume %s", name)
	}
	h.running = true
	if err := r.state.save(d.record()); err != nil {
		r.retire(context.WithoutCancel(ctx), d, h)
		return wrapErr(ErrInternal, err, "")
	}
	d.publish(h)
	d.mu.Lock()
	d.ready = true
	d.mu.Unlock()
	d.log.Info("device created", "table", tbl.String(), "dir", dir)
	r.emit(d, EventCreated, "")
	r.tableLive(d)
	return nil
}

// record is d's state file content.
func (d *device) record() stateRecord {
	d.mu.Lock()
	defer d.mu.Unlock()
	return stateRecord{Name: d.name, Table: d.table.String(), Dir: d.dir, Created: d.created}
}

// recordOf is the state of d once h is its live table.
func recordOf(d *device, h *handle) stateRecord {
	return stateRecord{Name: d.name, Table: h.table.String(), Dir: h.dir, Created: d.created}
}

// retire suspends (if running) and closes a target nobody can reach any
// more, once its last reader has left. Errors are logged: the target is
// gone either way.
func (r *registry) retire(ctx context.Context, d *device, h *handle) error {
	h.users.Wait()
	var errs []error
	if h.running {
		if err := h.t.Suspend(ctx); err != nil {
			errs = append(errs, fmt.Errorf("suspend: %w", err))
		}
		h.running = false
	}
	if err := h.t.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close: %w", err))
	}
	err := errors.Join(errs...)
	if err != nil {
		d.log.Error("closing target", "table", h.table.String(), "err", err)
	}
	return err
}

// load is dmsetup load: the table becomes the inactive table, swapped in by
// the next resume.
func (r *registry) load(ctx context.Context, name, line, dir string) error {
	return r.loadForce(ctx, name, line, dir, false)
}

// loadForce is load; without force, a linear table over a clone that is
// not fully hydrated is refused (checkLinearLoad).
func (r *registry) loadForce(ctx context.Context, name, line, dir string, force bool) error {
	d, err := r.get(name)
	if err != nil {
		return err
	}
	tbl, err := parseTable(line, dir)
	if err != nil {
		return err
	}
	if tbl.Bytes() != d.size {
		return newErr(ErrInvalid, "table length differs from the live table: NBD clients cannot see a size change (live %d sectors, new %d)",
			d.size/target.SectorSize, tbl.Length)
	}
	unlock, err := d.lockOps(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if err := checkLinearLoad(d, tbl, force); err != nil {
		return err
	}
	if err := checkParentLoad(d, tbl, force); err != nil {
		return err
	}

	env := r.env(name, dir)
	deferred := false
	if md, ok := target.CloneMetadataPath(tbl, env); ok {
		// The live clone holds its metadata store locked: a table on the
		// same store can only be built once the live one is closed.
		if h := d.liveOpsHeld(); h != nil && sameMetadata(md, h, r.env(name, h.dir)) {
			deferred = true
		}
		// So can a previously loaded one on the same store: drop it first.
		d.mu.Lock()
		old := d.inactive
		if old != nil && old.t != nil {
			if p, ok := target.CloneMetadataPath(old.table, r.env(name, old.dir)); ok && p == md {
				d.inactive = nil
			} else {
				old = nil
			}
		} else {
			old = nil
		}
		d.mu.Unlock()
		if old != nil {
			if err := old.t.Close(); err != nil {
				d.log.Error("closing the replaced inactive table", "err", err)
			}
		}
	}
	in := &loaded{table: tbl, dir: dir}
	if !deferred {
		if in.t, err = r.build(ctx, tbl, env); err != nil {
			return buildErr(err)
		}
	}
	d.mu.Lock()
	old := d.inactive
	d.inactive = in
	d.mu.Unlock()
	if old != nil && old.t != nil {
		if err := old.t.Close(); err != nil {
			d.log.Error("closing the replaced inactive table", "err", err)
		}
	}
	d.log.Info("table loaded", "table", tbl.String(), "dir", dir, "deferred_build", deferred)
	r.emitTable(name, EventLoaded, tbl.String(), "")
	return nil
}

// sameMetadata reports whether the live clone h uses the metadata store md.
func sameMetadata(md string, h *handle, env target.Env) bool {
	if p, ok := target.CloneMetadataPath(h.table, env); ok && p == md {
		return true
	}
	if info := h.t.Info(); info.Clone != nil && info.Clone.Metadata != "" {
		return filepath.Clean(env.Path(info.Clone.Metadata)) == md
	}
	return false
}

// suspend is dmsetup suspend: hold new I/O, drain what is in flight, then
// suspend the target (which commits its metadata).
func (r *registry) suspend(ctx context.Context, name string, timeout time.Duration) error {
	d, err := r.get(name)
	if err != nil {
		return err
	}
	unlock, err := d.lockOps(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	return r.suspendOpsHeld(ctx, d, timeout)
}

func (r *registry) suspendOpsHeld(ctx context.Context, d *device, timeout time.Duration) error {
	if d.isSuspended() {
		return nil
	}
	h := d.liveOpsHeld()
	if h == nil {
		d.mu.Lock()
		failure := d.failure
		d.mu.Unlock()
		return d.failedErr(failure)
	}
	if timeout <= 0 {
		timeout = r.suspendTimeout
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	n, err := d.gate.close(dctx)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return newErr(ErrTimeout, "device %s: %d I/O request(s) still in flight after %v; not suspended", d.name, n, timeout)
	}
	if err := h.t.Suspend(ctx); err != nil {
		d.gate.open()
		return wrapErr(ErrInternal, err, "suspend %s", d.name)
	}
	h.running = false
	d.setSuspended(true)
	d.log.Info("device suspended")
	r.emit(d, EventSuspended, "")
	return nil
}

// resume is dmsetup resume: swap in the loaded table if there is one,
// then resume the target and let I/O through.
func (r *registry) resume(ctx context.Context, name string) error {
	d, err := r.get(name)
	if err != nil {
		return err
	}
	unlock, err := d.lockOps(ctx)
	if err != nil {
		return err
	}
	defer unlock()

	d.mu.Lock()
	in := d.inactive
	d.mu.Unlock()
	if in != nil {
		return r.swapOpsHeld(ctx, d, in)
	}
	h := d.liveOpsHeld()
	if h == nil {
		// A failed device: try its table again.
		d.mu.Lock()
		in = &loaded{table: d.table, dir: d.dir}
		failure := d.failure
		d.mu.Unlock()
		if in.table.Type == "" {
			// Its state file was unreadable: nothing to retry.
			return d.failedErr(failure)
		}
		return r.swapOpsHeld(ctx, d, in)
	}
	if !d.isSuspended() {
		return nil
	}
	if err := h.t.Resume(); err != nil {
		return wrapErr(ErrInternal, err, "resume %s", name)
	}
	h.running = true
	d.setSuspended(false)
	d.gate.open()
	d.log.Info("device resumed")
	r.emit(d, EventResumed, "")
	return nil
}

// swapOpsHeld makes in the live table (invariants 1 and 4).
func (r *registry) swapOpsHeld(ctx context.Context, d *device, in *loaded) error {
	old := d.liveOpsHeld() // nil for a failed device
	if old != nil && !d.isSuspended() {
		// The inactive table stays loaded: resume can be retried.
		if err := r.suspendOpsHeld(ctx, d, r.suspendTimeout); err != nil {
			return err
		}
	}
	// The gate is now closed and drained (or failed, without a live
	// target) and the old target suspended: nothing reaches either target.
	d.mu.Lock()
	if d.inactive == in {
		d.inactive = nil
	}
	d.mu.Unlock()

	nh := &handle{t: in.t, table: in.table, dir: in.dir}
	if nh.t != nil {
		// Built at load: the old target stays live until the new one runs.
		if err := nh.t.Resume(); err != nil {
			nh.t.Close()
			err = wrapErr(ErrInternal, err, "resume %s with the new table", d.name)
			if old != nil && r.resumeOldOpsHeld(d, old) {
				return err
			}
			return r.failOpsHeld(d, err, old != nil)
		}
	} else {
		// Deferred build: the old target must first release what the new
		// one opens (its metadata store).
		if old != nil {
			d.unpublish()
			r.retire(context.WithoutCancel(ctx), d, old)
		}
		t, err := r.build(ctx, in.table, r.env(d.name, in.dir))
		if err == nil {
			if err = t.Resume(); err != nil {
				t.Close()
				err = fmt.Errorf("resume: %w", err)
			}
		}
		if err != nil {
			return r.restoreOpsHeld(ctx, d, old, buildErr(err))
		}
		nh.t = t
	}
	nh.running = true
	d.publish(nh)
	d.setSuspended(false)
	d.gate.open()
	if old != nil && in.t != nil {
		r.retire(context.WithoutCancel(ctx), d, old)
	}
	d.log.Info("table swapped", "table", nh.table.String(), "dir", nh.dir)
	r.emit(d, EventSwapped, "")
	r.emit(d, EventResumed, "")
	r.tableLive(d)
	if err := r.state.save(recordOf(d, nh)); err != nil {
		d.log.Error("saving state after a table swap", "err", err)
		return wrapErr(ErrInternal, err, "the new table of %s is live but was not saved", d.name)
	}
	return nil
}

// resumeOldOpsHeld resumes the still-live, suspended old target after the
// new one failed.
func (r *registry) resumeOldOpsHeld(d *device, old *handle) bool {
	if err := old.t.Resume(); err != nil {
		d.log.Error("resuming the old table", "err", err)
		return false
	}
	old.running = true
	d.setSuspended(false)
	d.gate.open()
	d.log.Info("old table kept", "table", old.table.String())
	return true
}

// restoreOpsHeld rebuilds and resumes the old table, already closed, after
// the new one failed, and returns cause.
func (r *registry) restoreOpsHeld(ctx context.Context, d *device, old *handle, cause error) error {
	if old == nil {
		return r.failOpsHeld(d, cause, false)
	}
	d.log.Error("new table failed; restoring the old one", "err", cause)
	t, err := r.build(context.WithoutCancel(ctx), old.table, r.env(d.name, old.dir))
	if err == nil {
		if err = t.Resume(); err != nil {
			t.Close()
		}
	}
	if err != nil {
		d.log.Error("restoring the old table", "err", err)
		return r.failOpsHeld(d, cause, true)
	}
	d.publish(&handle{t: t, table: old.table, dir: old.dir, running: true})
	d.setSuspended(false)
	d.gate.open()
	d.log.Info("old table restored", "table", old.table.String())
	r.tableLive(d)
	return cause
}

// failOpsHeld leaves the device without a target: I/O gets EIO until a
// table is loaded and resumed.
func (r *registry) failOpsHeld(d *device, cause error, lostOld bool) error {
	if h := d.unpublish(); h != nil {
		r.retire(context.Background(), d, h)
	}
	d.setFailed(cause)
	d.setSuspended(false)
	d.gate.fail(target.ErrIO)
	r.emit(d, EventFailed, cause.Error())
	if !lostOld {
		d.log.Error("device has no live table", "err", cause)
		return cause
	}
	d.log.Error("old table could not be restored; device failed", "err", cause)
	return &opError{kind: ErrFailed, cause: cause,
		msg: cause.Error() + "; the old table could not be restored either: device " + d.name +
			" is failed until a table is loaded and resumed"}
}

// message is dmsetup message NAME SECTOR ARGS...
func (r *registry) message(ctx context.Context, name, sector string, args []string) error {
	d, err := r.get(name)
	if err != nil {
		return err
	}
	if s, err := strconv.ParseUint(sector, 10, 64); err != nil || s != 0 {
		// One target per device, starting at sector 0.
		return newErr(ErrInvalid, "Invalid sector")
	}
	if len(args) == 0 {
		return newErr(ErrInvalid, "Invalid target message parameters.")
	}
	h, err := d.acquire(ctx)
	if err != nil {
		return err
	}
	defer h.release()
	if err := h.t.Message(ctx, args); err != nil {
		var dm *target.DMError
		if errors.As(err, &dm) {
			return wrapErr(ErrInvalid, err, "")
		}
		return wrapErr(ErrInternal, err, "")
	}
	d.log.Info("message", "args", strings.Join(args, " "))
	return nil
}

// statusLine is dmsetup status NAME: "<start> <len> <type> <status>". For
// a clone, the target commits metadata first (as dm-clone does).
func (r *registry) statusLine(ctx context.Context, name string) (string, error) {
	d, err := r.get(name)
	if err != nil {
		return "", err
	}
	h, err := d.acquire(ctx)
	if err != nil {
		return "", err
	}
	defer h.release()
	return dmLine(h.table, h.t.Status()), nil
}

// tableLine is dmsetup table NAME (or --inactive).
func (r *registry) tableLine(ctx context.Context, name string, inactive bool) (string, error) {
	d, err := r.get(name)
	if err != nil {
		return "", err
	}
	if inactive {
		d.mu.Lock()
		in := d.inactive
		d.mu.Unlock()
		if in == nil {
			return "", nil
		}
		if in.t != nil {
			return dmLine(in.table, in.t.Table()), nil
		}
		return in.table.String(), nil
	}
	h, err := d.acquire(ctx)
	if errors.Is(err, ErrFailed) {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.table.String(), nil
	}
	if err != nil {
		return "", err
	}
	defer h.release()
	return dmLine(h.table, h.t.Table()), nil
}

func dmLine(tbl target.Table, rest string) string {
	return strings.TrimRight(fmt.Sprintf("%d %d %s %s", tbl.Start, tbl.Length, tbl.Type, rest), " ")
}

// summary is d as ls shows it.
func (r *registry) summary(d *device) Device {
	d.mu.Lock()
	s := Device{
		Name:        d.name,
		State:       StateActive,
		Type:        d.table.Type,
		SizeBytes:   d.size,
		Table:       d.table.String(),
		Dir:         d.dir,
		Connections: d.conns,
		Created:     d.created,
	}
	switch {
	case d.live == nil && d.swapping == nil:
		s.State = StateFailed
		if d.failure != nil {
			s.Error = d.failure.Error()
		}
	case d.suspended || d.swapping != nil:
		s.State = StateSuspended
	}
	if d.inactive != nil {
		s.InactiveTable = d.inactive.table.String()
	}
	d.mu.Unlock()
	if r.hooks.attached != nil {
		s.Attached = r.hooks.attached(d.name)
	}
	s.URIs = []string{}
	if r.uris != nil {
		s.URIs = r.uris(d.name)
	}
	return s
}

func (r *registry) list() []Device {
	devs := r.all()
	out := make([]Device, 0, len(devs))
	for _, d := range devs {
		out = append(out, r.summary(d))
	}
	return out
}

// info is the JSON status: no metadata commit (invariant 6).
func (r *registry) info(ctx context.Context, name string) (DeviceStatus, error) {
	d, err := r.get(name)
	if err != nil {
		return DeviceStatus{}, err
	}
	st := DeviceStatus{Device: r.summary(d)}
	h, err := d.acquire(ctx)
	switch {
	case errors.Is(err, ErrFailed):
		return st, nil
	case err != nil:
		return DeviceStatus{}, err
	}
	info := h.t.Info()
	h.release()
	st.Info = &info
	return st, nil
}

// remove is dmsetup remove: refused while NBD clients are connected unless
// forced (they are then disconnected).
func (r *registry) remove(ctx context.Context, name string, force bool) error {
	d, err := r.get(name)
	if err != nil {
		return err
	}
	if err := refuseParent(d); err != nil {
		return err
	}
	if r.hooks.removing != nil {
		// Attached to /dev/nbdX: refused, or detached first when forced.
		if err := r.hooks.removing(ctx, name, force); err != nil {
			return err
		}
	}
	unlock, err := d.lockOps(ctx)
	if err != nil {
		return err
	}
	defer unlock()

	// Check and unregister at once, so no connection opens in between.
	r.mu.Lock()
	d.mu.Lock()
	conns := d.conns
	d.mu.Unlock()
	if err := refuseParent(d); err != nil {
		r.mu.Unlock()
		return err
	}
	if conns > 0 && !force {
		r.mu.Unlock()
		return newErr(ErrBusy, "device %s is busy: %d NBD connection(s)", name, conns)
	}
	r.unregisterLocked(d)
	r.mu.Unlock()

	var errs []error
	h := d.liveOpsHeld()
	if h != nil && !d.isSuspended() {
		// Drain and suspend so the target commits what was acknowledged.
		if err := r.suspendOpsHeld(ctx, d, r.suspendTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	// Whatever waits at the gate or still arrives fails, so disconnecting
	// the clients does not wait for it.
	d.gate.fail(errShutdown)
	if conns > 0 && r.disconnect != nil {
		r.disconnect(name)
	}
	if _, err := d.gate.drain(ctx); err != nil {
		errs = append(errs, err)
	}
	if h != nil {
		d.unpublish()
		if err := r.retire(context.WithoutCancel(ctx), d, h); err != nil {
			errs = append(errs, err)
		}
	}
	d.setFailed(errNotFound(name))
	d.mu.Lock()
	in := d.inactive
	d.inactive = nil
	d.mu.Unlock()
	if in != nil && in.t != nil {
		in.t.Close()
	}
	if err := r.state.remove(name); err != nil {
		errs = append(errs, err)
	}
	d.log.Info("device removed", "forced", force, "connections", conns)
	r.emit(d, EventRemoved, "")
	if err := errors.Join(errs...); err != nil {
		return wrapErr(ErrInternal, err, "device %s removed, but", name)
	}
	return nil
}

// wait long-polls until the device is hydrated (at once for non-clone
// targets). It fails if hydration cannot finish: metadata in Fail mode,
// hydration stopped on errors, or the device removed.
func (r *registry) wait(ctx context.Context, name string) (target.Info, error) {
	d, err := r.get(name)
	if err != nil {
		return target.Info{}, err
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var settled <-chan struct{} // an auto_linear swap under way
	for {
		h, err := d.acquire(ctx)
		if err != nil {
			return target.Info{}, err
		}
		// Read Events before Info, so an event between them is not lost.
		events := h.t.Events()
		info := h.t.Info()
		h.release()
		switch c := info.Clone; {
		case c != nil && c.Hydrated && c.AutoLinear && r.hooks.autoLinearPending != nil:
			// auto_linear: done once the daemon swapped it to linear.
			var swapErr error
			if settled, swapErr = r.hooks.autoLinearPending(d); swapErr != nil {
				return info, wrapErr(ErrFailed, swapErr, "device %s is hydrated, but its auto_linear swap to linear failed (retrying)", name)
			}
			// A nil settled (no watcher yet, or the swap just ended) is
			// looked at again on the tick.
		case c == nil || c.Hydrated:
			if settled == nil && r.hooks.autoLinearPending != nil {
				// Already swapped, perhaps still closing the clone.
				settled, _ = r.hooks.autoLinearPending(d)
			}
			if settled != nil {
				// Swapped: returns once the clone is closed and the new
				// table saved.
				select {
				case <-settled:
				case <-ctx.Done():
					return target.Info{}, ctx.Err()
				}
			}
			return info, nil
		case c.Mode == "Fail":
			return info, newErr(ErrFailed, "device %s: metadata is in Fail mode: hydration cannot complete", name)
		case c.HydrationStopped != "":
			return info, newErr(ErrFailed, "device %s: hydration stopped: %s", name, c.HydrationStopped)
		}
		select {
		case <-events:
		case <-tick.C:
		case <-settled:
		case <-d.removed:
			return target.Info{}, newErr(ErrNotFound, "device %s was removed", name)
		case <-ctx.Done():
			return target.Info{}, ctx.Err()
		}
	}
}

// restore rebuilds every device in the state directory. A device that
// fails is registered as failed, never fatal (invariant 5).
func (r *registry) restore(ctx context.Context) error {
	ents, err := r.state.list()
	if err != nil {
		return err
	}
	// A parent comes up before the devices that read it (dev:NAME).
	for _, e := range restoreOrder(ents) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.restoreOne(ctx, e)
	}
	return nil
}

func (r *registry) restoreOne(ctx context.Context, e stateEntry) {
	tbl, err := target.Table{}, e.err
	if err == nil {
		tbl, err = parseTable(e.rec.Table, e.rec.Dir)
	}
	d := newDevice(e.name, tbl, e.rec.Dir, e.rec.Created, r.log)
	if err := r.reserve(d); err != nil {
		d.log.Error("restoring device", "err", err)
		return
	}
	if err == nil {
		var t target.Target
		t, err = r.build(ctx, tbl, r.env(e.name, e.rec.Dir))
		if err == nil {
			if err = t.Resume(); err != nil {
				t.Close()
			} else {
				d.publish(&handle{t: t, table: tbl, dir: e.rec.Dir, running: true})
			}
		}
		if err != nil {
			err = buildErr(err)
		}
	}
	if err != nil {
		d.setFailed(err)
		d.gate.fail(target.ErrIO)
		d.log.Error("restoring device failed; it is listed as failed", "table", e.rec.Table, "err", err)
		r.emit(d, EventFailed, err.Error())
	} else {
		d.log.Info("device restored", "table", tbl.String(), "dir", e.rec.Dir)
		r.emit(d, EventRestored, "")
	}
	d.mu.Lock()
	d.ready = true
	d.mu.Unlock()
	r.tableLive(d)
}

// shutdown drains, suspends and closes every device (invariant 7). The
// state files stay: the next start restores the devices.
func (r *registry) shutdown(ctx context.Context, timeout time.Duration) error {
	r.mu.Lock()
	r.closed = true
	devs := make([]*device, 0, len(r.devices))
	for _, d := range r.devices {
		devs = append(devs, d)
	}
	r.mu.Unlock()
	var errs []error
	// Children first: their last copies still read a running parent.
	for _, d := range shutdownOrder(devs) {
		if err := r.shutdownOne(ctx, d, timeout); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", d.name, err))
		}
	}
	return errors.Join(errs...)
}

func (r *registry) shutdownOne(ctx context.Context, d *device, timeout time.Duration) error {
	unlock, err := d.lockOps(ctx)
	if errors.Is(err, ErrNotFound) {
		return nil // removed meanwhile (or its create failed)
	}
	if err != nil {
		return err
	}
	defer unlock()
	var errs []error
	h := d.liveOpsHeld()
	if h != nil && !d.isSuspended() {
		if err := r.suspendOpsHeld(ctx, d, timeout); err != nil {
			errs = append(errs, err)
		}
	}
	// Whatever waits at the gate, or still arrives, gets ESHUTDOWN.
	d.gate.fail(errShutdown)
	dctx, cancel := context.WithTimeout(ctx, timeout)
	_, err = d.gate.drain(dctx)
	cancel()
	if err != nil {
		errs = append(errs, fmt.Errorf("drain: %w", err))
	}
	if h != nil {
		d.unpublish()
		if err := r.retire(ctx, d, h); err != nil {
			errs = append(errs, err)
		}
	}
	d.mu.Lock()
	in := d.inactive
	d.inactive = nil
	d.mu.Unlock()
	if in != nil && in.t != nil {
		in.t.Close()
	}
	d.setFailed(newErr(ErrClosed, "the nbdclone daemon is shutting down"))
	r.unregister(d)
	if len(errs) == 0 {
		d.log.Info("device shut down")
	}
	return errors.Join(errs...)
}

// nbdserver.Exports.
var _ nbdserver.Exports = (*registry)(nil)

// exportLocked returns a device NBD may use: ready, with a live target
// (or in the middle of a swap). Needs r.mu.
func (r *registry) exportLocked(name string) *device {
	d := r.devices[name]
	if d == nil {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.ready || d.gone || (d.live == nil && d.swapping == nil) {
		return nil
	}
	return d
}

func (r *registry) Lookup(name string) (nbdserver.Export, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if d := r.exportLocked(name); d != nil {
		return d.metered(), true
	}
	return nil, false
}

func (r *registry) Open(name string) (nbdserver.Export, func(), bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d := r.exportLocked(name)
	if d == nil {
		return nil, nil, false
	}
	d.mu.Lock()
	d.conns++
	d.mu.Unlock()
	var once sync.Once
	release := func() {
		once.Do(func() {
			d.mu.Lock()
			d.conns--
			d.mu.Unlock()
		})
	}
	return d.metered(), release, true
}

func (r *registry) List() []nbdserver.ExportInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []nbdserver.ExportInfo
	for name := range r.devices {
		d := r.exportLocked(name)
		if d == nil {
			continue
		}
		d.mu.Lock()
		desc := fmt.Sprintf("nbdclone %s device, %d sectors", d.table.Type, d.table.Length)
		d.mu.Unlock()
		out = append(out, nbdserver.ExportInfo{Name: name, Description: desc})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
