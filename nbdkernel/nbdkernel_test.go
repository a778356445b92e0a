package nbdkernel

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeServer answers one handshake on conn with the given replies to
// NBD_OPT_GO and returns what the client sent.
func fakeServer(t *testing.T, conn net.Conn, replies ...[]byte) <-chan []byte {
	t.Helper()
	sent := make(chan []byte, 1)
	go func() {
		defer conn.Close()
		var greeting []byte
		greeting = be.AppendUint64(greeting, 0x4e42444d41474943)
		greeting = be.AppendUint64(greeting, 0x49484156454F5054)
		greeting = be.AppendUint16(greeting, 1|2) // FIXED_NEWSTYLE | NO_ZEROES
		conn.Write(greeting)
		buf := make([]byte, 4+16)
		if _, err := io.ReadFull(conn, buf); err != nil {
			sent <- nil
			return
		}
		data := make([]byte, be.Uint32(buf[16:]))
		io.ReadFull(conn, data)
		sent <- append(buf, data...)
		for _, r := range replies {
			conn.Write(r)
		}
		// Nothing after the ACK may be read by the client: send a byte
		// the client must leave for the kernel.
		conn.Write([]byte{0xee})
		io.Copy(io.Discard, conn)
	}()
	return sent
}

func reply(typ uint32, data []byte) []byte {
	var b []byte
	b = be.AppendUint64(b, 0x3e889045565a9)
	b = be.AppendUint32(b, 7)
	b = be.AppendUint32(b, typ)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func TestHandshake(t *testing.T) {
	client, server := net.Pipe()
	export := be.AppendUint64(be.AppendUint16(nil, 0), 64<<20)
	export = be.AppendUint16(export, FlagHasFlags|FlagSendFlush|FlagSendFUA|FlagSendTrim|FlagCanMultiConn)
	bs := be.AppendUint16(nil, 3)
	bs = be.AppendUint32(be.AppendUint32(be.AppendUint32(bs, 1), 65536), 32<<20)
	sent := fakeServer(t, server, reply(3, []byte{0, 1, 'x'}), reply(3, export), reply(3, bs), reply(1, nil))
	exp, err := Handshake(client, "clone", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	want := Export{Size: 64 << 20, Flags: FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagCanMultiConn,
		MinBlock: 1, PreferredBlock: 65536, MaxBlock: 32 << 20}
	if exp != want {
		t.Errorf("export %+v, want %+v", exp, want)
	}
	// Client flags (fixed newstyle, no zeroes), then NBD_OPT_GO for
	// "clone" with one information request, NBD_INFO_BLOCK_SIZE.
	got := <-sent
	wantSent := []byte{0, 0, 0, 3, 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 7, 0, 0, 0, 13,
		0, 0, 0, 5, 'c', 'l', 'o', 'n', 'e', 0, 1, 0, 3}
	if !bytes.Equal(got, wantSent) {
		t.Errorf("client sent %x, want %x", got, wantSent)
	}
	// The byte after the ACK is still there.
	b := make([]byte, 1)
	if _, err := io.ReadFull(client, b); err != nil || b[0] != 0xee {
		t.Errorf("the handshake read past the ACK: %x, %v", b, err)
	}
	client.Close()
}

func TestHandshakeErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		replies [][]byte
		want    string
	}{
		{"unknown export", [][]byte{reply(1<<31|6, []byte("unknown export \"clone\""))}, `no such export (unknown export "clone")`},
		{"TLS required", [][]byte{reply(1<<31|5, []byte("TLS required"))}, "the server refused NBD_OPT_GO (error 0x80000005): TLS required"},
		{"no export info", [][]byte{reply(1, nil)}, "without NBD_INFO_EXPORT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer client.Close()
			fakeServer(t, server, tc.replies...)
			_, err := Handshake(client, "clone", 5*time.Second)
			if !errors.Is(err, ErrHandshake) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one with %q", err, tc.want)
			}
		})
	}
}

