package nbdserver

import (
	"math/bits"
	"sync"
)

// Payload buffer size classes: powers of two from 4 KiB to 1 GiB, which
// covers every MaxPayload Validate accepts. A request of n bytes takes a
// buffer of the smallest class ≥ n, so at most half of a buffer is wasted
// and a busy connection reuses buffers instead of allocating per request.
const (
	minBufferShift = 12
	maxBufferShift = 30
)

// bufferPool hands out payload buffers by power-of-two size class. Buffers
// travel as *[]byte so that putting them back does not allocate.
type bufferPool struct {
	classes [maxBufferShift - minBufferShift + 1]sync.Pool
}

func bufferClass(n int) int {
	shift := bits.Len(uint(n - 1))
	return max(shift, minBufferShift) - minBufferShift
}

// get returns a buffer of length n (n > 0). Its contents are whatever the
// previous user left; callers that expose it unfilled must clear it.
func (p *bufferPool) get(n int) *[]byte {
	class := bufferClass(n)
	if class >= len(p.classes) {
		b := make([]byte, n) // beyond every class: not pooled (Validate prevents it)
		return &b
	}
	if bp, ok := p.classes[class].Get().(*[]byte); ok {
		*bp = (*bp)[:n]
		return bp
	}
	b := make([]byte, n, 1<<(class+minBufferShift))
	return &b
}

// put returns a buffer from get. Buffers not made by get are dropped.
func (p *bufferPool) put(bp *[]byte) {
	if bp == nil {
		return
	}
	c := cap(*bp)
	if c == 0 || c&(c-1) != 0 {
		return
	}
	class := bufferClass(c)
	if class >= len(p.classes) || 1<<(class+minBufferShift) != c {
		return
	}
	*bp = (*bp)[:c]
	p.classes[class].Put(bp)
}
