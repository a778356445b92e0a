package daemon

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// listenUnix listens on a unix socket at path with the given mode. The
// socket is bound under a temporary name, given its mode and renamed into
// place, so it is never reachable with looser permissions. A stale socket
// (nobody listening) is replaced; a live one is an error.
func listenUnix(path string, mode os.FileMode) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("%w: socket directory: %w", ErrInternal, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, newErr(ErrExists, "%s exists and is not a socket", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, newErr(ErrExists, "another nbdclone daemon is listening on %s", path)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT) {
			return nil, wrapErr(ErrInternal, err, "probing %s", path)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, wrapErr(ErrInternal, err, "removing the stale socket %s", path)
		}
	}
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	os.Remove(tmp)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, wrapErr(ErrInternal, err, "listen on %s", path)
	}
	// The listener is closed by the daemon, which removes path itself.
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, wrapErr(ErrInternal, err, "chmod %s", path)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, wrapErr(ErrInternal, err, "listen on %s", path)
	}
	return l, nil
}

// socketListener is a listener and how to clean up after it.
type socketListener struct {
	addr listenAddr
	net.Listener
}

// closeAndUnlink closes the listener and removes its socket file.
func (l socketListener) closeAndUnlink() {
	l.Close()
	if l.addr.network == "unix" {
		os.Remove(l.addr.addr)
	}
}

func listen(a listenAddr, mode os.FileMode) (socketListener, error) {
	if a.network == "unix" {
		l, err := listenUnix(a.addr, mode)
		if err != nil {
			return socketListener{}, err
		}
		return socketListener{addr: a, Listener: l}, nil
	}
	l, err := net.Listen("tcp", a.addr)
	if err != nil {
		return socketListener{}, wrapErr(ErrInternal, err, "listen on %s", a)
	}
	return socketListener{addr: a, Listener: l}, nil
}
