package nbdserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// spliceExport is a memExport that splices. SpliceTo writes each piece's
// bytes into its pipe (a copy, which the server cannot tell from page
// references), refuses a piece with a zero 4 KiB block under dataOnly as a
// file refuses one with a hole, and can be made to fail after moving half
// of a piece.
type spliceExport struct {
	*memExport
	spliced atomic.Int64 // pieces moved
	calls   atomic.Int64 // successful SpliceTo calls
	failIn  atomic.Int32 // k > 0: the k-th next piece moves half its bytes and fails

	written       atomic.Int64 // pieces written by SpliceFrom
	writeCalls    atomic.Int64 // successful SpliceFrom calls
	refuseWrites  atomic.Bool  // SpliceFrom returns ErrNoSplice
	writeFailures atomic.Bool  // SpliceFrom takes the first piece's bytes and fails with EIO
}

var errHole = errors.New("spliceExport: a hole in a dataOnly range")

func (s *spliceExport) SpliceTo(ctx context.Context, pieces []SplicePiece, dataOnly bool) error {
	for i, p := range pieces {
		if i > 0 && p.Off != pieces[i-1].Off+int64(pieces[i-1].N) {
			return fmt.Errorf("spliceExport: piece %d at %d does not follow the last", i, p.Off)
		}
		if err := s.splicePiece(ctx, p, dataOnly); err != nil {
			return err
		}
	}
	s.calls.Add(1)
	return nil
}

func (s *spliceExport) splicePiece(ctx context.Context, p SplicePiece, dataOnly bool) error {
	defer s.leave()
	off, n := p.Off, p.N
	if err := s.enter(ctx, "splice", off, int64(n)); err != nil {
		return err
	}
	s.mu.RLock()
	b := bytes.Clone(s.data[off : off+int64(n)])
	s.mu.RUnlock()
	if s.failIn.Load() > 0 && s.failIn.Add(-1) == 0 {
		b = b[:n/2]
		if err := writeAll(p.Pipe, b); err != nil {
			return err
		}
		return errInjected
	}
	if dataOnly {
		for blk := (off + holeBlock - 1) / holeBlock * holeBlock; blk+holeBlock <= off+int64(n); blk += holeBlock {
			if bytes.Equal(b[blk-off:blk-off+holeBlock], zeroBlock[:]) {
				return errHole
			}
		}
	}
	if err := writeAll(p.Pipe, b); err != nil {
		return err
	}
	s.spliced.Add(1)
	return nil
}

// SpliceFrom reads each piece's bytes out of its pipe (a copy, which the
// server cannot tell from a splice into a file) and writes them.
func (s *spliceExport) SpliceFrom(ctx context.Context, pieces []SplicePiece, fua bool) error {
	if s.refuseWrites.Load() {
		return fmt.Errorf("spliceExport: %w", ErrNoSplice)
	}
	for i, p := range pieces {
		if i > 0 && p.Off != pieces[i-1].Off+int64(pieces[i-1].N) {
			return fmt.Errorf("spliceExport: piece %d at %d does not follow the last", i, p.Off)
		}
		b := make([]byte, p.N)
		pp := &pipe{r: p.Pipe, n: p.N}
		if _, err := readPipes(pp, b); err != nil {
			return err
		}
		if s.writeFailures.Load() {
			return fmt.Errorf("spliceExport: %w", syscall.EIO)
		}
		if err := s.WriteAt(ctx, b, p.Off, fua); err != nil {
			return err
		}
		s.written.Add(1)
	}
	s.writeCalls.Add(1)
	return nil
}

// writeAll writes all of b into a pipe with room for it.
func writeAll(fd int, b []byte) error {
	k, err := writeSome(fd, b)
	if err == nil && k < len(b) {
		err = fmt.Errorf("pipe full after %d of %d bytes", k, len(b))
	}
	return err
}

// spliceExports registers a spliceExport "disk" of size random bytes
// (from seed) and returns them.
func spliceExports(t *testing.T, size int, seed uint64) (*memExports, *spliceExport, []byte) {
	e := newMemExports(t)
	m := e.add("disk", "", newMemExport(size, allFlags))
	s := &spliceExport{memExport: m}
	e.wrapped["disk"] = s
	content := randomBytes(seed, size)
	s.fill(content)
	return e, s, content
}

