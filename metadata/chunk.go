package metadata

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
)

// Bitmap chunk encodings. The first byte of a stored chunk names its
// encoding; chunkRaw and chunkAllOnes are version 1's and are still read.
//
//	chunkRaw:     0, then the chunk's words, little endian (8 bytes each)
//	chunkAllOnes: 1 (every region of the chunk is hydrated)
//	chunkRice:    2, flags, k, uvarint count, then count Rice-coded gaps
//
// chunkRice lists the positions of the set bits (or, with riceInverted,
// of the clear bits) as gaps between consecutive positions, each gap
// Rice-coded with parameter k: gap>>k in unary (that many 1 bits, then a
// 0), then its k low bits, most significant first, packed from each
// byte's high bit down. The padding bits of the last byte are 0. Hydration
// leaves bits scattered at random (writes, hints, discards): 10% set bits
// cost about 52% of the raw chunk, a chunk with a few bits a few bytes.
const (
	chunkRaw     = 0
	chunkAllOnes = 1
	chunkRice    = 2

	riceInverted = 1 << 0 // the coded positions are those of clear bits

	// maxRiceK bounds the Rice parameter: a gap is at most 2^18 bits.
	maxRiceK = 18
)

// encodeChunk encodes a chunk's words; full means every region of the
// chunk is hydrated (the last chunk's padding bits are not).
func encodeChunk(words []uint64, full bool) []byte {
	return appendChunk(nil, words, full)
}

// appendChunk appends the encoding of a chunk's words to dst (a commit
// encodes a whole batch into one buffer).
func appendChunk(dst []byte, words []uint64, full bool) []byte {
	if full {
		return append(dst, chunkAllOnes)
	}
	if v, ok := appendRice(dst, words); ok {
		return v
	}
	dst = append(dst, chunkRaw)
	for _, w := range words {
		dst = binary.LittleEndian.AppendUint64(dst, w)
	}
	return dst
}

// appendRice appends the Rice encoding of words to dst, or returns dst
// unchanged and false when it would not be smaller than the raw one.
func appendRice(dst []byte, words []uint64) ([]byte, bool) {
	nbits := uint64(len(words)) * 64
	var set uint64
	for _, w := range words {
		set += uint64(bits.OnesCount64(w))
	}
	var flags byte
	count, flip := set, uint64(0)
	if set > nbits/2 {
		flags, count, flip = riceInverted, nbits-set, ^uint64(0)
	}
	k := riceParameter(nbits, count)
	rawLen := 1 + 8*len(words)
	start := len(dst)
	w := bitWriter{buf: dst}
	if dst == nil {
		// The coded size is count*(k+1) bits plus the unary parts;
		// allocate for the estimate and give up once the raw size is
		// reached.
		estimate := 3 + binary.MaxVarintLen64 + int(count*uint64(k+2)/8)
		w.buf = make([]byte, 0, min(estimate, rawLen)+8)
	}
	w.buf = append(w.buf, chunkRice, flags, byte(k))
	w.buf = binary.AppendUvarint(w.buf, count)
	next := uint64(0) // first position the next gap counts from
	for i, word := range words {
		if len(w.buf)-start >= rawLen {
			return dst, false
		}
		word ^= flip
		for word != 0 {
			pos := uint64(i)*64 + uint64(bits.TrailingZeros64(word))
			word &= word - 1
			gap := pos - next
			next = pos + 1
			w.unary(gap >> k)
			w.bits(gap&(1<<k-1), k)
		}
	}
	v := w.finish()
	if len(v)-start >= rawLen {
		return dst, false
	}
	return v, true
}

// riceParameter picks k close to the optimum for geometric gaps with the
// mean that count positions among nbits give.
func riceParameter(nbits, count uint64) uint {
	if count == 0 {
		return 0
	}
	mean := (nbits - count) / count
	// The optimum is about log2(mean * ln 2).
	k := uint(0)
	for m := mean * 7 / 10; m > 1 && k < maxRiceK; m >>= 1 {
		k++
	}
	return k
}

