package nbdserver

import (
	"bytes"
	"fmt"
	"syscall"
	"testing"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// wantExport fails the test unless the export holds content.
func wantExport(t *testing.T, s *spliceExport, content []byte, what string) {
	t.Helper()
	if got := s.snapshot(); !bytes.Equal(got, content) {
		t.Fatalf("%s: the export differs from byte %d", what, firstDiff(got, content))
	}
}

// TestSplicedWrites: over TCP, WRITEs of spliceMin to 8 MiB have their
// payload spliced into pipes, writePiece bytes each, and written through
// SpliceFrom in one call; shorter and longer ones, and every WRITE over a
// Unix socket, go through a buffer. Either
// way the export ends up with the payload, and the stream keeps its
// framing.
func TestSplicedWrites(t *testing.T) {
	const K = 1 << 10
	const M = 1 << 20
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			e, s, content := spliceExports(t, 12*M, 31)
			opts := Options{MaxPayload: 12 * M, MaxInFlightBytes: 12 * M}
			start := startServer
			if network == "tcp" {
				start = startServerTCP
			}
			srv := start(t, e, opts)
			rc := connect(t, srv.sock, "disk", false)
			for i, tc := range []struct {
				off, n int
				pieces int64 // over TCP; 0: not spliced
			}{
				{0, 128*K - 512, 0}, // under spliceMin
				{4*K + 1, 128 * K, 1},
				{M, M, 2},
				{2*M + 512, 3*M + 100, 7},
				{0, 8 * M, 16},
				{3 * M, 8*M + 4*K, 0}, // more than maxWritePieces pipes
			} {
				if network == "unix" {
					tc.pieces = 0
				}
				payload := randomBytes(uint64(100+i), tc.n)
				before, calls := s.written.Load(), s.writeCalls.Load()
				h := uint64(i + 1)
				rc.request(nbdwire.CmdWrite, 0, h, uint64(tc.off), uint32(tc.n), payload)
				rc.expectSimple(h, 0)
				copy(content[tc.off:], payload)
				wantExport(t, s, content, fmt.Sprintf("write %d+%d", tc.off, tc.n))
				if pieces := s.written.Load() - before; pieces != tc.pieces {
					t.Fatalf("write %d+%d: %d pieces spliced, want %d", tc.off, tc.n, pieces, tc.pieces)
				}
				if calls := s.writeCalls.Load() - calls; calls != min(tc.pieces, 1) {
					t.Fatalf("write %d+%d: %d SpliceFrom calls, want one per spliced WRITE", tc.off, tc.n, calls)
				}
			}
			rc.request(nbdwire.CmdRead, 0, 99, 0, 4*M, nil)
			if errno, _, got := rc.readSimple(4 * M); errno != 0 || !bytes.Equal(got, content[:4*M]) {
				t.Fatalf("read back: errno %d, right bytes %v", errno, bytes.Equal(got, content[:4*M]))
			}
		})
	}
}

// TestSplicedWritesInterleave: a burst of spliced WRITEs, short WRITEs and
// READs sent in one go, so that request headers and payloads straddle the
// reader's buffer and the pipes every which way; every reply arrives, and
// the export ends up with every payload.
func TestSplicedWritesInterleave(t *testing.T) {
	const K = 1 << 10
	const size = 56 << 20
	e, s, content := spliceExports(t, size, 32)
	srv := startServerTCP(t, e, Options{MaxInFlight: 64, MaxInFlightBytes: 64 << 20})
	rc := connect(t, srv.sock, "disk", false)
	type req struct {
		off, n int
		write  bool
	}
	var reqs []req
	var b []byte
	var pieces int64 // of the spliced writes
	for i := range 90 {
		r := req{off: (i * 97 * K) % (size - 4*K), n: 4 * K}
		switch i % 3 {
		case 0:
			r.n, r.write = 128*K+(i%5)*100*K+i, true // spliced, of odd lengths
			pieces += int64((r.n + writePiece - 1) / writePiece)
		case 1:
			r.n, r.write = 4*K+i, true
		}
		reqs = append(reqs, r)
		typ, payload := nbdwire.CmdRead, []byte(nil)
		if r.write {
			// Writes touch disjoint ranges of the burst's own: each ends
			// up with its payload whatever order they run in.
			r.off = i * 600 * K
			reqs[i].off = r.off
			typ, payload = nbdwire.CmdWrite, randomBytes(uint64(i), r.n)
			copy(content[r.off:], payload)
		}
		b = be.AppendUint32(b, nbdwire.RequestMagic)
		b = be.AppendUint16(b, 0)
		b = be.AppendUint16(b, typ)
		b = be.AppendUint64(b, uint64(i))
		b = be.AppendUint64(b, uint64(r.off))
		b = be.AppendUint32(b, uint32(r.n))
		b = append(b, payload...)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
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
			rc.read(r.n) // reads race with the writes: only their length is known
		}
	}
	<-done
	wantExport(t, s, content, "after the burst")
	if n := s.written.Load(); n != pieces {
		t.Fatalf("%d pieces spliced, want the %d of the 30 writes of 128 KiB or more", n, pieces)
	}
}

