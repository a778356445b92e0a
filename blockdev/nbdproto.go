package blockdev

import (
	"fmt"
	"syscall"
)

// nbdMaxBlockStatusBytes is the most one BLOCK_STATUS asks about.
const nbdMaxBlockStatusBytes = 1 << 30

// nbdErrno is an error a server reported for one request.
type nbdErrno uint32

func (e nbdErrno) Error() string {
	return fmt.Sprintf("NBD server error %d (%v)", uint32(e), syscall.Errno(e))
}

// Unwrap makes errors.Is(err, syscall.EIO) work.
func (e nbdErrno) Unwrap() error { return syscall.Errno(e) }

// transient reports whether retrying the request may succeed: I/O errors,
// memory pressure and a shutting-down server pass; bad arguments,
// permissions and unsupported requests do not.
func (e nbdErrno) transient() bool {
	switch syscall.Errno(e) {
	case syscall.EIO, syscall.ENOMEM, syscall.ESHUTDOWN, syscall.EAGAIN, syscall.EINTR:
		return true
	}
	return false
}
