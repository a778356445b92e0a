package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdclone/nbdclone/nbdkernel"
)

// Attachment defaults and bounds.
const (
	// DefaultDeadTimeout is how long the kernel holds I/O to an attached
	// /dev/nbdX while the daemon is away (a restart), before failing it.
	DefaultDeadTimeout = 2 * time.Minute
	maxAttachConns     = 16
	handshakeTimeout   = 10 * time.Second
	attachDirName      = "attachments"
	backendPrefix      = "nbdclone:"
)

// Attachment states.
const (
	AttachAttached = "attached"
	AttachFailed   = "failed"
)

// AttachOptions tune an attachment.
type AttachOptions struct {
	// Connections is the number of NBD connections (the kernel spreads
	// requests over them); 0 means 1.
	Connections int `json:"connections,omitempty"`
	// Timeout fails a request not answered in this long, and the kernel
	// then drops the connection; 0 (the default) never times out, which
	// suspends need: requests wait at a suspended device.
	Timeout time.Duration `json:"timeout,omitempty"`
	// DeadTimeout is how long the kernel holds I/O while every connection
	// is dead (the daemon restarting); 0 means DefaultDeadTimeout, a
	// negative value fails such I/O at once.
	DeadTimeout time.Duration `json:"dead_timeout,omitempty"`
	// BlockSize is the logical block size of /dev/nbdX; 0 picks the
	// export's preferred size, at most 4096.
	BlockSize uint32 `json:"block_size,omitempty"`
}

// Attachment is one /dev/nbdX the daemon connected to an export.
type Attachment struct {
	Device string `json:"device"` // /dev/nbdN
	Name   string `json:"name"`   // the device (export) it shows
	AttachOptions
	// BlockSize in AttachOptions is the one in force.
	State string `json:"state"` // AttachAttached or AttachFailed
	// Error says why a failed attachment is not connected.
	Error string `json:"error,omitempty"`
	index int
}

type (
	attachRequest struct {
		Device string `json:"device"`
		AttachOptions
	}
	detachRequest struct {
		Device string `json:"device"`
		Force  bool   `json:"force"`
	}
)

// attacher connects the kernel's NBD client to the daemon's exports, over
// socket pairs whose server ends it hands to the NBD server through an
// in-process listener, so attachments work whatever the NBD listeners are
// (TLS included). Attachments are recorded in the state directory and
// reconnected at start: the kernel keeps a device whose connections died
// (with the daemon) and takes new sockets in place of the dead ones.
type attacher struct {
	log      *slog.Logger
	reg      *registry
	dir      string // <state>/attachments
	listener *connListener

	mu sync.Mutex
	// Guarded by mu.
	byDevice map[string]*Attachment
	busy     map[string]bool // devices and names with an attach or detach under way
}

func newAttacher(log *slog.Logger, reg *registry, stateDir string) *attacher {
	return &attacher{
		log:      log.With("component", "attach"),
		reg:      reg,
		dir:      filepath.Join(stateDir, attachDirName),
		listener: newConnListener(),
		byDevice: map[string]*Attachment{},
		busy:     map[string]bool{},
	}
}

// attachedTo is the registry hook: the /dev/nbdX name is attached to.
func (a *attacher) attachedTo(name string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, at := range a.byDevice {
		if at.Name == name {
			return at.Device
		}
	}
	return ""
}

func (a *attacher) list() []Attachment {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]Attachment, 0, len(a.byDevice))
	for _, at := range a.byDevice {
		out = append(out, *at)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].index < out[j].index })
	return out
}

// kernelErr gives an nbdkernel error its kind.
func kernelErr(err error) error {
	switch {
	case errors.Is(err, nbdkernel.ErrNoModule):
		return newErr(ErrInvalid, "%s", nbdkernel.ErrNoModule.Error())
	case errors.Is(err, nbdkernel.ErrBusy):
		return wrapErr(ErrBusy, err, "")
	case errors.Is(err, nbdkernel.ErrNoDevice), errors.Is(err, nbdkernel.ErrNotNBD):
		return wrapErr(ErrInvalid, err, "")
	default:
		return wrapErr(ErrInternal, err, "")
	}
}

