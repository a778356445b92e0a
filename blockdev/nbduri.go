package blockdev

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// ErrBadURI: a source URI that cannot be parsed or uses an unknown scheme.
var ErrBadURI = errors.New("blockdev: bad source URI")

// nbdAddress is a parsed NBD URI (the NBD project's uri.md):
// nbd[s]://host[:port]/export and nbd[s]+unix:///export?socket=PATH.
type nbdAddress struct {
	network, address string // "unix" and a socket path, or "tcp" and host:port
	export           string
	tls              bool
	// tlsCertDir holds ca-cert.pem (libnbd's tls-certificates): the CA
	// that signs the server's certificate; system roots when empty.
	tlsCertDir string
	// tlsVerify is false only with tls-verify-peer=false.
	tlsVerify  bool
	serverName string
}

// isNBDURI reports whether spec names an NBD export.
func isNBDURI(spec string) bool {
	for _, s := range []string{"nbd://", "nbds://", "nbd+unix://", "nbds+unix://"} {
		if strings.HasPrefix(strings.ToLower(spec), s) {
			return true
		}
	}
	return false
}

func parseNBDURI(spec string) (nbdAddress, error) {
	u, err := url.Parse(spec)
	if err != nil {
		return nbdAddress{}, fmt.Errorf("%w: %w", ErrBadURI, err)
	}
	a := nbdAddress{tlsVerify: true}
	scheme := strings.ToLower(u.Scheme)
	switch scheme {
	case "nbd", "nbds":
		if u.Hostname() == "" {
			return nbdAddress{}, fmt.Errorf("%w: %s: no host", ErrBadURI, spec)
		}
		port := u.Port()
		if port == "" {
			port = nbdwire.DefaultPort
		}
		a.network, a.address, a.serverName = "tcp", net.JoinHostPort(u.Hostname(), port), u.Hostname()
	case "nbd+unix", "nbds+unix":
		if u.Host != "" {
			return nbdAddress{}, fmt.Errorf("%w: %s: a unix-socket URI has no host (nbd+unix:///export?socket=PATH)", ErrBadURI, spec)
		}
		sock := u.Query().Get("socket")
		if sock == "" {
			return nbdAddress{}, fmt.Errorf("%w: %s: no socket= parameter", ErrBadURI, spec)
		}
		if !filepath.IsAbs(sock) {
			return nbdAddress{}, fmt.Errorf("%w: %s: the socket path must be absolute", ErrBadURI, spec)
		}
		a.network, a.address, a.serverName = "unix", sock, "localhost"
	default:
		return nbdAddress{}, fmt.Errorf("%w: %s: unknown scheme %q", ErrBadURI, spec, u.Scheme)
	}
	a.tls = strings.HasPrefix(scheme, "nbds")
	a.export = strings.TrimPrefix(u.Path, "/")
	q := u.Query()
	a.tlsCertDir = q.Get("tls-certificates")
	switch strings.ToLower(q.Get("tls-verify-peer")) {
	case "", "true", "1", "yes":
	case "false", "0", "no":
		a.tlsVerify = false
	default:
		return nbdAddress{}, fmt.Errorf("%w: %s: tls-verify-peer=%q", ErrBadURI, spec, q.Get("tls-verify-peer"))
	}
	if h := q.Get("tls-hostname"); h != "" {
		a.serverName = h
	}
	return a, nil
}
