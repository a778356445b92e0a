package metadata

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// recorder logs the order of destination syncs and store writes.
type recorder struct {
	mu     sync.Mutex
	events []string
	// failPut / failScan / failGet / failSync make the store or the
	// destination fail (fault injection).
	failPut, failScan, failGet, failSync bool
	// failPutAt / failSyncAt fail only the Nth put or sync (from 1);
	// puts and syncs count them, putEntries logs each put's size.
	failPutAt, failSyncAt int
	// putErr, if set, is what every put returns.
	putErr      error
	puts, syncs int
	putEntries  []int
}

func (r *recorder) add(e string) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

func (r *recorder) Sync() error {
	r.mu.Lock()
	r.syncs++
	fail := r.failSync || r.syncs == r.failSyncAt
	r.mu.Unlock()
	if fail {
		return errors.New("injected destination sync failure")
	}
	r.add("sync")
	return nil
}

func (k recordingKV) Get(key []byte) ([]byte, error) {
	k.rec.mu.Lock()
	fail := k.rec.failGet
	k.rec.mu.Unlock()
	if fail {
		return nil, errors.New("injected get failure")
	}
	return k.KV.Get(key)
}

type recordingKV struct {
	KV
	rec *recorder
}

func (k recordingKV) Put(e []Entry) error {
	k.rec.mu.Lock()
	k.rec.puts++
	fail := k.rec.failPut || k.rec.puts == k.rec.failPutAt
	putErr := k.rec.putErr
	if !fail && putErr == nil {
		k.rec.putEntries = append(k.rec.putEntries, len(e))
	}
	k.rec.mu.Unlock()
	if fail {
		return errors.New("injected put failure")
	}
	if putErr != nil {
		return putErr
	}
	k.rec.add("put")
	return k.KV.Put(e)
}

func (k recordingKV) Scan(p []byte, fn func(k, v []byte) error) error {
	k.rec.mu.Lock()
	fail := k.rec.failScan
	k.rec.mu.Unlock()
	if fail {
		return errors.New("injected scan failure")
	}
	return k.KV.Scan(p, fn)
}

func testOptions(dir string, rec *recorder) Options {
	o := Options{Dir: dir, TargetSize: (2*ChunkRegions + 5) * 4096, RegionSize: 4096, Source: "src.img"}
	if rec != nil {
		o.WrapKV = func(kv KV) KV { return recordingKV{kv, rec} }
	}
	return o
}

func TestFormatReopenAndCommitOrder(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	rec := &recorder{}
	s, err := Open(testOptions(dir, rec))
	if err != nil {
		t.Fatal(err)
	}
	n := s.NrRegions()
	if used, total := s.Blocks(); used != 1 || total != (n+ChunkRegions-1)/ChunkRegions+1 {
		t.Fatalf("fresh Blocks = %d/%d", used, total)
	}
	rec.mu.Lock()
	rec.events = nil // the format's own put
	rec.mu.Unlock()
	for _, r := range []uint64{0, 5, ChunkRegions + 1, n - 1} {
		if err := s.SetHydrated(r); err != nil {
			t.Fatal(err)
		}
	}
	if !s.Changed() {
		t.Fatal("Changed must be true after SetHydrated")
	}
	if err := s.Commit(rec); err != nil {
		t.Fatal(err)
	}
	if got := rec.events; len(got) != 2 || got[0] != "sync" || got[1] != "put" {
		t.Fatalf("commit order = %v, want [sync put]", got)
	}
	if s.Changed() {
		t.Fatal("Changed after commit")
	}
	// A commit with nothing changed touches nothing.
	if err := s.Commit(rec); err != nil || len(rec.events) != 2 {
		t.Fatalf("empty commit: err=%v events=%v", err, rec.events)
	}
	// Uncommitted bits are lost on close, as in a crash.
	if err := s.SetHydrated(7); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
	s2, err := Open(testOptions(dir, nil))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for _, r := range []uint64{0, 5, ChunkRegions + 1, n - 1} {
		if !s2.IsHydrated(r) {
			t.Fatalf("region %d not hydrated after reopen", r)
		}
	}
	if s2.IsHydrated(7) || s2.Hydrated() != 4 {
		t.Fatalf("after reopen: region 7 hydrated=%v, count=%d (want false, 4)", s2.IsHydrated(7), s2.Hydrated())
	}
	if used, _ := s2.Blocks(); used != 4 { // superblock + chunks 0, 1, last
		t.Fatalf("used blocks = %d, want 4", used)
	}
}