// canonical returns /dev/nbdN and N for a path naming an nbd device.
func canonical(path string) (string, int, error) {
	idx, err := nbdkernel.DeviceIndex(path)
	if err != nil {
		return "", 0, kernelErr(err)
	}
	return fmt.Sprintf("/dev/nbd%d", idx), idx, nil
}

// claim marks keys busy, or says which one already is.
func (a *attacher) claim(keys ...string) (func(), error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, k := range keys {
		if a.busy[k] {
			return nil, newErr(ErrBusy, "%s: another attach or detach is under way", k)
		}
	}
	for _, k := range keys {
		a.busy[k] = true
	}
	return func() {
		a.mu.Lock()
		for _, k := range keys {
			delete(a.busy, k)
		}
		a.mu.Unlock()
	}, nil
}

// attach connects /dev/nbdX (req.Device) to the export name.
func (a *attacher) attach(ctx context.Context, name string, req attachRequest) (Attachment, error) {
	opts := req.AttachOptions
	if opts.Connections == 0 {
		opts.Connections = 1
	}
	if opts.Connections < 1 || opts.Connections > maxAttachConns {
		return Attachment{}, newErr(ErrInvalid, "--connections %d: want 1 to %d", opts.Connections, maxAttachConns)
	}
	if opts.Timeout < 0 {
		return Attachment{}, newErr(ErrInvalid, "--timeout %v: negative", opts.Timeout)
	}
	if opts.DeadTimeout == 0 {
		opts.DeadTimeout = DefaultDeadTimeout
	}
	if _, err := a.reg.get(name); err != nil {
		return Attachment{}, err
	}
	dev, idx, err := canonical(req.Device)
	if err != nil {
		return Attachment{}, err
	}
	release, err := a.claim(dev, "name "+name)
	if err != nil {
		return Attachment{}, err
	}
	defer release()
	a.mu.Lock()
	old := a.byDevice[dev]
	var other *Attachment
	for _, at := range a.byDevice {
		if at.Name == name && at.Device != dev {
			other = at
		}
	}
	a.mu.Unlock()
	switch {
	case other != nil:
		// Two block devices on one export would cache it twice, each
		// blind to the other's writes.
		return Attachment{}, newErr(ErrBusy, "device %s is already attached to %s", name, other.Device)
	case old != nil && old.State == AttachAttached && old.Name == name:
		return Attachment{}, newErr(ErrExists, "device %s is already attached to %s", name, dev)
	case old != nil && old.State == AttachAttached:
		return Attachment{}, newErr(ErrBusy, "%s is busy: attached to device %s", dev, old.Name)
	}
	at := &Attachment{Device: dev, Name: name, AttachOptions: opts, State: AttachAttached, index: idx}
	if err := a.connect(ctx, at, false); err != nil {
		return Attachment{}, err
	}
	if err := a.save(at); err != nil {
		nbdkernel.Disconnect(idx)
		return Attachment{}, err
	}
	a.mu.Lock()
	a.byDevice[dev] = at
	a.mu.Unlock()
	a.log.Info("attached", "device", name, "nbd", dev, "connections", opts.Connections,
		"block_size", at.BlockSize, "timeout", opts.Timeout, "dead_timeout", opts.DeadTimeout)
	a.reg.emitTable(name, EventAttached, "", dev)
	return *at, nil
}