func TestBlockSize(t *testing.T) {
	for _, tc := range []struct {
		exp      Export
		want, bs uint32
		err      bool
	}{
		{exp: Export{Size: 1 << 20, PreferredBlock: 65536}, bs: 4096},      // capped at what the kernel takes
		{exp: Export{Size: 1 << 20, PreferredBlock: 1024}, bs: 1024},       // the region size
		{exp: Export{Size: 1 << 20}, bs: 4096},                             // no preference
		{exp: Export{Size: 3 * 512, PreferredBlock: 4096}, bs: 512},        // a divisor of the size
		{exp: Export{Size: 6 * 1024, PreferredBlock: 4096}, bs: 2048},      // the largest divisor
		{exp: Export{Size: 1 << 20}, want: 512, bs: 512},                   // asked
		{exp: Export{Size: 1 << 20}, want: 8192, err: true},                // over the kernel's limit
		{exp: Export{Size: 1 << 20}, want: 1000, err: true},                // not a power of two
		{exp: Export{Size: 1 << 20, MinBlock: 4096}, want: 512, err: true}, // under the server's minimum
		{exp: Export{Size: 1536}, want: 1024, err: true},                   // does not divide
		{exp: Export{Size: 1 << 20, MinBlock: 8192}, err: true},            // no size fits both
	} {
		bs, err := BlockSize(tc.exp, tc.want)
		if (err != nil) != tc.err || (!tc.err && bs != tc.bs) {
			t.Errorf("BlockSize(%+v, %d) = %d, %v; want %d (error %v)", tc.exp, tc.want, bs, err, tc.bs, tc.err)
		}
	}
}

func TestAttrs(t *testing.T) {
	a := attrs(nil).u32(attrIndex, 3).str(attrBackendID, "nbdclone:c")
	want := []byte{8, 0, 1, 0, 3, 0, 0, 0, 15, 0, 10, 0, 'n', 'b', 'd', 'c', 'l', 'o', 'n', 'e', ':', 'c', 0, 0}
	if !bytes.Equal(a, want) {
		t.Errorf("attrs %v, want %v", []byte(a), want)
	}
	m := parseAttrs(a)
	if len(m) != 2 || ne.Uint32(m[attrIndex]) != 3 || string(m[attrBackendID]) != "nbdclone:c\x00" {
		t.Errorf("parseAttrs: %v", m)
	}
	// Sockets nest one item per fd, each holding NBD_SOCK_FD.
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	nested := parseAttrs(parseAttrs(socketsAttr(nil, []*os.File{f}))[attrSockets])
	if fd := nested[sockItem]; len(fd) != 8 || ne.Uint32(parseAttrs(fd)[sockFD]) != uint32(f.Fd()) {
		t.Errorf("sockets attribute: %v", nested)
	}
}

// TestDeviceIndexErrors: a path that is not an nbd device is refused, and a
// missing /dev/nbdX says whether the module is loaded.
func TestDeviceIndexErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	if _, err := DeviceIndex(file); !errors.Is(err, ErrNotNBD) {
		t.Errorf("DeviceIndex(a file): %v", err)
	}
	if _, err := DeviceIndex("/dev/null"); !errors.Is(err, ErrNotNBD) {
		t.Errorf("DeviceIndex(/dev/null): %v", err)
	}
	_, err := DeviceIndex("/dev/nbd-nonexistent")
	if ModuleLoaded() {
		if !errors.Is(err, ErrNoDevice) {
			t.Errorf("DeviceIndex(missing) with the module loaded: %v", err)
		}
	} else if !errors.Is(err, ErrNoModule) || err.Error() != "the nbd kernel module is not loaded: modprobe nbd" {
		t.Errorf("DeviceIndex(missing) without the module: %v", err)
	}
}

// TestNoModule: without the nbd module, the netlink family is missing and
// every operation says so. (The VM test covers the module being loaded.)
func TestNoModule(t *testing.T) {
	if ModuleLoaded() {
		t.Skip("the nbd module is loaded on this machine: the VM test covers the missing-module error (after rmmod)")
	}
	if err := Disconnect(0); !errors.Is(err, ErrNoModule) {
		t.Errorf("Disconnect without the module: %v", err)
	}
	if _, err := Connected(0); !errors.Is(err, ErrNoModule) {
		t.Errorf("Connected without the module: %v", err)
	}
}
