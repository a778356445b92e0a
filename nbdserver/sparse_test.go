package nbdserver

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// readChunks reads a structured READ reply and reassembles it; it returns
// the data and a description of the chunks ("D<off>+<n>", "H<off>+<n>").
func (rc *rawClient) readChunks(handle, off uint64, n int) ([]byte, []string) {
	rc.t.Helper()
	got := bytes.Repeat([]byte{0xee}, n) // holes must overwrite this
	covered := make([]bool, n)
	var desc []string
	for {
		c := rc.readChunk()
		if c.handle != handle {
			rc.t.Fatalf("chunk for handle %d", c.handle)
		}
		var at uint64
		var length int
		switch c.typ {
		case nbdwire.ReplyTypeOffsetData:
			at, length = be.Uint64(c.payload), len(c.payload)-8
			copy(got[at-off:], c.payload[8:])
			desc = append(desc, fmt.Sprintf("D%d+%d", at, length))
		case nbdwire.ReplyTypeOffsetHole:
			if len(c.payload) != 12 {
				rc.t.Fatalf("hole chunk of %d bytes", len(c.payload))
			}
			at, length = be.Uint64(c.payload), int(be.Uint32(c.payload[8:]))
			clear(got[at-off : int(at-off)+length])
			desc = append(desc, fmt.Sprintf("H%d+%d", at, length))
		default:
			rc.t.Fatalf("chunk type %d", c.typ)
		}
		if length <= 0 || at < off || int(at-off)+length > n {
			rc.t.Fatalf("chunk %d+%d outside the read %d+%d", at, length, off, n)
		}
		for i := int(at - off); i < int(at-off)+length; i++ {
			if covered[i] {
				rc.t.Fatalf("chunks overlap at %d", off+uint64(i))
			}
			covered[i] = true
		}
		if c.flags&nbdwire.ReplyFlagDone != 0 {
			break
		}
	}
	for i, ok := range covered {
		if !ok {
			rc.t.Fatalf("byte %d not covered by any chunk: %v", off+uint64(i), desc)
		}
	}
	return got, desc
}

// TestReadHoles: zero runs of 64 KiB or more, in 4 KiB blocks aligned on
// the export, come back as hole chunks; shorter runs, DF reads and simple
// replies carry the zeroes as data.
func TestReadHoles(t *testing.T) {
	const K = 1 << 10
	e, disk, _ := twoExports(t)
	content := randomBytes(9, testSize)
	clear(content[128*K : 256*K])      // a 128 KiB hole
	clear(content[300*K : 360*K])      // 60 KiB: too short
	clear(content[512*K+100 : 1024*K]) // to the end, unaligned start
	disk.fill(content)
	srv := startServer(t, e, Options{})
	rc := connect(t, srv.sock, "disk", true)

	for i, tc := range []struct {
		off, n int
		flags  uint16
		want   string
	}{
		{0, testSize, 0, fmt.Sprintf("D0+%d H%d+%d D%d+%d H%d+%d", 128*K, 128*K, 128*K, 256*K, 260*K, 516*K, 508*K)},
		{128 * K, 128 * K, 0, fmt.Sprintf("H%d+%d", 128*K, 128*K)},
		{128*K - 1, 64*K + 2, 0, fmt.Sprintf("D%d+1 H%d+%d D%d+1", 128*K-1, 128*K, 64*K, 192*K)},
		{130 * K, 64 * K, 0, fmt.Sprintf("D%d+%d", 130*K, 64*K)}, // unaligned: 62 KiB of whole blocks
		{300 * K, 60 * K, 0, fmt.Sprintf("D%d+%d", 300*K, 60*K)},
		{0, testSize, nbdwire.CmdFlagDF, fmt.Sprintf("D0+%d", testSize)},
		{128 * K, 4 * K, 0, fmt.Sprintf("D%d+%d", 128*K, 4*K)}, // short reads are not scanned
	} {
		rc.request(nbdwire.CmdRead, tc.flags, uint64(i+1), uint64(tc.off), uint32(tc.n), nil)
		got, desc := rc.readChunks(uint64(i+1), uint64(tc.off), tc.n)
		if !bytes.Equal(got, content[tc.off:tc.off+tc.n]) {
			t.Errorf("read %d+%d: wrong bytes (chunks %v)", tc.off, tc.n, desc)
		}
		if d := strings.Join(desc, " "); d != tc.want {
			t.Errorf("read %d+%d flags %#x: chunks %s, want %s", tc.off, tc.n, tc.flags, d, tc.want)
		}
	}

	// Without structured replies the zeroes are data in a simple reply.
	plain := connect(t, srv.sock, "disk", false)
	plain.request(nbdwire.CmdRead, 0, 1, 128*K, 128*K, nil)
	if errno, _, data := plain.readSimple(128 * K); errno != 0 || !bytes.Equal(data, content[128*K:256*K]) {
		t.Fatalf("simple read: errno %d", errno)
	}
}