func TestMismatchAndForeignDirs(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	s, err := Open(testOptions(dir, nil))
	if err != nil {
		t.Fatal(err)
	}
	// Locked while open.
	if _, err := Open(testOptions(dir, nil)); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open = %v, want ErrLocked", err)
	}
	s.Close()
	o := testOptions(dir, nil)
	o.RegionSize = 8192
	if _, err := Open(o); !errors.Is(err, ErrMismatch) {
		t.Fatalf("other region size = %v, want ErrMismatch", err)
	}
	o = testOptions(dir, nil)
	o.TargetSize += 4096
	if _, err := Open(o); !errors.Is(err, ErrMismatch) {
		t.Fatalf("other target size = %v, want ErrMismatch", err)
	}
	// A directory with someone else's files is never written.
	foreign := t.TempDir()
	if err := os.WriteFile(filepath.Join(foreign, "precious"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(testOptions(foreign, nil)); !errors.Is(err, ErrNotStore) {
		t.Fatalf("foreign dir = %v, want ErrNotStore", err)
	}
	if ents, _ := os.ReadDir(foreign); len(ents) != 1 {
		t.Fatalf("foreign dir was written: %d entries", len(ents))
	}
	// A file is not a directory.
	f := filepath.Join(t.TempDir(), "file")
	os.WriteFile(f, nil, 0o600)
	if _, err := Open(testOptions(f, nil)); !errors.Is(err, ErrOpen) {
		t.Fatalf("file = %v, want ErrOpen", err)
	}
}

func TestCorruptSuperblock(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	rec := &recorder{}
	s, err := Open(testOptions(dir, rec))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.kv.Put([]Entry{{Key: keySuperblock, Value: []byte("garbage")}}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := Open(testOptions(dir, nil)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("garbage superblock = %v, want ErrCorrupt", err)
	}
}

func TestCommitFailureGoesReadOnly(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	rec := &recorder{}
	s, err := Open(testOptions(dir, rec))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetHydrated(1)
	if err := s.Commit(rec); err != nil {
		t.Fatal(err)
	}
	s.SetHydrated(2)
	rec.failPut = true
	if err := s.Commit(rec); err == nil {
		t.Fatal("commit with a failing store succeeded")
	}
	if s.Mode() != ModeRO {
		t.Fatalf("mode = %v, want ro", s.Mode())
	}
	// The destination holds region 2's data: the in-core bit stays, so
	// reads keep seeing acknowledged writes.
	if !s.IsHydrated(1) || !s.IsHydrated(2) {
		t.Fatal("a failed metadata write must keep the in-core bitmap")
	}
	if err := s.SetHydrated(3); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("SetHydrated in ro = %v, want ErrReadOnly", err)
	}
	if s.Changed() {
		t.Fatal("ro store reports changes")
	}
	// Nothing of the aborted transaction was persisted.
	s.Close()
	s2, err := Open(testOptions(dir, nil))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if !s2.IsHydrated(1) || s2.IsHydrated(2) {
		t.Fatal("after reopen: want 1 committed, 2 not")
	}
}

// TestDestinationFlushFailureReloads: when the destination flush fails, the
// destination may not hold what the new bits promise: as dm-clone, the
// committed bitmap is reloaded and those regions read from the source.
func TestDestinationFlushFailureReloads(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	rec := &recorder{}
	s, err := Open(testOptions(dir, rec))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetHydrated(1)
	if err := s.Commit(rec); err != nil {
		t.Fatal(err)
	}
	s.SetHydrated(2)
	rec.failSync = true
	if err := s.Commit(rec); err == nil {
		t.Fatal("commit with a failing destination succeeded")
	}
	if s.Mode() != ModeRO || !s.IsHydrated(1) || s.IsHydrated(2) {
		t.Fatalf("mode %v, 1 hydrated %v, 2 hydrated %v: want ro, true, false", s.Mode(), s.IsHydrated(1), s.IsHydrated(2))
	}
}

func TestCommitAndReloadFailureGoesFail(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	rec := &recorder{}
	s, err := Open(testOptions(dir, rec))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetHydrated(2)
	rec.failPut, rec.failGet = true, true
	if err := s.Commit(rec); err == nil {
		t.Fatal("commit succeeded")
	}
	if s.Mode() != ModeFail {
		t.Fatalf("mode = %v, want Fail", s.Mode())
	}
	s.setMode(ModeRO)
	if s.Mode() != ModeFail {
		t.Fatal("Fail must be sticky")
	}
}

func TestReleaseWhenDone(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	o := Options{Dir: dir, TargetSize: 3*ChunkRegions*4096 + 4096, RegionSize: 4096}
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	n := s.NrRegions()
	if c, _ := s.SetRange(0, n); c != n {
		t.Fatalf("SetRange changed %d, want %d", c, n)
	}
	if s.Released() {
		t.Fatal("released before commit")
	}
	if err := s.Commit(&recorder{}); err != nil {
		t.Fatal(err)
	}
	if !s.Released() || !s.Done() || !s.IsHydrated(n-1) || s.NextUnhydrated(0) != n {
		t.Fatal("bitmap not released after the final commit, or released state wrong")
	}
	s.Close()
	s, err = Open(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.Released() || s.Hydrated() != n {
		t.Fatal("a fully hydrated store must open released")
	}
}

func TestConcurrentSetAndCommitLoseNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	concurrentSetAndCommit(t, Options{Dir: dir, TargetSize: 4 * ChunkRegions * 4096, RegionSize: 4096})
}

func concurrentSetAndCommit(t *testing.T, o Options) {
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	n := s.NrRegions()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				if err := s.Commit(&recorder{}); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	var setters sync.WaitGroup
	for g := range 4 {
		setters.Add(1)
		go func() {
			defer setters.Done()
			for r := uint64(g); r < n; r += 4 * 97 {
				s.SetHydrated(r)
			}
		}()
	}
	setters.Wait()
	close(stop)
	wg.Wait()
	if err := s.Commit(&recorder{}); err != nil {
		t.Fatal(err)
	}
	want := s.Hydrated()
	s.Close()
	s, err = Open(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Hydrated() != want {
		t.Fatalf("after reopen %d hydrated, want %d: a dirty mark was lost", s.Hydrated(), want)
	}
}

// TestFullFilesystemGoesReadOnly: a commit whose write meets a full
// filesystem fails with ErrNoSpace and the store goes ro, keeping the
// in-core bitmap (the destination holds the data).
func TestFullFilesystemGoesReadOnly(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	rec := &recorder{}
	s, err := Open(testOptions(dir, rec))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetHydrated(1)
	if err := s.Commit(rec); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	rec.putErr = fmt.Errorf("writing the journal: %w", syscall.ENOSPC)
	rec.mu.Unlock()
	s.SetHydrated(2)
	if err := s.Commit(rec); !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("commit on a full filesystem: %v", err)
	}
	if s.Mode() != ModeRO || !s.IsHydrated(1) || !s.IsHydrated(2) {
		t.Fatalf("mode %v; want ro, the in-core bitmap kept (the destination holds the data)", s.Mode())
	}
}

func TestSourceIDPin(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	o := testOptions(dir, nil)
	o.Source, o.SourceID = "https://h/disk.img", `etag:"v1";size:42`
	open := func(source, id string) error {
		t.Helper()
		o.Source, o.SourceID = source, id
		s, err := Open(o)
		if err == nil {
			if got := s.Superblock().SourceID; got == "" {
				t.Fatalf("opened without a pin")
			}
			s.Close()
		}
		return err
	}
	if err := open("https://h/disk.img", `etag:"v1";size:42`); err != nil {
		t.Fatal(err)
	}
	if err := open("https://h/disk.img", `etag:"v1";size:42`); err != nil {
		t.Fatalf("same object: %v", err)
	}
	err := open("https://h/disk.img", `etag:"v2";size:42`)
	if !errors.Is(err, ErrSourceChanged) || !strings.Contains(err.Error(), `etag:"v1"`) || !strings.Contains(err.Error(), `etag:"v2"`) {
		t.Fatalf("changed object: %v", err)
	}
	// The same URL that no longer identifies itself cannot be checked.
	if err := open("https://h/disk.img", ""); !errors.Is(err, ErrSourceChanged) {
		t.Fatalf("unpinnable same source: %v", err)
	}
	// A local copy under another name: accepted (with a warning).
	if err := open("/srv/disk.img", ""); err != nil {
		t.Fatalf("another, unpinnable source: %v", err)
	}
	// A store made without a pin takes the first one it sees.
	dir2 := filepath.Join(t.TempDir(), "md")
	o = testOptions(dir2, nil)
	if s, err := Open(o); err != nil {
		t.Fatal(err)
	} else {
		s.Close()
	}
	o.SourceID = "last-modified:x;size:1"
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	o.SourceID = "last-modified:y;size:1"
	if _, err := Open(o); !errors.Is(err, ErrSourceChanged) {
		t.Fatalf("after pinning on reopen: %v", err)
	}
}

func TestOtherDestinationRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	o := testOptions(dir, nil)
	o.Destination = "/srv/a.img"
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	before := dirDigest(t, dir)
	o.Destination = "/srv/b.img"
	_, err = Open(o)
	if !errors.Is(err, ErrOtherDevice) || !strings.Contains(err.Error(), "/srv/a.img") || !strings.Contains(err.Error(), "/srv/b.img") {
		t.Fatalf("other destination: %v", err)
	}
	// Badger starts a new value log on every open; what was there stays.
	after := dirDigest(t, dir)
	for _, line := range strings.Split(before, "\n") {
		if !strings.Contains(after, line) {
			t.Fatalf("refused store was written: %s changed", line)
		}
	}
	o.Destination = "/srv/a.img"
	if s, err = Open(o); err != nil {
		t.Fatalf("same destination: %v", err)
	}
	if got := s.Superblock().Destination; got != "/srv/a.img" {
		t.Fatalf("superblock destination %q", got)
	}
	s.Close()
	// A store that recorded no destination takes the first one it sees.
	dir2 := filepath.Join(t.TempDir(), "md")
	o = testOptions(dir2, nil)
	if s, err = Open(o); err != nil {
		t.Fatal(err)
	}
	s.Close()
	o.Destination = "/srv/c.img"
	if s, err = Open(o); err != nil {
		t.Fatal(err)
	}
	s.Close()
	o.Destination = "/srv/d.img"
	if _, err := Open(o); !errors.Is(err, ErrOtherDevice) {
		t.Fatalf("after recording on reopen: %v", err)
	}
}