// expectRead reads n bytes at off with a simple reply and fails the test
// unless they are content's.
func expectRead(t *testing.T, rc *rawClient, h uint64, off, n int, content []byte) {
	t.Helper()
	rc.request(nbdwire.CmdRead, 0, h, uint64(off), uint32(n), nil)
	errno, handle, got := rc.readSimple(n)
	if errno != 0 || handle != h {
		t.Fatalf("read %d: errno %d handle %d", h, errno, handle)
	}
	if !bytes.Equal(got, content[off:off+n]) {
		t.Fatalf("read %d at %d: wrong bytes from %d", h, off, firstDiff(got, content[off:off+n]))
	}
}

// TestSplicedReads: reads of at least spliceMin bytes that fit
// maxPiecePipes pipes are spliced, a piece per pipe, with simple and
// structured replies, and arrive whole and right; shorter and longer ones
// are read into a buffer.
func TestSplicedReads(t *testing.T) {
	const K = 1 << 10
	const M = 1 << 20
	e, s, content := spliceExports(t, 12*M, 21)
	srv := startServer(t, e, Options{MaxPayload: 12 * M, MaxInFlightBytes: 12 * M})
	for _, structured := range []bool{false, true} {
		rc := connect(t, srv.sock, "disk", structured)
		for i, tc := range []struct {
			off, n int
			pieces int64 // 0: not spliced
		}{
			{0, M, 1},
			{4*K + 512, 128 * K, 1},      // unaligned: 33 pages
			{M, 128*K - 512, 0},          // under spliceMin
			{512, M, 2},                  // 257 pages: more than a pipe holds
			{M + 4*K + 1, 2 * M, 3},      // 513 pages from an unaligned start
			{2*M + 512*K, 2 * M, 2},      // 512 pages from a page: qemu-img convert's size
			{0, 8 * M, 8},                // the most a read may take
			{512, 8 * M, 0},              // 2049 pages: more than maxPiecePipes hold
			{4*M - 8*K, 8*M + 8*K, 0},    // ditto, from a page
			{11 * M, M, 1},               // the end of the export
			{10*M + 64*K, 2*M - 64*K, 2}, // ditto, in two pieces
		} {
			before, calls := s.spliced.Load(), s.calls.Load()
			h := uint64(i + 1)
			rc.request(nbdwire.CmdRead, 0, h, uint64(tc.off), uint32(tc.n), nil)
			var got []byte
			var desc []string
			if structured {
				got, desc = rc.readChunks(h, uint64(tc.off), tc.n)
			} else {
				var errno uint32
				errno, _, got = rc.readSimple(tc.n)
				if errno != 0 {
					t.Fatalf("read %d+%d: errno %d", tc.off, tc.n, errno)
				}
			}
			if !bytes.Equal(got, content[tc.off:tc.off+tc.n]) {
				t.Fatalf("structured %v: read %d+%d: wrong bytes from %d (chunks %v)", structured, tc.off, tc.n, firstDiff(got, content[tc.off:tc.off+tc.n]), desc)
			}
			if structured && len(desc) != 1 {
				t.Fatalf("read %d+%d: chunks %v, want one data chunk", tc.off, tc.n, desc)
			}
			if pieces := s.spliced.Load() - before; pieces != tc.pieces {
				t.Fatalf("structured %v: read %d+%d spliced in %d pieces, want %d", structured, tc.off, tc.n, pieces, tc.pieces)
			}
			if calls := s.calls.Load() - calls; calls != min(tc.pieces, 1) {
				t.Fatalf("structured %v: read %d+%d spliced in %d calls, want one per spliced READ", structured, tc.off, tc.n, calls)
			}
		}
	}
}

