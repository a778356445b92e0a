package nbdserver

import (
	"errors"
	"fmt"
	"strings"
	"syscall"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// Sentinel errors. Test with errors.Is.
var (
	// ErrServerClosed is returned by Serve called after Close.
	ErrServerClosed = errors.New("nbdserver: server closed")
	// ErrInvalidOptions wraps every error Options.Validate returns.
	ErrInvalidOptions = errors.New("nbdserver: invalid options")
	// ErrNotSupported is what an Export returns from WriteZeroes when asked
	// for a fast zero it cannot do quickly; it wraps syscall.ENOTSUP, so the
	// client sees NBD_ENOTSUP and falls back to writing zeroes itself.
	ErrNotSupported = fmt.Errorf("nbdserver: operation not supported: %w", syscall.ENOTSUP)
)

// OffsetError is an Export error that knows where the request failed: the
// bytes of a READ before Offset were read correctly. With structured replies
// the server sends those bytes and an NBD_REPLY_TYPE_ERROR_OFFSET chunk, so
// the client keeps the partial success; otherwise it is an ordinary error.
// Its errno is that of Err.
type OffsetError struct {
	Offset int64 // absolute export offset of the first failed byte
	Err    error
}

func (e *OffsetError) Error() string {
	return fmt.Sprintf("at offset %d: %v", e.Offset, e.Err)
}

func (e *OffsetError) Unwrap() error { return e.Err }

// errnoOf maps an Export error to its NBD error value. Anything that is not
// one of the spec's errnos (or an alias the spec names) is EIO: the client
// must never see an errno the protocol does not define.
func errnoOf(err error) uint32 {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return nbdwire.EIO
	}
	switch errno {
	case syscall.EPERM, syscall.EROFS:
		return nbdwire.EPERM
	case syscall.EIO:
		return nbdwire.EIO
	case syscall.ENOMEM:
		return nbdwire.ENOMEM
	case syscall.EINVAL:
		return nbdwire.EINVAL
	case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG: // the spec asks for EDQUOT and EFBIG as ENOSPC
		return nbdwire.ENOSPC
	case syscall.EOVERFLOW:
		return nbdwire.EOVERFLOW
	case syscall.ENOTSUP: // == EOPNOTSUPP on Linux
		return nbdwire.ENOTSUP
	case syscall.ESHUTDOWN:
		return nbdwire.ESHUTDOWN
	default:
		return nbdwire.EIO
	}
}

// errorMessage makes err's text fit the spec's rules for strings in error
// chunks: valid UTF-8, no NUL, at most 4096 bytes.
func errorMessage(msg string) string {
	if len(msg) > nbdwire.MaxStringLen {
		msg = msg[:nbdwire.MaxStringLen]
	}
	// Dropping invalid bytes (rather than replacing them) also removes a
	// rune the truncation cut in half, so the result stays within the limit.
	msg = strings.ToValidUTF8(msg, "")
	return strings.ReplaceAll(msg, "\x00", "")
}
