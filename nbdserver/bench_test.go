package nbdserver

import (
	"fmt"
	"testing"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// BenchmarkRead measures READ throughput over a unix socket with 16
// requests in flight, as a pipelining client keeps them.
func BenchmarkRead(b *testing.B) {
	for _, size := range []int{4 << 10, 256 << 10, 4 << 20} {
		for _, structured := range []bool{false, true} {
			b.Run(fmt.Sprintf("size=%d/structured=%v", size, structured), func(b *testing.B) {
				benchmarkIO(b, nbdwire.CmdRead, size, structured)
			})
		}
	}
}

// BenchmarkWrite is BenchmarkRead for WRITE.
func BenchmarkWrite(b *testing.B) {
	for _, size := range []int{4 << 10, 256 << 10, 4 << 20} {
		b.Run(fmt.Sprintf("size=%d", size), func(b *testing.B) {
			benchmarkIO(b, nbdwire.CmdWrite, size, false)
		})
	}
}

func benchmarkIO(b *testing.B, typ uint16, size int, structured bool) {
	const depth, exportSize = 16, 64 << 20
	e := newMemExports(b)
	e.add("disk", "", newMemExport(exportSize, allFlags))
	srv := startServer(b, e, Options{})
	rc := connect(b, srv.sock, "disk", structured)
	var payload []byte
	if typ == nbdwire.CmdWrite {
		payload = make([]byte, size)
	}
	slots := exportSize / size
	send := func(i int) {
		rc.request(typ, 0, uint64(i), uint64(i%slots*size), uint32(size), payload)
	}
	b.SetBytes(int64(size))
	b.ResetTimer()
	sent := 0
	for ; sent < min(depth, b.N); sent++ {
		send(sent)
	}
	for range b.N {
		switch {
		case typ == nbdwire.CmdRead && structured:
			rc.readChunk()
		case typ == nbdwire.CmdRead:
			rc.readSimple(size)
		default:
			rc.readSimple(0)
		}
		if sent < b.N {
			send(sent)
			sent++
		}
	}
	b.StopTimer()
	rc.request(nbdwire.CmdDisc, 0, 0, 0, 0, nil)
	rc.expectEOF()
}
