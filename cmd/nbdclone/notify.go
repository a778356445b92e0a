package main

import (
	"log/slog"
	"net"

	"github.com/nbdclone/nbdclone/daemon"
)

// notifyReady tells systemd (Type=notify, $NOTIFY_SOCKET) that the daemon
// is ready: its devices restored and their /dev/nbdX reattached, so the
// mounts ordered after it find their devices. It returns when ran closes
// (Run returned) if that comes first.
func notifyReady(d *daemon.Daemon, ran <-chan struct{}, getenv func(string) string, log *slog.Logger) {
	sock := getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	select {
	case <-d.Ready():
	case <-ran:
		return
	}
	if sock[0] == '@' {
		sock = "\x00" + sock[1:] // an abstract socket
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		log.Warn("telling systemd the daemon is ready", "err", err)
		return
	}
	defer c.Close()
	if _, err := c.Write([]byte("READY=1\nSTATUS=serving\n")); err != nil {
		log.Warn("telling systemd the daemon is ready", "err", err)
	}
}