// decodeChunk decodes a stored chunk into words (their number is the
// chunk's, known from the geometry). It never panics on bad input.
func decodeChunk(v []byte, words []uint64) error {
	if len(v) == 0 {
		return errors.New("empty chunk")
	}
	switch v[0] {
	case chunkAllOnes:
		if len(v) != 1 {
			return errors.New("bad all-ones chunk")
		}
		for i := range words {
			words[i] = ^uint64(0)
		}
	case chunkRaw:
		if len(v) != 1+8*len(words) {
			return fmt.Errorf("raw chunk of %d bytes, want %d", len(v), 1+8*len(words))
		}
		for i := range words {
			words[i] = binary.LittleEndian.Uint64(v[1+8*i:])
		}
	case chunkRice:
		return decodeRice(v, words)
	default:
		return fmt.Errorf("unknown chunk encoding %d", v[0])
	}
	return nil
}

func decodeRice(v []byte, words []uint64) error {
	if len(v) < 4 {
		return errors.New("short rice chunk")
	}
	flags, k := v[1], uint(v[2])
	if flags&^riceInverted != 0 {
		return fmt.Errorf("rice chunk: unknown flags %#x", flags)
	}
	if k > maxRiceK {
		return fmt.Errorf("rice chunk: parameter %d out of range", k)
	}
	count, n := binary.Uvarint(v[3:])
	nbits := uint64(len(words)) * 64
	if n <= 0 || count > nbits {
		return errors.New("rice chunk: bad count")
	}
	fill := uint64(0)
	if flags&riceInverted != 0 {
		fill = ^uint64(0)
	}
	for i := range words {
		words[i] = fill
	}
	r := bitReader{buf: v[3+n:]}
	next := uint64(0)
	for range count {
		q, ok := r.unary(nbits)
		if !ok {
			return errors.New("rice chunk: truncated or overlong gap")
		}
		low, ok := r.bits(k)
		if !ok {
			return errors.New("rice chunk: truncated")
		}
		pos := next + (q<<k | low)
		if pos >= nbits || pos < next {
			return errors.New("rice chunk: position beyond the chunk")
		}
		words[pos/64] ^= 1 << (pos % 64)
		next = pos + 1
	}
	if !r.paddingOnly() {
		return errors.New("rice chunk: trailing bytes")
	}
	return nil
}

// bitWriter packs bits from each byte's high bit down.
type bitWriter struct {
	buf  []byte
	acc  uint64 // pending bits, in the low nacc bits
	nacc uint
}

func (w *bitWriter) bits(x uint64, n uint) {
	for n > 0 {
		take := min(n, 56-w.nacc)
		w.acc = w.acc<<take | (x>>(n-take))&(1<<take-1)
		w.nacc += take
		n -= take
		for w.nacc >= 8 {
			w.nacc -= 8
			w.buf = append(w.buf, byte(w.acc>>w.nacc))
		}
	}
}

func (w *bitWriter) unary(q uint64) {
	for q >= 32 {
		w.bits(1<<32-1, 32)
		q -= 32
	}
	w.bits((1<<q-1)<<1, uint(q)+1)
}

func (w *bitWriter) finish() []byte {
	if w.nacc > 0 {
		w.buf = append(w.buf, byte(w.acc<<(8-w.nacc)))
		w.nacc = 0
	}
	return w.buf
}

type bitReader struct {
	buf []byte
	pos uint64 // in bits
}

func (r *bitReader) bit() (uint64, bool) {
	if r.pos>>3 >= uint64(len(r.buf)) {
		return 0, false
	}
	b := uint64(r.buf[r.pos>>3]>>(7-r.pos&7)) & 1
	r.pos++
	return b, true
}

// unary reads a unary number no larger than limit.
func (r *bitReader) unary(limit uint64) (uint64, bool) {
	var q uint64
	for {
		// Skip whole bytes of ones at once when aligned.
		if r.pos&7 == 0 && r.pos>>3 < uint64(len(r.buf)) && r.buf[r.pos>>3] == 0xff {
			q += 8
			r.pos += 8
			if q > limit {
				return 0, false
			}
			continue
		}
		b, ok := r.bit()
		if !ok {
			return 0, false
		}
		if b == 0 {
			return q, true
		}
		q++
		if q > limit {
			return 0, false
		}
	}
}

func (r *bitReader) bits(n uint) (uint64, bool) {
	var x uint64
	for range n {
		b, ok := r.bit()
		if !ok {
			return 0, false
		}
		x = x<<1 | b
	}
	return x, true
}

// paddingOnly reports whether what is left is the zero padding of the
// last byte.
func (r *bitReader) paddingOnly() bool {
	end := uint64(len(r.buf)) * 8
	if end < r.pos || end-r.pos >= 8 {
		return false
	}
	for r.pos < end {
		if b, _ := r.bit(); b != 0 {
			return false
		}
	}
	return true
}
