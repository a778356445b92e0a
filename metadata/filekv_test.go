package metadata

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/dgraph-io/badger/v4"
)

func openTestKV(t *testing.T, dir string) *fileKV {
	t.Helper()
	kv, err := openFileKV(dir)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

func scanAll(t *testing.T, kv KV, prefix []byte) map[string]string {
	t.Helper()
	got := map[string]string{}
	var last []byte
	err := kv.Scan(prefix, func(k, v []byte) error {
		if last != nil && bytes.Compare(last, k) >= 0 {
			t.Errorf("scan out of order: %q after %q", k, last)
		}
		last = append(last[:0], k...)
		got[string(k)] = string(v)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestFileKVRoundTrip: values come back from Get and Scan, in key order,
// after a reopen; chunks never written are absent; a raw chunk (the
// largest value) fits; keys the store does not have are refused.
func TestFileKVRoundTrip(t *testing.T) {
	dir := t.TempDir()
	kv := openTestKV(t, dir)
	raw := bytes.Repeat([]byte{0xa5}, 1+ChunkBytes)
	want := map[string]string{
		string(keySuperblock):  `{"magic":"x"}`,
		string(chunkKey(0)):    "zero",
		string(chunkKey(3)):    string(raw),
		string(chunkKey(4)):    "four",
		string(chunkKey(1000)): "far",
	}
	var entries []Entry
	for k, v := range want {
		entries = append(entries, Entry{Key: []byte(k), Value: []byte(v)})
	}
	if err := kv.Put(entries); err != nil {
		t.Fatal(err)
	}
	if err := kv.Put([]Entry{{Key: chunkKey(4), Value: []byte("4")}}); err != nil {
		t.Fatal(err)
	}
	want[string(chunkKey(4))] = "4"
	if err := kv.Put([]Entry{{Key: []byte("other"), Value: nil}}); err == nil {
		t.Error("a key without a slot was accepted")
	}
	if err := kv.Put([]Entry{{Key: chunkKey(5), Value: make([]byte, slotBytes)}}); err == nil {
		t.Error("a value larger than its slot was accepted")
	}
	kv.Close()

	kv = openTestKV(t, dir)
	defer kv.Close()
	got := scanAll(t, kv, nil)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("scan after reopen:\n got %q\nwant %q", got, want)
	}
	if got := scanAll(t, kv, prefixBitmap); len(got) != 4 {
		t.Fatalf("scan of the chunks: %d keys", len(got))
	}
	for k, v := range want {
		if g, err := kv.Get([]byte(k)); err != nil || string(g) != v {
			t.Errorf("get %q: %q %v", k, g, err)
		}
	}
	if g, err := kv.Get(chunkKey(2)); g != nil || err != nil {
		t.Errorf("a chunk never written: %q %v", g, err)
	}
	if g, err := kv.Get(chunkKey(1 << 20)); g != nil || err != nil {
		t.Errorf("a chunk past the file: %q %v", g, err)
	}
}

// damageSlot overwrites part of chunk c's slot, as a torn write would.
func damageSlot(t *testing.T, dir string, c uint64) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, metaName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("torn"), slotBase+int64(c)*slotBytes+slotHeaderSize); err != nil {
		t.Fatal(err)
	}
}

// TestFileKVJournalRepairsTornSlots: a slot damaged after the journal of
// its Put was synced (a crash in the middle of the slot writes) is
// rewritten whole at the next open.
func TestFileKVJournalRepairsTornSlots(t *testing.T) {
	dir := t.TempDir()
	kv := openTestKV(t, dir)
	if err := kv.Put([]Entry{{Key: chunkKey(1), Value: []byte("old value")}}); err != nil {
		t.Fatal(err)
	}
	if err := kv.Put([]Entry{{Key: chunkKey(1), Value: []byte("new value")}, {Key: chunkKey(7), Value: []byte("seven")}}); err != nil {
		t.Fatal(err)
	}
	kv.Close()
	damageSlot(t, dir, 1)
	kv = openTestKV(t, dir)
	defer kv.Close()
	if g, err := kv.Get(chunkKey(1)); err != nil || string(g) != "new value" {
		t.Fatalf("torn slot after replay: %q %v", g, err)
	}
}

// TestFileKVDamageOutsideTheJournal: a damaged slot the journal does not
// cover is reported as corrupt, never read as zeroes or garbage; a journal
// that does not check out (a Put torn while writing it) is ignored.
func TestFileKVDamageOutsideTheJournal(t *testing.T) {
	dir := t.TempDir()
	kv := openTestKV(t, dir)
	for i, e := range []Entry{{Key: chunkKey(1), Value: []byte("one")}, {Key: chunkKey(2), Value: []byte("two")}} {
		if err := kv.Put([]Entry{e}); err != nil {
			t.Fatal(i, err)
		}
	}
	kv.Close()
	j, err := os.OpenFile(filepath.Join(dir, journalName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	j.WriteAt([]byte{0xff}, journalHeaderSize+2)
	j.Close()
	kv = openTestKV(t, dir)
	if got := scanAll(t, kv, prefixBitmap); got[string(chunkKey(2))] != "two" || got[string(chunkKey(1))] != "one" {
		t.Fatalf("after a torn journal: %q", got)
	}
	kv.Close()
	damageSlot(t, dir, 1)
	kv = openTestKV(t, dir)
	defer kv.Close()
	if err := kv.Scan(prefixBitmap, func(_, _ []byte) error { return nil }); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("scan over a damaged slot: %v", err)
	}
	if _, err := kv.Get(chunkKey(1)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("get of a damaged slot: %v", err)
	}
}

// TestStoreLocked: a store is opened by one Store at a time.
func TestStoreLocked(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	s, err := Open(testOptions(dir, nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(testOptions(dir, nil)); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
	s.Close()
	s, err = Open(testOptions(dir, nil))
	if err != nil {
		t.Fatalf("open after close: %v", err)
	}
	s.Close()
}

// writeBadgerStore writes keys as an earlier nbdclone did: a badger store.
func writeBadgerStore(t *testing.T, dir string, entries []Entry) {
	t.Helper()
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil).WithMemTableSize(2 << 20).WithValueThreshold(200 << 10).WithValueLogFileSize(16 << 20))
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(txn *badger.Txn) error {
		for _, e := range entries {
			if err := txn.Set(e.Key, e.Value); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "nbdclone.reserve"), make([]byte, 4096), 0o600)
}

// TestBadgerStoreConverted: the badger store of an earlier nbdclone opens
// with its bits, is converted to the file store and its files removed.
func TestBadgerStoreConverted(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	o := testOptions(dir, nil)
	sb, _ := json.Marshal(Superblock{Magic: superblockMagic, Version: 2, RegionSize: o.RegionSize,
		TargetSize: o.TargetSize, Source: o.Source})
	words := make([]uint64, chunkWords)
	words[5] = 1 << 3
	all := make([]uint64, chunkWords)
	for i := range all {
		all[i] = ^uint64(0)
	}
	writeBadgerStore(t, dir, []Entry{
		{Key: keySuperblock, Value: sb},
		{Key: chunkKey(0), Value: appendChunk(nil, words, false)},
		{Key: chunkKey(1), Value: appendChunk(nil, all, true)},
	})
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	if !s.IsHydrated(5*64+3) || !s.IsHydrated(ChunkRegions+17) || s.Hydrated() != 1+ChunkRegions {
		t.Fatalf("converted store: %d hydrated", s.Hydrated())
	}
	s.Close()
	names, _ := os.ReadDir(dir)
	var left []string
	for _, e := range names {
		left = append(left, e.Name())
	}
	if fmt.Sprint(left) != fmt.Sprint([]string{journalName, metaName}) {
		t.Fatalf("files after the conversion: %v", left)
	}
	s, err = Open(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Hydrated() != 1+ChunkRegions {
		t.Fatalf("reopened after conversion: %d hydrated", s.Hydrated())
	}
}

// TestForeignBadgerStoreRefused: a badger store without an nbdclone
// superblock is refused and nothing is written into its directory.
func TestForeignBadgerStoreRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "md")
	writeBadgerStore(t, dir, []Entry{{Key: []byte("users/1"), Value: []byte("alice")}})
	if _, err := Open(testOptions(dir, nil)); !errors.Is(err, ErrNotStore) {
		t.Fatalf("foreign badger store: %v, want ErrNotStore", err)
	}
	if _, err := os.Stat(filepath.Join(dir, metaName)); !os.IsNotExist(err) {
		t.Fatalf("the refused directory got %s", metaName)
	}
}
