package blockdev

import (
	"fmt"
	"io"
	"unsafe"

	"golang.org/x/sys/unix"
)

// zeroChunk bounds the fallback buffer; it is shared and never written.
const zeroChunk = 1 << 20

var zeroBuf [zeroChunk]byte // read-only after init: a constant, not state

// writeZeroBuffers writes zero buffers: the fallback where a device has no
// native zeroing.
func writeZeroBuffers(w io.WriterAt, off, n int64) error {
	for n > 0 {
		c := min(n, zeroChunk)
		if _, err := w.WriteAt(zeroBuf[:c], off); err != nil {
			return fmt.Errorf("blockdev: write zeroes at %d: %w", off, err)
		}
		off += c
		n -= c
	}
	return nil
}

func ioctlRange(fd uintptr, req uint, r *[2]uint64) error {
	return ioctlPtr(fd, req, unsafe.Pointer(r))
}

func ioctlPtr(fd uintptr, req uint, p unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, uintptr(req), uintptr(p))
	if errno != 0 {
		return errno
	}
	return nil
}
