package metadata

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
)

// Earlier nbdclone versions kept the store in badger: its MANIFEST, tables
// (*.sst), value logs (*.vlog), memtables (*.mem) and a few small files,
// next to an 8 MiB ballast file. Open converts such a directory once.
const badgerManifest = "MANIFEST"

// migrateBadger copies every key of the badger store in dir into a file
// store there, then removes badger's files, MANIFEST first: a directory
// with a MANIFEST is converted again from the start (badger is not written
// meanwhile, so that copies the same keys), one without it is a file
// store. A badger store with keys but no superblock is someone else's:
// ErrNotStore, and nothing is written.
func migrateBadger(dir string, log *slog.Logger) error {
	opts := badger.DefaultOptions(dir).
		WithLogger(badgerLogger{log}).
		WithNumVersionsToKeep(1).
		WithMemTableSize(2 << 20).
		WithValueThreshold(200 << 10).
		WithNumMemtables(1).
		WithBlockCacheSize(0).
		WithIndexCacheSize(0).
		WithCompression(options.None).
		WithValueLogFileSize(16 << 20).
		WithNumCompactors(0).
		WithMetricsEnabled(false).
		WithNumGoroutines(1)
	db, err := badger.Open(opts)
	if err != nil {
		return err
	}
	defer db.Close() // idempotent: a no-op after the checked Close below
	keys, err := copyBadger(db, dir)
	if err != nil {
		return err
	}
	// Closed before its files go: closing may still write them.
	if err := db.Close(); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, badgerManifest)); err != nil {
		return fmt.Errorf("removing badger's manifest: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	log.Info("metadata converted from badger to the file store", "dir", dir, "keys", keys)
	return removeBadgerLeftovers(dir)
}

// copyBadger copies every key of db into a file store in dir, in Puts of
// about commitBatchBytes, and returns how many it copied. A store with keys
// but no superblock is refused before the file store is created.
func copyBadger(db *badger.DB, dir string) (keys int, err error) {
	foreign := false
	err = db.View(func(txn *badger.Txn) error {
		if _, err := txn.Get(keySuperblock); !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		it := txn.NewIterator(badger.IteratorOptions{})
		defer it.Close()
		it.Rewind()
		foreign = it.Valid()
		return nil
	})
	if err != nil {
		return 0, err
	}
	if foreign {
		return 0, fmt.Errorf("%w: %s holds a key-value store without an nbdclone superblock", ErrNotStore, dir)
	}
	dst, err := openFileKV(dir)
	if err != nil {
		return 0, err
	}
	var batch []Entry
	size := 0
	put := func() error {
		err := dst.Put(batch)
		batch, size = batch[:0], 0
		return err
	}
	err = db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			v, err := item.ValueCopy(nil)
			if err != nil {
				return err
			}
			batch = append(batch, Entry{Key: item.KeyCopy(nil), Value: v})
			size += len(v)
			keys++
			if size >= commitBatchBytes {
				if err := put(); err != nil {
					return err
				}
			}
		}
		if len(batch) == 0 {
			return nil
		}
		return put()
	})
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	return keys, err
}

// removeBadgerLeftovers removes what a conversion left of badger's files
// (and its ballast file) when it stopped after the MANIFEST went.
func removeBadgerLeftovers(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		name := e.Name()
		switch {
		case name == "KEYREGISTRY", name == "DISCARD", name == "LOCK", name == "nbdclone.reserve",
			strings.HasSuffix(name, ".sst"), strings.HasSuffix(name, ".vlog"), strings.HasSuffix(name, ".mem"):
			if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

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
