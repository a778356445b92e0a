package daemon

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Errors returned by the daemon and by Client wrap one of
// them; test with errors.Is. The text users see is the wrapping error's, not
// the sentinel's.
var (
	// ErrInvalid: a bad name, table line, argument, or a constructor (dm)
	// error from the target.
	ErrInvalid = errors.New("daemon: invalid request")
	// ErrNotFound: no device has that name.
	ErrNotFound = errors.New("daemon: no such device")
	// ErrExists: a device name, or a socket another daemon listens on,
	// already in use.
	ErrExists = errors.New("daemon: already exists")
	// ErrBusy: remove of a device with open NBD connections.
	ErrBusy = errors.New("daemon: device is busy")
	// ErrTimeout: in-flight I/O did not drain in time on suspend.
	ErrTimeout = errors.New("daemon: timed out")
	// ErrFailed: the device has no live target (it failed to rebuild).
	ErrFailed = errors.New("daemon: device failed")
	// ErrClosed: the daemon is shutting down.
	ErrClosed = errors.New("daemon: shutting down")
	// ErrUnreachable: the client cannot connect to the control socket.
	ErrUnreachable = errors.New("daemon: cannot reach the daemon")
	// ErrInternal: anything else (an I/O error writing state, a target
	// failing to suspend).
	ErrInternal = errors.New("daemon: internal error")
)

// errShutdown is what NBD I/O gets from a device being removed or a daemon
// shutting down: ESHUTDOWN is NBD's own code for it.
var errShutdown = fmt.Errorf("daemon: device is going away: %w", syscall.ESHUTDOWN)

// opError is an error meant for the user: Error is exactly the text the CLI
// prints, Unwrap exposes the sentinel kind and the cause (a *target.DMError,
// say) for errors.Is and errors.As.
type opError struct {
	kind  error
	msg   string
	cause error
}

func (e *opError) Error() string { return e.msg }
func (e *opError) Unwrap() []error {
	if e.cause == nil {
		return []error{e.kind}
	}
	return []error{e.kind, e.cause}
}

func newErr(kind error, format string, args ...any) error {
	return &opError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// wrapErr gives cause the kind, keeping cause's text unless format is set
// (then the text is format's, followed by ": " and cause's).
func wrapErr(kind, cause error, format string, args ...any) error {
	msg := cause.Error()
	if format != "" {
		msg = fmt.Sprintf(format, args...) + ": " + msg
	}
	return &opError{kind: kind, msg: msg, cause: cause}
}

func errNotFound(name string) error {
	return newErr(ErrNotFound, "device %s does not exist", name)
}
