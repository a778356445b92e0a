package metadata

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
)

// KV is the small key-value surface the store needs. The badger
// implementation is the only production one; tests wrap it to inject faults.
type KV interface {
	// Get returns the value of key, or (nil, nil) if absent.
	Get(key []byte) ([]byte, error)
	// Scan calls fn for every key with the prefix, in key order.
	Scan(prefix []byte, fn func(key, value []byte) error) error
	// Put writes all entries durably (synced) before returning. Entries may
	// be split over several transactions; each entry is atomic. Put keeps
	// no reference to the entries once it returns (a commit reuses their
	// buffer for its next batch).
	Put(entries []Entry) error
	Close() error
}

// Entry is one key-value pair to write.
type Entry struct {
	Key, Value []byte
}

// The store's size knobs. A 1 TiB device with 4 KiB regions and 10% of
// them hydrated at random holds about 16 MiB of coded chunks, and a
// commit may rewrite all of them: small memtables and tables keep badger's
// arenas, table builders and write-ahead files (all counted in the
// daemon's RSS and the directory's size) to a few MiB each, at the cost of
// more, smaller flushes.
const (
	memTableSize  = 2 << 20
	baseTableSize = 1 << 20
	baseLevelSize = 4 << 20
)

type badgerKV struct {
	db *badger.DB
}

// openBadger opens (creating if needed) a badger store tuned for a tiny
// metadata set: small memtables, no block cache, no compression (chunks
// are coded already), one version, values kept in the LSM tree.
func openBadger(dir string, log *slog.Logger) (*badgerKV, error) {
	opts := badger.DefaultOptions(dir).
		WithLogger(badgerLogger{log}).
		WithSyncWrites(true).
		WithNumVersionsToKeep(1).
		WithMemTableSize(memTableSize).
		WithValueThreshold(memTableSize / 10).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(8).
		WithBaseTableSize(baseTableSize).
		WithBaseLevelSize(baseLevelSize).
		WithNumCompactors(2).
		WithBlockCacheSize(0).
		WithIndexCacheSize(0).
		WithCompression(options.None).
		WithValueLogFileSize(16 << 20).
		WithDetectConflicts(false).
		WithMetricsEnabled(false).
		WithNumGoroutines(2)
	db, err := badger.Open(opts)
	if err != nil {
		return nil, err
	}
	return &badgerKV{db: db}, nil
}

func (b *badgerKV) Get(key []byte) ([]byte, error) {
	var v []byte
	err := b.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(key)
		if err != nil {
			return err
		}
		v, err = item.ValueCopy(nil)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, nil
	}
	return v, err
}

func (b *badgerKV) Scan(prefix []byte, fn func(key, value []byte) error) error {
	return b.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{PrefetchValues: false, Prefix: prefix})
		defer it.Close()
		for it.Seek(prefix); it.ValidForPrefix(prefix); it.Next() {
			item := it.Item()
			err := item.Value(func(v []byte) error { return fn(item.Key(), v) })
			if err != nil {
				return err
			}
		}
		return nil
	})
}

func (b *badgerKV) Put(entries []Entry) error {
	// Each transaction must stay under badger's batch limits: 15% of the
	// memtable in bytes (values below the value threshold count whole),
	// and that over its ~100-byte skiplist node in entries. Entries are
	// independent, so splitting keeps every bit's guarantee: persisted ⇒
	// its data was durable first.
	const (
		maxTxnBytes   = memTableSize / 10
		maxTxnEntries = memTableSize * 15 / 100 / 128
		entryOverhead = 16 // badger's version suffix and metas
	)
	for len(entries) > 0 {
		n, size := 0, 0
		for n < len(entries) && n < maxTxnEntries {
			sz := len(entries[n].Key) + len(entries[n].Value) + entryOverhead
			if n > 0 && size+sz >= maxTxnBytes {
				break
			}
			size += sz
			n++
		}
		err := b.db.Update(func(txn *badger.Txn) error {
			for _, e := range entries[:n] {
				if err := txn.Set(e.Key, e.Value); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		entries = entries[n:]
	}
	return nil
}

func (b *badgerKV) Close() error { return b.db.Close() }

// badgerLogger routes badger's logging to slog: warnings and errors only,
// its chatter at debug.
type badgerLogger struct{ log *slog.Logger }

func (l badgerLogger) Errorf(f string, a ...any) {
	l.log.Error("badger: " + strings.TrimSpace(fmt.Sprintf(f, a...)))
}
func (l badgerLogger) Warningf(f string, a ...any) {
	l.log.Warn("badger: " + strings.TrimSpace(fmt.Sprintf(f, a...)))
}
func (l badgerLogger) Infof(f string, a ...any) {
	l.log.Debug("badger: " + strings.TrimSpace(fmt.Sprintf(f, a...)))
}
func (l badgerLogger) Debugf(f string, a ...any) {
	l.log.Debug("badger: " + strings.TrimSpace(fmt.Sprintf(f, a...)))
}