// connect opens at.Connections NBD connections to the export and gives
// them to the kernel: a new connection, or (reconnect) in place of the
// dead ones of a device the kernel kept across a daemon restart.
func (a *attacher) connect(ctx context.Context, at *Attachment, reconnect bool) error {
	var (
		socks []*os.File
		conns []net.Conn
		exp   nbdkernel.Export
	)
	defer func() {
		for _, s := range socks {
			s.Close() // the kernel holds its own reference
		}
	}()
	fail := func(err error) error {
		for _, c := range conns {
			c.Close()
		}
		return err
	}
	for range at.Connections {
		srv, cli, err := socketPair()
		if err != nil {
			return fail(wrapErr(ErrInternal, err, "socket pair"))
		}
		conns = append(conns, srv)
		if err := a.listener.push(ctx, srv); err != nil {
			cli.Close()
			return fail(err)
		}
		c, err := net.FileConn(cli)
		if err != nil {
			cli.Close()
			return fail(wrapErr(ErrInternal, err, "socket pair"))
		}
		exp, err = nbdkernel.Handshake(c, at.Name, handshakeTimeout)
		c.Close() // a dup of cli
		if err == nil {
			err = setBlocking(cli)
		}
		if err != nil {
			cli.Close()
			return fail(wrapErr(ErrInternal, err, ""))
		}
		socks = append(socks, cli)
	}
	backend := backendPrefix + at.Name
	if reconnect {
		if err := nbdkernel.Reconfigure(at.index, backend, socks); err != nil {
			return fail(kernelErr(err))
		}
		return nil
	}
	bs, err := nbdkernel.BlockSize(exp, at.BlockSize)
	if err != nil {
		return fail(wrapErr(ErrInvalid, err, ""))
	}
	at.BlockSize = bs
	deadTimeout := max(at.DeadTimeout, 0)
	err = nbdkernel.Connect(nbdkernel.Config{
		Index: at.index, Size: exp.Size, BlockSize: bs, Flags: exp.Flags,
		Timeout: at.Timeout, DeadConnTimeout: deadTimeout,
		Backend: backend, Sockets: socks,
	})
	if err != nil {
		return fail(kernelErr(err))
	}
	return nil
}

// detach disconnects /dev/nbdX. Without force it is refused while the
// device is mounted or held open exclusively: the kernel fails the I/O it
// still has queued.
func (a *attacher) detach(ctx context.Context, path string, force bool) error {
	dev, idx, err := canonical(path)
	if err != nil {
		return err
	}
	release, err := a.claim(dev)
	if err != nil {
		return err
	}
	defer release()
	a.mu.Lock()
	at := a.byDevice[dev]
	a.mu.Unlock()
	if at == nil {
		if connected, err := nbdkernel.Connected(idx); err == nil && connected {
			return newErr(ErrInvalid, "%s was not attached by nbdclone (nbd-client -d %s detaches it)", dev, dev)
		}
		return newErr(ErrNotFound, "%s is not attached", dev)
	}
	if !force {
		if err := exclusiveCheck(dev); err != nil {
			return err
		}
	}
	if err := nbdkernel.Disconnect(idx); err != nil && at.State == AttachAttached {
		return kernelErr(err)
	}
	if err := a.forget(at); err != nil {
		return err
	}
	a.log.Info("detached", "device", at.Name, "nbd", dev, "forced", force)
	a.reg.emitTable(at.Name, EventDetached, "", dev)
	return nil
}

// exclusiveCheck fails with ErrBusy while dev is mounted or held open
// exclusively (O_EXCL on a block device claims it, as mount does).
func exclusiveCheck(dev string) error {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EBUSY) {
		return newErr(ErrBusy, "%s is busy: mounted or held open (unmount it first, or detach --force)", dev)
	}
	if err == nil {
		unix.Close(fd)
	}
	return nil
}

// removing is the registry hook: a device attached to /dev/nbdX is not
// removed unless forced, and then detached first.
func (a *attacher) removing(ctx context.Context, name string, force bool) error {
	dev := a.attachedTo(name)
	if dev == "" {
		return nil
	}
	if !force {
		return newErr(ErrBusy, "device %s is attached to %s: nbdclone detach %s first (or remove --force)", name, dev, dev)
	}
	return a.detach(ctx, dev, true)
}

func (a *attacher) forget(at *Attachment) error {
	a.mu.Lock()
	if a.byDevice[at.Device] == at {
		delete(a.byDevice, at.Device)
	}
	a.mu.Unlock()
	err := os.Remove(a.recordPath(at.Device))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return wrapErr(ErrInternal, err, "forgetting %s", at.Device)
	}
	return nil
}

func (a *attacher) recordPath(dev string) string {
	return filepath.Join(a.dir, filepath.Base(dev)+stateExt)
}