// TestSplicedRepliesInterleave: a burst of spliced reads (in one or two
// pieces), buffered reads and writes shares the writer's batches; every reply arrives whole, with
// its own bytes.
func TestSplicedRepliesInterleave(t *testing.T) {
	const K = 1 << 10
	const size = 8 << 20
	e, s, content := spliceExports(t, size, 22)
	srv := startServer(t, e, Options{MaxInFlight: 64, MaxInFlightBytes: 64 << 20})
	rc := connect(t, srv.sock, "disk", false)
	type req struct {
		off, n int
		write  bool
	}
	var reqs []req
	for i := range 96 {
		switch i % 3 {
		case 0:
			n := 256 * K // one pipe
			if i%2 == 0 {
				n = 2048 * K // two
			}
			reqs = append(reqs, req{off: (i * 256 * K) % (size - 2048*K), n: n})
		case 1:
			reqs = append(reqs, req{off: (i * 4 * K) % size, n: 4 * K})
		default:
			// Rewrites bytes with what they hold, so reads stay predictable.
			off := (i * 8 * K) % size
			reqs = append(reqs, req{off: off, n: 8 * K, write: true})
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var b []byte
		for i, r := range reqs {
			typ, payload := nbdwire.CmdRead, []byte(nil)
			if r.write {
				typ, payload = nbdwire.CmdWrite, content[r.off:r.off+r.n]
			}
			b = be.AppendUint32(b, nbdwire.RequestMagic)
			b = be.AppendUint16(b, 0)
			b = be.AppendUint16(b, typ)
			b = be.AppendUint64(b, uint64(i))
			b = be.AppendUint64(b, uint64(r.off))
			b = be.AppendUint32(b, uint32(r.n))
			b = append(b, payload...)
		}
		rc.write(b)
	}()
	for range reqs {
		h := rc.read(nbdwire.SimpleReplyHeaderLen)
		if m := be.Uint32(h); m != nbdwire.SimpleReplyMagic {
			t.Fatalf("reply magic %#x: the stream lost its framing", m)
		}
		errno, handle := be.Uint32(h[4:]), be.Uint64(h[8:])
		if errno != 0 || handle >= uint64(len(reqs)) {
			t.Fatalf("reply errno %d handle %d", errno, handle)
		}
		if r := reqs[handle]; !r.write {
			if got := rc.read(r.n); !bytes.Equal(got, content[r.off:r.off+r.n]) {
				t.Fatalf("read %d+%d: wrong bytes from %d", r.off, r.n, firstDiff(got, content[r.off:r.off+r.n]))
			}
		}
	}
	<-done
	if n := s.spliced.Load(); n != 16+2*16 {
		t.Fatalf("%d pieces spliced, want 48: 16 reads of 256 KiB, 16 of 2 MiB", n)
	}
}

// TestSplicedReadsKeepHoles: with structured replies, a range the export
// will not splice as data only (it has a hole) is read into a buffer and
// its zero run sent as a hole chunk; under DF it is spliced as data.
func TestSplicedReadsKeepHoles(t *testing.T) {
	const K = 1 << 10
	e, s, content := spliceExports(t, 2<<20, 23)
	clear(content[256*K : 512*K])
	s.fill(content)
	srv := startServer(t, e, Options{})
	rc := connect(t, srv.sock, "disk", true)
	for i, tc := range []struct {
		flags   uint16
		want    string
		spliced bool
	}{
		{0, fmt.Sprintf("D0+%d H%d+%d D%d+%d", 256*K, 256*K, 256*K, 512*K, 512*K), false},
		{nbdwire.CmdFlagDF, fmt.Sprintf("D0+%d", 1024*K), true},
	} {
		before := s.spliced.Load()
		rc.request(nbdwire.CmdRead, tc.flags, uint64(i+1), 0, 1024*K, nil)
		got, desc := rc.readChunks(uint64(i+1), 0, 1024*K)
		if !bytes.Equal(got, content[:1024*K]) {
			t.Fatalf("flags %#x: wrong bytes from %d (chunks %v)", tc.flags, firstDiff(got, content[:1024*K]), desc)
		}
		if d := strings.Join(desc, " "); d != tc.want {
			t.Fatalf("flags %#x: chunks %s, want %s", tc.flags, d, tc.want)
		}
		if spliced := s.spliced.Load() > before; spliced != tc.spliced {
			t.Fatalf("flags %#x: spliced %v, want %v", tc.flags, spliced, tc.spliced)
		}
	}
}

// TestSpliceFailureFallsBack: a splice that fails halfway is never sent:
// the read is served from a buffer, and the pipe with its half-moved bytes
// is not reused, so the next spliced reply carries its own bytes only.
func TestSpliceFailureFallsBack(t *testing.T) {
	const K = 1 << 10
	e, s, content := spliceExports(t, 4<<20, 24)
	srv := startServer(t, e, Options{})
	rc := connect(t, srv.sock, "disk", false)
	for i, off := range []int{0, 1024 * K, 2048 * K} {
		if i == 1 {
			s.failIn.Store(1)
		}
		before := s.spliced.Load()
		expectRead(t, rc, uint64(i), off, 512*K, content)
		if spliced := s.spliced.Load() > before; spliced != (i != 1) {
			t.Fatalf("read %d: spliced %v", i, spliced)
		}
	}
	// The writer gives the last pipe back after its reply is written,
	// which may be after the client has it.
	var open, free int
	waitFor(t, "the last pipe back in the pool", func() bool {
		open, free = pipeCounts(srv)
		return free > 0 || open > 1
	})
	if open != 1 || free != 1 {
		t.Fatalf("%d pipes open, %d of them free; want the one that never failed", open, free)
	}
}

// TestSplicePieceFailureFallsBack: a read in three pieces whose second
// piece fails is read into a buffer; the pipes holding the first piece and
// half the second are closed, the unused third is kept, and the next read
// in pieces carries its own bytes only.
func TestSplicePieceFailureFallsBack(t *testing.T) {
	const M = 1 << 20
	e, s, content := spliceExports(t, 8*M, 26)
	srv := startServer(t, e, Options{})
	rc := connect(t, srv.sock, "disk", false)
	s.failIn.Store(2)
	for i, off := range []int{0, 4 * M} {
		before := s.spliced.Load()
		expectRead(t, rc, uint64(i), off, 3*M, content)
		want := []int64{1, 3}[i] // the first piece's call succeeded
		if n := s.spliced.Load() - before; n != want {
			t.Fatalf("read %d: %d pieces spliced, want %d", i, n, want)
		}
		if i == 0 {
			open, free := pipeCounts(srv)
			if open != 1 || free != 1 {
				t.Fatalf("after the failed piece: %d pipes open, %d of them free; want the unused one", open, free)
			}
		}
	}
	waitFor(t, "the pipes back in the pool", func() bool {
		open, free := pipeCounts(srv)
		return open == 3 && free == 3
	})
}

// TestSpliceWithoutEnoughPipes: a read needing more pipes than the pool
// can still make is read into a buffer before any byte moves, and the
// pipes it took go back to the pool.
func TestSpliceWithoutEnoughPipes(t *testing.T) {
	const M = 1 << 20
	e, s, content := spliceExports(t, 8*M, 27)
	srv := startServer(t, e, Options{MaxPayload: 8 * M, MaxInFlightBytes: 8 * M})
	rc := connect(t, srv.sock, "disk", false)
	srv.pipes.mu.Lock()
	srv.pipes.open = maxPipes - 2 // as if other replies held the rest
	srv.pipes.mu.Unlock()
	rc.request(nbdwire.CmdRead, 0, 1, 0, 8*M, nil)
	errno, _, got := rc.readSimple(8 * M)
	if errno != 0 || !bytes.Equal(got, content) {
		t.Fatalf("read: errno %d, right bytes %v", errno, bytes.Equal(got, content))
	}
	srv.pipes.mu.Lock()
	srv.pipes.open -= maxPipes - 2 // the pretended ones
	open, free := srv.pipes.open, len(srv.pipes.free)
	srv.pipes.mu.Unlock()
	if n := s.spliced.Load(); n != 0 || open != 2 || free != 2 {
		t.Fatalf("%d pieces spliced, %d pipes made, %d free; want none spliced and the 2 made kept", n, open, free)
	}
}

// TestNoSpliceUnderTLS: over TLS the bytes must go through the session,
// so a splicing export's reads are read into buffers.
func TestNoSpliceUnderTLS(t *testing.T) {
	pki := newTestPKI(t)
	e, s, content := spliceExports(t, 2<<20, 25)
	srv := startServer(t, e, Options{TLS: TLSOn, TLSConfig: pki.serverConfig(false)})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	if err := rc.startTLS(pki.clientConfig(false)); err != nil {
		t.Fatal(err)
	}
	rc.goExport("disk", false)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 1<<20, nil)
	if errno, _, got := rc.readSimple(1 << 20); errno != 0 || !bytes.Equal(got, content[:1<<20]) {
		t.Fatalf("read over TLS: errno %d, right bytes %v", errno, bytes.Equal(got, content[:1<<20]))
	}
	if n := s.spliced.Load(); n != 0 {
		t.Fatalf("%d reads spliced over TLS", n)
	}
}
