package target

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/metadata"
)

// Env is what a target needs from the daemon to be built.
type Env struct {
	Logger *slog.Logger
	// Dir resolves relative paths in table arguments: the directory the
	// user ran the CLI in, not the daemon's.
	Dir string
	// OpenSource opens a clone's <source dev> read-only. Nil means local
	// files and block devices (blockdev.OpenFileReadOnly).
	OpenSource func(ctx context.Context, spec string) (blockdev.Reader, error)
	// OpenDevice opens a read-write device (a clone's destination, a linear
	// target's device) by resolved path. Nil means blockdev.OpenFile. Tests
	// wrap it to inject faults.
	OpenDevice func(path string) (blockdev.Device, error)
	// Sweep tunes background hydration beyond dm-clone's knobs (error
	// bound, backoff, progress under load); zero values mean defaults.
	Sweep SweepTuning
	// MetadataKV, if set, wraps a clone's metadata store (fault injection
	// and crash tests).
	MetadataKV func(metadata.KV) metadata.KV
}

// SweepTuning is hydrate.Options' policy part.
type SweepTuning struct {
	MaxErrors           int
	Backoff, MaxBackoff time.Duration
	BusyInterval        time.Duration
}

func (e Env) openDevice(path string) (blockdev.Device, error) {
	if e.OpenDevice != nil {
		return e.OpenDevice(path)
	}
	return blockdev.OpenFile(path)
}

func (e Env) logger() *slog.Logger {
	if e.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return e.Logger
}

// Path resolves a table path argument against Dir.
func (e Env) Path(p string) string {
	if filepath.IsAbs(p) || e.Dir == "" {
		return p
	}
	return filepath.Join(e.Dir, p)
}

func (e Env) openSource(ctx context.Context, spec string) (blockdev.Reader, error) {
	if e.OpenSource != nil {
		return e.OpenSource(ctx, spec)
	}
	return blockdev.OpenFileReadOnly(e.Path(spec))
}

// DMError is a constructor or message failure. Msg is device-mapper's own
// text (ti->error, the DMWARN of a message), so users and scripts see what
// dmesg would say for dm-clone.
type DMError struct {
	Msg string
	Err error // the cause, if any
}

func (e *DMError) Error() string {
	if e.Err == nil {
		return e.Msg
	}
	return e.Msg + ": " + e.Err.Error()
}

func (e *DMError) Unwrap() error { return e.Err }

func dmErr(msg string, cause error) error { return &DMError{Msg: msg, Err: cause} }

// Build constructs the target a table line describes. The target starts
// suspended: call Resume before I/O (dmsetup create resumes at once).
func Build(ctx context.Context, t Table, env Env) (Target, error) {
	switch t.Type {
	case "clone":
		return newClone(ctx, t, env)
	case "linear":
		return newLinear(t, env)
	default:
		return nil, dmErr(fmt.Sprintf("unknown target type %q", t.Type), nil)
	}
}

// CloneMetadataPath returns the resolved <metadata dev> of a clone table, so
// the daemon can tell when a new table reuses the live table's metadata (its
// store is then opened only once the old target has released it).
func CloneMetadataPath(t Table, env Env) (string, bool) {
	if t.Type != "clone" || len(t.Args) == 0 {
		return "", false
	}
	return filepath.Clean(env.Path(t.Args[0])), true
}

// Resolve returns t with its relative path arguments made absolute against
// dir (the directory the user ran the CLI in): a clone's metadata,
// destination and a local source, a linear target's device. Absolute paths,
// URIs and other arguments are unchanged.
func Resolve(t Table, dir string) Table {
	var paths []int
	switch t.Type {
	case "clone":
		paths = []int{0, 1, 2}
	case "linear":
		paths = []int{0}
	}
	args := append([]string(nil), t.Args...)
	for _, i := range paths {
		// An absolute path is kept as written: cleaning "a/link/../b"
		// lexically could name another file than the kernel would open.
		if i < len(args) && !isURI(args[i]) && !isDeviceSource(t, i) && !filepath.IsAbs(args[i]) && dir != "" {
			args[i] = filepath.Join(dir, args[i])
		}
	}
	t.Args = args
	return t
}

// isURI reports whether a table argument names a remote device
// (scheme://...) rather than a local path.
func isURI(s string) bool {
	i := strings.Index(s, "://")
	return i > 0 && !strings.ContainsAny(s[:i], "/.")
}

// DeviceSourcePrefix marks a clone's <source dev> that is another device of
// the same daemon ("dev:NAME"), read in process (clones of clones).
const DeviceSourcePrefix = "dev:"

// SourceDevice returns NAME when spec is "dev:NAME".
func SourceDevice(spec string) (string, bool) {
	name, ok := strings.CutPrefix(spec, DeviceSourcePrefix)
	return name, ok && name != ""
}

// CloneSource returns a clone table's <source dev> argument.
func CloneSource(t Table) (string, bool) {
	if t.Type != "clone" || len(t.Args) < 3 {
		return "", false
	}
	return t.Args[2], true
}

// WithSource returns a copy of the clone table t with its <source dev>
// replaced.
func WithSource(t Table, spec string) Table {
	args := append([]string(nil), t.Args...)
	if t.Type == "clone" && len(args) >= 3 {
		args[2] = spec
	}
	t.Args = args
	return t
}

// isDeviceSource reports whether argument i of t is a clone's "dev:NAME"
// source, which is not a path.
func isDeviceSource(t Table, i int) bool {
	_, ok := SourceDevice(t.Args[i])
	return t.Type == "clone" && i == 2 && ok
}
