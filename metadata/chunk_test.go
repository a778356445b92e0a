package metadata

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"math/rand/v2"
	"path/filepath"
	"testing"
)

// chunkCases are bitmaps of every shape a chunk takes: empty, one bit,
// sparse, 10% and 50% random, nearly full, full but for the padding of a
// short last chunk, and runs.
func chunkCases(rng *rand.Rand) map[string][]uint64 {
	random := func(n int, p float64) []uint64 {
		w := make([]uint64, n)
		for i := range n * 64 {
			if rng.Float64() < p {
				w[i/64] |= 1 << (i % 64)
			}
		}
		return w
	}
	cases := map[string][]uint64{
		"empty":      make([]uint64, chunkWords),
		"one word":   {1 << 63},
		"short 10%":  random(3, 0.1),
		"1%":         random(chunkWords, 0.01),
		"10%":        random(chunkWords, 0.10),
		"50%":        random(chunkWords, 0.50),
		"90%":        random(chunkWords, 0.90),
		"99.9%":      random(chunkWords, 0.999),
		"short full": {^uint64(0), ^uint64(0), 0x1f},
	}
	first := make([]uint64, chunkWords)
	first[0] = 1
	cases["first bit"] = first
	last := make([]uint64, chunkWords)
	last[chunkWords-1] = 1 << 63
	cases["last bit"] = last
	runs := make([]uint64, chunkWords)
	for i := 100; i < 300; i++ {
		runs[i] = ^uint64(0)
	}
	runs[400] = 0xf0f0
	cases["runs"] = runs
	allButOne := make([]uint64, chunkWords)
	for i := range allButOne {
		allButOne[i] = ^uint64(0)
	}
	allButOne[17] &^= 1 << 5
	cases["all but one"] = allButOne
	return cases
}

func TestChunkRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for name, words := range chunkCases(rng) {
		v := encodeChunk(words, false)
		got := make([]uint64, len(words))
		if err := decodeChunk(v, got); err != nil {
			t.Fatalf("%s: decode: %v", name, err)
		}
		for i := range words {
			if got[i] != words[i] {
				t.Fatalf("%s: word %d = %#x, want %#x", name, i, got[i], words[i])
			}
		}
		if len(v) > 1+8*len(words) {
			t.Fatalf("%s: %d bytes, more than raw", name, len(v))
		}
		t.Logf("%s: %d words → %d bytes (%.1f%% of raw)", name, len(words), len(v), 100*float64(len(v))/float64(8*len(words)))
	}
}

// TestChunkSizes pins the sizes the memory goal rests on: 10% random bits
// in well under 60% of the raw chunk, a chunk with one bit in a few bytes.
func TestChunkSizes(t *testing.T) {
	cases := chunkCases(rand.New(rand.NewPCG(3, 4)))
	if n := len(encodeChunk(cases["10%"], false)); n > ChunkBytes*58/100 {
		t.Errorf("10%% chunk = %d bytes, want ≤ 58%% of %d", n, ChunkBytes)
	}
	for _, name := range []string{"empty", "first bit", "last bit", "all but one"} {
		if n := len(encodeChunk(cases[name], false)); n > 16 {
			t.Errorf("%s chunk = %d bytes, want a few", name, n)
		}
	}
	if v := encodeChunk(cases["10%"], true); !bytes.Equal(v, []byte{chunkAllOnes}) {
		t.Errorf("full chunk = %x", v)
	}
}

// TestChunkRawStillRead: version 1 chunks (raw) decode unchanged.
func TestChunkRawStillRead(t *testing.T) {
	words := []uint64{0x0123456789abcdef, 0, ^uint64(0)}
	v := []byte{chunkRaw}
	for _, w := range words {
		v = binary.LittleEndian.AppendUint64(v, w)
	}
	got := make([]uint64, 3)
	if err := decodeChunk(v, got); err != nil {
		t.Fatal(err)
	}
	for i := range words {
		if got[i] != words[i] {
			t.Fatalf("word %d = %#x", i, got[i])
		}
	}
}