// TestSplicedWriteRefused: an export that will not take a write from
// pipes (ErrNoSplice) gets it with WriteAt from their bytes, and the
// pipes, emptied, go back to the pool.
func TestSplicedWriteRefused(t *testing.T) {
	const M = 1 << 20
	e, s, content := spliceExports(t, 4*M, 33)
	s.refuseWrites.Store(true)
	srv := startServerTCP(t, e, Options{})
	rc := connect(t, srv.sock, "disk", false)
	payload := randomBytes(7, 2*M)
	rc.request(nbdwire.CmdWrite, 0, 1, M+4096, 2*M, payload)
	rc.expectSimple(1, 0)
	copy(content[M+4096:], payload)
	wantExport(t, s, content, "the write")
	if n := s.written.Load(); n != 0 {
		t.Fatalf("%d pieces written by SpliceFrom while it refused", n)
	}
	open, free := pipeCounts(srv)
	if open != 4 || free != 4 {
		t.Fatalf("%d pipes open, %d free; want the write's 4 back in the pool", open, free)
	}
}

// TestSplicedWriteFails: a SpliceFrom that fails is the WRITE's error
// (EIO to the client); its pipes, holding bytes, are closed, and the next
// spliced write carries its own bytes only.
func TestSplicedWriteFails(t *testing.T) {
	const M = 1 << 20
	e, s, content := spliceExports(t, 4*M, 34)
	srv := startServerTCP(t, e, Options{})
	rc := connect(t, srv.sock, "disk", false)
	s.writeFailures.Store(true)
	rc.request(nbdwire.CmdWrite, 0, 1, 0, 2*M, randomBytes(8, 2*M))
	rc.expectSimple(1, uint32(syscall.EIO))
	s.writeFailures.Store(false)
	// The first piece was read out of its pipe, the other three still
	// hold their bytes: the one is kept, the others closed.
	open, free := pipeCounts(srv)
	if open != 1 || free != 1 {
		t.Fatalf("after the failure: %d pipes open, %d free; want the emptied one", open, free)
	}
	payload := randomBytes(9, 2*M)
	rc.request(nbdwire.CmdWrite, 0, 2, 2*M, 2*M, payload)
	rc.expectSimple(2, 0)
	copy(content[2*M:], payload)
	if got := s.snapshot(); !bytes.Equal(got[2*M:], content[2*M:]) {
		t.Fatalf("the second write differs from byte %d", firstDiff(got[2*M:], content[2*M:]))
	}
}

// TestSplicedWriteNotFitting: a payload whose pipe runs out of slots
// before it holds its piece (here pipes of one 4 KiB slot; on a network,
// one ~1.5 KiB segment per slot) is read into a buffer instead: the pipe's
// bytes back, the rest from the socket, and the export gets it whole with
// WriteAt. After maxWriteMisses such payloads in a row the connection
// stops splicing writes and takes no more pipes for them.
func TestSplicedWriteNotFitting(t *testing.T) {
	const M = 1 << 20
	e, s, content := spliceExports(t, 2*M, 35)
	srv := startServerTCP(t, e, Options{})
	srv.pipes.mu.Lock()
	srv.pipes.size = pageSize
	srv.pipes.mu.Unlock()
	rc := connect(t, srv.sock, "disk", false)
	for i := range maxWriteMisses + 2 {
		payload := randomBytes(uint64(10+i), M)
		rc.request(nbdwire.CmdWrite, 0, 1, 0, M, payload)
		rc.expectSimple(1, 0)
		copy(content, payload)
		wantExport(t, s, content, fmt.Sprintf("write %d", i))
	}
	if n := s.written.Load(); n != 0 {
		t.Fatalf("%d pieces spliced into pipes of one slot", n)
	}
	open, free := pipeCounts(srv)
	if open != 2 || free != 2 {
		t.Fatalf("%d pipes made, %d free; want the 2 the first write took, reused by the next %d and given back", open, free, maxWriteMisses-1)
	}
}

// TestSplicedWriteMissesInARow: misses stop a connection's write splicing
// only in a row; a payload that fits its pipes starts the count again.
func TestSplicedWriteMissesInARow(t *testing.T) {
	const M = 1 << 20
	e, s, content := spliceExports(t, 2*M, 36)
	srv := startServerTCP(t, e, Options{})
	rc := connect(t, srv.sock, "disk", false)
	// pipesOf empties the pool and makes the pipes made from now on size
	// bytes: one slot (every payload misses) or pipeSize (none does).
	pipesOf := func(size int) {
		srv.pipes.mu.Lock()
		defer srv.pipes.mu.Unlock()
		for _, pp := range srv.pipes.free {
			pp.close()
			srv.pipes.open--
		}
		srv.pipes.free = nil
		srv.pipes.size = size
	}
	write := func(i int) {
		payload := randomBytes(uint64(40+i), M)
		rc.request(nbdwire.CmdWrite, 0, uint64(i), 0, M, payload)
		rc.expectSimple(uint64(i), 0)
		copy(content, payload)
		wantExport(t, s, content, fmt.Sprintf("write %d", i))
	}
	i := 0
	for range 2 {
		pipesOf(pageSize)
		for range maxWriteMisses - 1 {
			write(i)
			i++
		}
		pipesOf(pipeSize)
		before := s.written.Load()
		write(i)
		i++
		if n := s.written.Load() - before; n != 2 {
			t.Fatalf("write %d, after %d misses in a row: %d pieces spliced, want 2", i-1, maxWriteMisses-1, n)
		}
	}
}
