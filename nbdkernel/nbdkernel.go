package nbdkernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Sentinel errors; the texts are what users see.
var (
	ErrNoModule   = errors.New("the nbd kernel module is not loaded: modprobe nbd")
	ErrNoDevice   = errors.New("nbdkernel: no such nbd device")
	ErrNotNBD     = errors.New("nbdkernel: not an nbd device")
	ErrBusy       = errors.New("nbdkernel: nbd device is busy")
	ErrPermission = errors.New("nbdkernel: permission denied: attaching /dev/nbdX needs root (CAP_SYS_ADMIN)")
)

// nbdMajor is NBD_MAJOR (include/uapi/linux/major.h).
const nbdMajor = 43

// ModuleLoaded reports whether the nbd module (or a built-in nbd driver)
// is present.
func ModuleLoaded() bool {
	_, err := os.Stat("/sys/module/nbd")
	return err == nil
}

// DeviceIndex returns N for /dev/nbdN (any path to that block device).
func DeviceIndex(path string) (int, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			if !ModuleLoaded() {
				return 0, ErrNoModule
			}
			return 0, fmt.Errorf("%w: %s does not exist", ErrNoDevice, path)
		}
		return 0, fmt.Errorf("%w: %s: %w", ErrNoDevice, path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(st.Rdev) != nbdMajor {
		return 0, fmt.Errorf("%w: %s is not /dev/nbdN (a block device of major %d)", ErrNotNBD, path, nbdMajor)
	}
	link, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev)))
	if err != nil {
		return 0, fmt.Errorf("%w: %s: %w", ErrNoDevice, path, err)
	}
	base := filepath.Base(link)
	idx, err := strconv.Atoi(strings.TrimPrefix(base, "nbd"))
	if err != nil || !strings.HasPrefix(base, "nbd") {
		return 0, fmt.Errorf("%w: %s is %s, a partition, not a whole nbd device", ErrNotNBD, path, base)
	}
	return idx, nil
}

// Config is a kernel NBD connection.
type Config struct {
	Index     int
	Size      uint64
	BlockSize uint32
	// Flags are the transmission flags the server advertised.
	Flags uint16
	// Timeout fails a request the server has not answered in this long
	// (the kernel then drops the connection); 0 never times out.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds I/O when every
	// connection is dead, waiting for Reconfigure (a daemon restart);
	// 0 fails such I/O at once.
	DeadConnTimeout time.Duration
	// Backend identifies who attached the device (sysfs "backend").
	Backend string
	// Sockets have finished their handshake (Handshake). The kernel takes
	// its own reference; the caller closes its files afterwards.
	Sockets []*os.File
}

func seconds(d time.Duration) uint64 { return uint64((d + time.Second - 1) / time.Second) }

// Connect attaches /dev/nbd<Index> to cfg.Sockets.
func Connect(cfg Config) error {
	if len(cfg.Sockets) == 0 {
		return errors.New("nbdkernel: no socket")
	}
	if len(cfg.Sockets) > 1 && cfg.Flags&FlagCanMultiConn == 0 {
		return errors.New("nbdkernel: the server does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN)")
	}
	g, fam, err := open()
	if err != nil {
		return err
	}
	defer g.close()
	a := attrs(nil).
		u32(attrIndex, uint32(cfg.Index)).
		u64(attrSizeBytes, cfg.Size).
		u64(attrBlockSizeBytes, uint64(cfg.BlockSize)).
		u64(attrServerFlags, uint64(cfg.Flags))
	if cfg.Timeout > 0 {
		a = a.u64(attrTimeout, seconds(cfg.Timeout))
	}
	if cfg.DeadConnTimeout > 0 {
		a = a.u64(attrDeadConnTimeout, seconds(cfg.DeadConnTimeout))
	}
	a = socketsAttr(a, cfg.Sockets)
	if cfg.Backend != "" {
		a = a.str(attrBackendID, cfg.Backend)
	}
	_, err = g.request(fam, cmdConnect, nbdVersion, a)
	return deviceErr(cfg.Index, "connect", err)
}

// Reconfigure gives a connected device whose connections died new
// sockets, in place of its dead ones (after a daemon restart). backend
// must be the one the device was connected with.
func Reconfigure(index int, backend string, socks []*os.File) error {
	g, fam, err := open()
	if err != nil {
		return err
	}
	defer g.close()
	a := attrs(nil).u32(attrIndex, uint32(index))
	if backend != "" {
		a = a.str(attrBackendID, backend)
	}
	a = socketsAttr(a, socks)
	_, err = g.request(fam, cmdReconfigure, nbdVersion, a)
	return deviceErr(index, "reconfigure", err)
}

// Disconnect detaches /dev/nbd<index>: the kernel sends NBD_CMD_DISC and
// drops its connections; I/O still queued fails.
func Disconnect(index int) error {
	g, fam, err := open()
	if err != nil {
		return err
	}
	defer g.close()
	_, err = g.request(fam, cmdDisconnect, nbdVersion, attrs(nil).u32(attrIndex, uint32(index)))
	return deviceErr(index, "disconnect", err)
}

// Connected reports whether /dev/nbd<index> has a connection set up
// (live or dead): it is then in use.
func Connected(index int) (bool, error) {
	g, fam, err := open()
	if err != nil {
		return false, err
	}
	defer g.close()
	replies, err := g.request(fam, cmdStatus, nbdVersion, attrs(nil).u32(attrIndex, uint32(index)))
	if err != nil {
		return false, deviceErr(index, "status", err)
	}
	for _, r := range replies {
		list, ok := parseAttrs(r)[attrDeviceList]
		if !ok {
			continue
		}
		item, ok := parseAttrs(list)[deviceItem]
		if !ok {
			continue
		}
		dev := parseAttrs(item)
		if idx, ok := dev[deviceIdx]; ok && len(idx) >= 4 && int(ne.Uint32(idx)) == index {
			c := dev[deviceConn]
			return len(c) > 0 && c[0] != 0, nil
		}
	}
	return false, nil
}

// Backend is the backend identifier /dev/nbd<index> was connected with, or
// "" (none, or not connected).
func Backend(index int) string {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", index))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func open() (*genl, uint16, error) {
	g, err := dialGenl()
	if err != nil {
		return nil, 0, err
	}
	fam, err := g.family()
	if err != nil {
		g.close()
		return nil, 0, err
	}
	return g, fam, nil
}

func deviceErr(index int, op string, err error) error {
	if err == nil {
		return nil
	}
	dev := fmt.Sprintf("/dev/nbd%d", index)
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case unix.EBUSY:
			return fmt.Errorf("%w: %s is already connected (by nbd-client or another attach): %w", ErrBusy, dev, err)
		case unix.EPERM, unix.EACCES:
			return fmt.Errorf("%w: %w", ErrPermission, err)
		}
	}
	return fmt.Errorf("nbdkernel: %s %s: %w", op, dev, err)
}