func TestChunkCorruptRefused(t *testing.T) {
	words := chunkCases(rand.New(rand.NewPCG(5, 6)))["10%"]
	good := encodeChunk(words, false)
	if good[0] != chunkRice {
		t.Fatalf("10%% chunk not rice coded: %d", good[0])
	}
	bad := map[string][]byte{
		"empty":           {},
		"unknown":         {9},
		"all-ones+junk":   {chunkAllOnes, 0},
		"raw short":       {chunkRaw, 1, 2, 3},
		"rice header":     {chunkRice, 0},
		"rice flags":      append([]byte{chunkRice, 0x80}, good[2:]...),
		"rice k":          append([]byte{chunkRice, 0, 60}, good[3:]...),
		"rice truncated":  good[:len(good)/2],
		"rice trailing":   append(append([]byte{}, good...), 0xff),
		"rice count":      {chunkRice, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f},
		"rice beyond end": {chunkRice, 0, maxRiceK, 1, 0x7f, 0xff, 0xe0},
		"rice padding":    {chunkRice, 0, 0, 1, 0x01},
	}
	for name, v := range bad {
		if err := decodeChunk(v, make([]uint64, len(words))); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
	// Positions beyond a short chunk: a long unary part, a large low part.
	for _, v := range [][]byte{
		{chunkRice, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0},
		{chunkRice, 0, 8, 1, 0x7f, 0x80},
	} {
		if err := decodeChunk(v, make([]uint64, 2)); err == nil {
			t.Errorf("position beyond a 2-word chunk decoded: %x", v)
		}
	}
}

// TestVersion1StoreUpgraded: a store written by version 1 (raw chunks,
// superblock version 1) opens, keeps its bits and is marked version 2.
func TestVersion1StoreUpgraded(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	opts := testOptions(dir, nil)
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	sb := s.Superblock()
	sb.Version = 1
	b, _ := json.Marshal(sb)
	raw := []byte{chunkRaw}
	for i := range chunkWords {
		w := uint64(0)
		if i == 3 {
			w = 1 << 9
		}
		raw = binary.LittleEndian.AppendUint64(raw, w)
	}
	if err := s.kv.Put([]Entry{{Key: keySuperblock, Value: b}, {Key: chunkKey(0), Value: raw}}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.IsHydrated(3*64+9) || s.Hydrated() != 1 {
		t.Fatalf("version 1 bits not read: hydrated=%d", s.Hydrated())
	}
	if v := s.Superblock().Version; v != superblockVersion {
		t.Fatalf("version after open = %d", v)
	}
}

func FuzzDecodeChunk(f *testing.F) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, words := range chunkCases(rng) {
		if len(words) == chunkWords {
			f.Add(encodeChunk(words, false))
		}
	}
	f.Add([]byte{chunkAllOnes})
	f.Fuzz(func(t *testing.T, v []byte) {
		words := make([]uint64, chunkWords)
		if err := decodeChunk(v, words); err != nil {
			return
		}
		// Whatever decodes re-encodes to the same bits.
		again := make([]uint64, chunkWords)
		if err := decodeChunk(encodeChunk(words, false), again); err != nil {
			t.Fatalf("re-encoding failed to decode: %v", err)
		}
		for i := range words {
			if words[i] != again[i] {
				t.Fatalf("word %d differs after re-encoding", i)
			}
		}
	})
}

func BenchmarkEncodeChunk10(b *testing.B) {
	words := chunkCases(rand.New(rand.NewPCG(9, 10)))["10%"]
	b.SetBytes(ChunkBytes)
	for b.Loop() {
		encodeChunk(words, false)
	}
}

func BenchmarkDecodeChunk10(b *testing.B) {
	words := chunkCases(rand.New(rand.NewPCG(9, 10)))["10%"]
	v := encodeChunk(words, false)
	out := make([]uint64, chunkWords)
	b.SetBytes(ChunkBytes)
	for b.Loop() {
		if err := decodeChunk(v, out); err != nil {
			b.Fatal(err)
		}
	}
}

// TestCommitManyChunks: a commit of thousands of small chunks (a bit in
// each, as random hydration of a large device leaves them) stays within
// badger's per-transaction limits, and every bit reads back.
func TestCommitManyChunks(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates a 16 MiB bitmap")
	}
	dir := filepath.Join(t.TempDir(), "md")
	const chunks = 4000
	opts := Options{Dir: dir, TargetSize: chunks * ChunkRegions * 4096, RegionSize: 4096, Source: "src"}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(11, 12))
	var set []uint64
	for c := range uint64(chunks) {
		r := c*ChunkRegions + rng.Uint64N(ChunkRegions)
		set = append(set, r)
		if err := s.SetHydrated(r); err != nil {
			t.Fatal(err)
		}
	}
	// Some denser chunks too: 10% of one chunk's bits.
	for range ChunkRegions / 10 {
		r := 7*ChunkRegions + rng.Uint64N(ChunkRegions)
		set = append(set, r)
		if err := s.SetHydrated(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Commit(nopSyncer{}); err != nil {
		t.Fatal(err)
	}
	want := s.Hydrated()
	s.Close()
	s, err = Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := s.Hydrated(); got != want {
		t.Fatalf("hydrated after reopen = %d, want %d", got, want)
	}
	for _, r := range set {
		if !s.IsHydrated(r) {
			t.Fatalf("region %d lost", r)
		}
	}
}

type nopSyncer struct{}

func (nopSyncer) Sync() error { return nil }

// TestAppendChunk: a commit codes its chunks one after another into one
// buffer; appending must code exactly as encodeChunk and leave what the
// buffer held, whether it has room or must grow mid-chunk.
func TestAppendChunk(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	cases := chunkCases(rng)
	dense := make([]uint64, chunkWords)
	for i := range dense {
		dense[i] = rng.Uint64() // half the bits: coded raw
	}
	cases["half random"] = dense
	for name, words := range cases {
		for _, full := range []bool{false, true} {
			want := encodeChunk(words, full)
			for _, room := range []int{0, 3, 1 + 8*len(words) + 64} {
				buf := make([]byte, 5, 5+room)
				copy(buf, "head:")
				buf = appendChunk(buf, words, full)
				if string(buf[:5]) != "head:" || !bytes.Equal(buf[5:], want) {
					t.Fatalf("%s (full %v, room %d): appended %d bytes, differ from encodeChunk's %d",
						name, full, room, len(buf)-5, len(want))
				}
			}
		}
	}
}
