package target

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nbdclone/nbdclone/blockdev"
)

// testPipe is a non-blocking pipe of size bytes, closed at cleanup:
// [0] its read end, [1] its write end.
func testPipe(t *testing.T, size int) [2]int {
	t.Helper()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, size); err != nil {
		t.Fatal(err)
	}
	return fds
}

// TestCloneSplice: a read all hydrated is spliced from the destination,
// one all unhydrated from the source (counted as a source read, as ReadAt
// counts it), one across both from each in turn. Over a source that
// cannot splice (as a remote one), only a read all hydrated is spliced,
// and any other fails before anything moves.
func TestCloneSplice(t *testing.T) {
	const M = 1 << 20
	f := newFixture(t, 4*M, 31)
	ctx := context.Background()
	written := bytes.Repeat([]byte{0x5a}, M)
	c := startClone(t, f.line(8, "1 no_hydration"), Env{}) // the source a plain file
	if err := c.WriteAt(ctx, written, M, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, written[:8192], 3*M, false); err != nil {
		t.Fatal(err)
	}
	f2 := newFixture(t, 4*M, 32)
	remote := f2.build(t, 8, "1 no_hydration") // the source wrapped: no SpliceTo
	if err := remote.WriteAt(ctx, written, M, false); err != nil {
		t.Fatal(err)
	}
	fds := testPipe(t, M)
	pipeBytes := func() []byte {
		var out []byte
		buf := make([]byte, M)
		for {
			n, err := unix.Read(fds[0], buf)
			if n <= 0 || err != nil {
				return out
			}
			out = append(out, buf[:n]...)
		}
	}
	for _, tc := range []struct {
		name       string
		c          *clone
		off        int64
		n          int
		want       []byte
		fromSource int64
	}{
		{"hydrated", c, M, M, written, 0},
		{"unhydrated", c, 2 * M, M, f.srcData[2*M : 3*M], M},
		{"across both", c, M - 12288, 20480, append(bytes.Clone(f.srcData[M-12288:M]), written[:8192]...), 12288},
		{"three runs", c, 3*M - 4096, 16384, append(append(bytes.Clone(f.srcData[3*M-4096:3*M]), written[:8192]...), f.srcData[3*M+8192:3*M+12288]...), 8192},
		{"remote, hydrated", remote, M + 4096, 8192, written[:8192], 0},
		{"remote, unhydrated", remote, 0, 8192, nil, 0},
		{"remote, across both", remote, 2*M - 4096, 8192, nil, 0},
	} {
		c := tc.c
		before := c.stats.sourceRead.Load()
		err := c.SpliceTo(ctx, fds[1], tc.off, tc.n, true)
		got := pipeBytes()
		if tc.want == nil {
			if !errors.Is(err, blockdev.ErrNoSplice) || len(got) != 0 {
				t.Fatalf("%s: %v with %d bytes in the pipe, want ErrNoSplice and none", tc.name, err, len(got))
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if !bytes.Equal(got, tc.want) {
			t.Fatalf("%s: the pipe holds %d bytes that are not the read's %d", tc.name, len(got), tc.n)
		}
		if d := c.stats.sourceRead.Load() - before; d != tc.fromSource {
			t.Fatalf("%s: %d source bytes counted, want %d", tc.name, d, tc.fromSource)
		}
	}
}

// TestCloneSpliceFrom: a write all of whose regions are hydrated is taken
// from the pipe and lands on the destination as WriteAt would put it; one
// with an unhydrated region is refused before anything leaves the pipe
// (it needs the region copied first). A linear target takes any write.
func TestCloneSpliceFrom(t *testing.T) {
	const M = 1 << 20
	f := newFixture(t, 4*M, 33)
	ctx := context.Background()
	c := startClone(t, f.line(8, "1 no_hydration"), Env{})
	if err := c.WriteAt(ctx, bytes.Repeat([]byte{1}, M), M, false); err != nil {
		t.Fatal(err)
	}
	fds := testPipe(t, M)
	payload := bytes.Repeat([]byte{0xa5}, 200<<10)
	for _, tc := range []struct {
		name  string
		off   int64
		takes bool
	}{
		{"hydrated", M + 4096 + 7, true},
		{"across both", 2*M - 100<<10, false},
		{"unhydrated", 3 * M, false},
	} {
		if got := c.SplicesWrite(tc.off, int64(len(payload))); got != tc.takes {
			t.Fatalf("%s: SplicesWrite %v, want %v", tc.name, got, tc.takes)
		}
		if _, err := unix.Write(fds[1], payload); err != nil {
			t.Fatal(err)
		}
		err := c.SpliceFrom(ctx, fds[0], tc.off, len(payload), true)
		left, _ := unix.IoctlGetInt(fds[0], unix.TIOCINQ)
		if !tc.takes {
			if !errors.Is(err, blockdev.ErrNoSplice) || left != len(payload) {
				t.Fatalf("%s: %v with %d of %d bytes left in the pipe, want ErrNoSplice and all", tc.name, err, left, len(payload))
			}
			buf := make([]byte, len(payload))
			unix.Read(fds[0], buf)
			continue
		}
		if err != nil || left != 0 {
			t.Fatalf("%s: %v with %d bytes left in the pipe", tc.name, err, left)
		}
		got := make([]byte, len(payload))
		if err := c.ReadAt(ctx, got, tc.off); err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("%s: reading the write back: %v, right bytes %v", tc.name, err, bytes.Equal(got, payload))
		}
	}
}