// dirDigest names every file of a directory tree with a hash of its
// content.
func dirDigest(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s %x\n", p, sha256.Sum256(data))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// batchOptions is a store of 7 chunks (the last one short) committed in
// batches of 2 chunks.
func batchOptions(dir string, rec *recorder) Options {
	o := testOptions(dir, rec)
	o.TargetSize = (6*ChunkRegions + 1000) * 4096
	o.CommitBatchChunks = 2
	return o
}

// hydrateEveryChunk sets random bits in every chunk and returns them.
func hydrateEveryChunk(t *testing.T, s *Store) map[uint64]bool {
	t.Helper()
	rng := rand.New(rand.NewPCG(7, 8))
	set := map[uint64]bool{}
	for c := uint64(0); c*ChunkRegions < s.NrRegions(); c++ {
		for range 50 {
			r := c*ChunkRegions + rng.Uint64N(min(ChunkRegions, s.NrRegions()-c*ChunkRegions))
			if err := s.SetHydrated(r); err != nil {
				t.Fatal(err)
			}
			set[r] = true
		}
	}
	return set
}

// TestCommitInBatches: a commit of more dirty chunks than a batch holds
// writes them batch by batch, each after its own destination sync, and
// every chunk is in the store after a reopen.
func TestCommitInBatches(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	rec := &recorder{}
	s, err := Open(batchOptions(dir, rec))
	if err != nil {
		t.Fatal(err)
	}
	set := hydrateEveryChunk(t, s)
	rec.events, rec.putEntries = nil, nil // the format's put
	if err := s.Commit(rec); err != nil {
		t.Fatal(err)
	}
	want := []string{"sync", "put", "sync", "put", "sync", "put", "sync", "put"}
	if fmt.Sprint(rec.events) != fmt.Sprint(want) {
		t.Fatalf("commit of 7 chunks in batches of 2: events %v, want %v", rec.events, want)
	}
	if fmt.Sprint(rec.putEntries) != "[2 2 2 1]" {
		t.Fatalf("entries per put = %v, want [2 2 2 1]", rec.putEntries)
	}
	if st := s.Stats(); st.Commits != 1 || st.ChunksWritten != 7 || st.CommitErrors != 0 {
		t.Fatalf("stats %+v, want 1 commit of 7 chunks", st)
	}
	if used, _ := s.Blocks(); used != 8 {
		t.Fatalf("used blocks = %d, want 8", used)
	}
	// Rewriting chunks already in the store adds no blocks.
	for _, r := range []uint64{3, 3*ChunkRegions + 3, s.NrRegions() - 1} {
		s.SetHydrated(r)
		set[r] = true
	}
	if err := s.Commit(rec); err != nil {
		t.Fatal(err)
	}
	if used, _ := s.Blocks(); used != 8 {
		t.Fatalf("used blocks after a rewrite = %d, want 8", used)
	}
	inCore := bitmapWords(s)
	s.Close()
	s2, err := Open(batchOptions(dir, nil))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got := bitmapWords(s2); !slices.Equal(got, inCore) {
		t.Fatal("the reopened bitmap differs from the committed one")
	}
	if s2.Hydrated() != uint64(len(set)) {
		t.Fatalf("after reopen %d hydrated, want %d", s2.Hydrated(), len(set))
	}
	if used, _ := s2.Blocks(); used != 8 {
		t.Fatalf("used blocks after reopen = %d, want 8", used)
	}
}

// TestCommitFailsInSecondBatch: a failure in the second batch (its
// destination sync or its write) leaves the store ro, the first batch
// committed and nothing of the later batches claimed.
func TestCommitFailsInSecondBatch(t *testing.T) {
	for _, tc := range []struct {
		name       string
		fail       func(*recorder)
		keepInCore bool // a metadata failure keeps the in-core bits
	}{
		{"sync", func(r *recorder) { r.failSyncAt = 2 }, false},
		{"put", func(r *recorder) { r.failPutAt = 2 }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "md")
			rec := &recorder{}
			s, err := Open(batchOptions(dir, rec))
			if err != nil {
				t.Fatal(err)
			}
			set := hydrateEveryChunk(t, s)
			rec.puts, rec.events = 0, nil // the format's put
			tc.fail(rec)
			if err := s.Commit(rec); err == nil {
				t.Fatal("commit succeeded")
			}
			if s.Mode() != ModeRO {
				t.Fatalf("mode %v, want ro", s.Mode())
			}
			if st := s.Stats(); st.Commits != 0 || st.CommitErrors != 1 || st.ChunksWritten != 2 {
				t.Fatalf("stats %+v, want no commit, 1 error, 2 chunks written", st)
			}
			if used, _ := s.Blocks(); used != 3 {
				t.Fatalf("used blocks = %d, want 3 (superblock + the first batch)", used)
			}
			if s.Changed() {
				t.Fatal("an aborted commit leaves changes")
			}
			firstBatch := func(r uint64) bool { return r < 2*ChunkRegions }
			check := func(what string, s *Store, later bool) {
				t.Helper()
				for r := range set {
					if got, want := s.IsHydrated(r), firstBatch(r) || later; got != want {
						t.Fatalf("%s: region %d (chunk %d) hydrated %v, want %v", what, r, r/ChunkRegions, got, want)
					}
				}
				if want := countIf(set, func(r uint64) bool { return firstBatch(r) || later }); s.Hydrated() != want {
					t.Fatalf("%s: %d hydrated, want %d", what, s.Hydrated(), want)
				}
			}
			check("in core", s, tc.keepInCore)
			s.Close()
			s2, err := Open(batchOptions(dir, nil))
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			check("after reopen", s2, false)
			if used, _ := s2.Blocks(); used != 3 {
				t.Fatalf("used blocks after reopen = %d, want 3", used)
			}
		})
	}
}

// TestConcurrentSetAndCommitInSmallBatches: bits set while a commit
// goes batch by batch are never lost (one chunk per batch).
func TestConcurrentSetAndCommitInSmallBatches(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	o := Options{Dir: dir, TargetSize: 9 * ChunkRegions * 4096, RegionSize: 4096, CommitBatchChunks: 1}
	concurrentSetAndCommit(t, o)
}

func bitmapWords(s *Store) []uint64 {
	b := s.bitmap.Load()
	w := make([]uint64, (s.NrRegions()+63)/64)
	b.Words(0, w)
	return w
}

func countIf(set map[uint64]bool, f func(uint64) bool) uint64 {
	var n uint64
	for r := range set {
		if f(r) {
			n++
		}
	}
	return n
}