// save records at atomically (as stateDir.save does).
func (a *attacher) save(at *Attachment) error {
	if err := os.MkdirAll(a.dir, 0o700); err != nil {
		return wrapErr(ErrInternal, err, "attachment state")
	}
	rec := *at
	rec.State, rec.Error = "", ""
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return wrapErr(ErrInternal, err, "attachment state")
	}
	return writeAtomic(a.dir, a.recordPath(at.Device), append(data, '\n'))
}

func writeAtomic(dir, path string, data []byte) error {
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return wrapErr(ErrInternal, err, "attachment state")
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = stateDir{dir: dir}.syncDir()
	}
	if err != nil {
		os.Remove(tmp)
		return wrapErr(ErrInternal, err, "attachment state")
	}
	return nil
}

// restore reconnects every recorded attachment: in place of the dead
// connections of a device the kernel kept (its I/O was held meanwhile),
// or anew. One that fails is kept and listed as failed.
func (a *attacher) restore(ctx context.Context) {
	ents, err := os.ReadDir(a.dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			a.log.Error("reading attachments", "err", err)
		}
		return
	}
	for _, e := range ents {
		fn := e.Name()
		if strings.HasPrefix(fn, ".") {
			os.Remove(filepath.Join(a.dir, fn)) // an interrupted save
			continue
		}
		if !strings.HasSuffix(fn, stateExt) || ctx.Err() != nil {
			continue
		}
		var at Attachment
		data, err := os.ReadFile(filepath.Join(a.dir, fn))
		if err == nil {
			err = json.Unmarshal(data, &at)
		}
		if err != nil || at.Device == "" || at.Name == "" || at.Connections < 1 {
			a.log.Error("unreadable attachment record", "file", fn, "err", err)
			continue
		}
		at.State = AttachAttached
		a.restoreOne(ctx, &at)
		a.mu.Lock()
		a.byDevice[at.Device] = &at
		a.mu.Unlock()
	}
}

func (a *attacher) restoreOne(ctx context.Context, at *Attachment) {
	fail := func(err error) {
		at.State, at.Error = AttachFailed, err.Error()
		a.log.Error("attachment not restored; it is listed as failed", "device", at.Name, "nbd", at.Device, "err", err)
	}
	_, idx, err := canonical(at.Device)
	if err != nil {
		fail(err)
		return
	}
	at.index = idx
	if _, err := a.reg.get(at.Name); err != nil {
		fail(err)
		return
	}
	connected, err := nbdkernel.Connected(idx)
	if err != nil {
		fail(kernelErr(err))
		return
	}
	reconnect := false
	if connected {
		if b := nbdkernel.Backend(idx); b != backendPrefix+at.Name {
			fail(newErr(ErrBusy, "%s is connected to something else now (backend %q)", at.Device, b))
			return
		}
		reconnect = true
	}
	if err := a.connect(ctx, at, reconnect); err != nil {
		fail(err)
		return
	}
	a.log.Info("attachment restored", "device", at.Name, "nbd", at.Device, "reconnected", reconnect)
}

// socketPair returns the two ends of a unix stream socket pair: the
// server's as a net.Conn, the kernel's as a file.
func socketPair() (net.Conn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	sf := os.NewFile(uintptr(fds[0]), "nbd-server")
	srv, err := net.FileConn(sf)
	sf.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return srv, os.NewFile(uintptr(fds[1]), "nbd-kernel"), nil
}

// setBlocking clears O_NONBLOCK, which net.FileConn set on the shared open
// file: the kernel's socket is used with blocking semantics.
func setBlocking(f *os.File) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.SetNonblock(int(fd), false) }); err != nil {
		return err
	}
	return serr
}

// connListener is an in-process net.Listener: Accept returns the
// connections push gives it.
type connListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newConnListener() *connListener {
	return &connListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *connListener) push(ctx context.Context, c net.Conn) error {
	select {
	case l.ch <- c:
		return nil
	case <-l.done:
		return newErr(ErrClosed, "the nbdclone daemon is shutting down")
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return attachAddr{} }

type attachAddr struct{}

func (attachAddr) Network() string { return "attach" }
func (attachAddr) String() string  { return "attach:/dev/nbdX" }
