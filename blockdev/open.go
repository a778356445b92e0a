package blockdev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// ContextReader is implemented by devices whose reads can be abandoned:
// remote sources. Callers with a context type-assert for it.
type ContextReader interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// ReadFullAt reads all of p at off from r, through ReadAtContext when r
// can abandon reads. A short read is an error wrapping io.ErrUnexpectedEOF
// (a source must cover what it is asked for); n says how much arrived.
func ReadFullAt(ctx context.Context, r io.ReaderAt, p []byte, off int64) (n int, err error) {
	if cr, ok := r.(ContextReader); ok {
		n, err = cr.ReadAtContext(ctx, p, off)
	} else {
		n, err = r.ReadAt(p, off)
	}
	if n == len(p) {
		return n, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = fmt.Errorf("short read: %d of %d bytes: %w", n, len(p), io.ErrUnexpectedEOF)
	}
	return n, err
}

// Identifier is implemented by sources that can name the exact version of
// their content (an http(s) object's ETag, or Last-Modified and size). A
// clone pins it in its metadata and refuses a source whose identity
// changed. "" means the source cannot be pinned.
type Identifier interface {
	SourceID() string
}

// Remote is implemented by network sources. Window is how many bytes a
// copier should keep in flight to hide the round trip (bandwidth × RTT,
// with room) and the request size that suits the source.
type Remote interface {
	Window() (inFlightBytes, requestBytes int64)
	RemoteStats() RemoteStats
}

// RemoteStats are a remote source's counters.
type RemoteStats struct {
	Requests    uint64 `json:"requests"`    // requests sent, retries included
	Retries     uint64 `json:"retries"`     // failed attempts that were retried
	Reconnects  uint64 `json:"reconnects"`  // connections re-established after a drop
	Failures    uint64 `json:"failures"`    // calls that failed after their retries
	Connections int    `json:"connections"` // connections open now (NBD)
}

// DefaultWindowBytes is the copy window of a remote source unless its
// options say otherwise (NBDOptions.WindowBytes, HTTPOptions.WindowBytes):
// how many bytes a clone keeps in flight, and so in buffers, while it
// hydrates from it.
const DefaultWindowBytes = 64 << 20

// IsRemoteSpec reports whether OpenSource opens spec as a remote source
// (an NBD URI or an http(s) URL), which hydrates with a window in flight.
func IsRemoteSpec(spec string) bool { return isNBDURI(spec) || isHTTPURL(spec) }

// SourceOptions configure OpenSource.
type SourceOptions struct {
	Logger *slog.Logger
	NBD    NBDOptions
	HTTP   HTTPOptions
}

// OpenSource opens a clone's source read-only: an NBD URI
// (nbd://, nbds://, nbd+unix://, nbds+unix://), an http:// or https:// URL,
// or else a local file or block device path.
func OpenSource(ctx context.Context, spec string, opts SourceOptions) (Reader, error) {
	switch {
	case isNBDURI(spec):
		o := opts.NBD
		if o.Logger == nil {
			o.Logger = opts.Logger
		}
		return OpenNBD(ctx, spec, o)
	case isHTTPURL(spec):
		o := opts.HTTP
		if o.Logger == nil {
			o.Logger = opts.Logger
		}
		return OpenHTTP(ctx, spec, o)
	case strings.Contains(spec, "://"):
		return nil, &uriError{spec}
	default:
		return OpenFileReadOnly(spec)
	}
}

type uriError struct{ spec string }

func (e *uriError) Error() string {
	return "blockdev: " + redactURL(e.spec) + ": unknown source scheme (nbd://, nbds://, nbd+unix://, nbds+unix://, http://, https://)"
}

func (e *uriError) Unwrap() error { return ErrBadURI }
