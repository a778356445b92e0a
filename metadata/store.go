package metadata

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nbdclone/nbdclone/regions"
)

// Sentinel errors; the texts after the prefix are dm-clone's where it has one.
var (
	// ErrOpen: the metadata directory cannot be opened or created.
	ErrOpen = errors.New("metadata: cannot open metadata directory")
	// ErrNotStore: a non-empty directory that holds no metadata store.
	ErrNotStore = errors.New("metadata: directory is not empty and holds no nbdclone metadata; refusing to write it")
	// ErrLocked: another process or device holds the store.
	ErrLocked = errors.New("metadata: store is in use by another device or process")
	// ErrCorrupt: the superblock or a bitmap chunk cannot be decoded.
	ErrCorrupt = errors.New("metadata: corrupt metadata")
	// ErrMismatch: the store was made for another region or target size.
	ErrMismatch = errors.New("metadata: Region and/or target size don't match the ones in metadata")
	// ErrSourceChanged: the source's identity (an http(s) object's ETag, or
	// Last-Modified and size) is not the one the store was made from:
	// hydrating on would mix two versions of the source.
	// ErrOtherDevice: the store describes another destination device.
	ErrOtherDevice   = errors.New("metadata: made for another destination device")
	ErrSourceChanged = errors.New("metadata: the source is not the one this clone was made from")
	// ErrNoWrite: the store can be read but not written.
	ErrNoWrite = errors.New("metadata: Unable to get write access to metadata, please check/repair metadata")
	// ErrReadOnly: the store is in ro or Fail mode; nothing can change.
	ErrReadOnly = errors.New("metadata: read-only mode")
	// ErrClosed: the store is closed.
	ErrClosed = errors.New("metadata: closed")
	// ErrNoSpace: the metadata filesystem is full. It wraps
	// syscall.ENOSPC.
	ErrNoSpace = fmt.Errorf("metadata: not enough free space on the metadata filesystem: %w", syscall.ENOSPC)
)

const (
	superblockMagic = "nbdclone-metadata"
	// superblockVersion 2 added Rice-coded bitmap chunks; a version 1
	// store is read as is and upgraded at open, before anything writes a
	// chunk that version 1 could not read.
	superblockVersion    = 2
	minSuperblockVersion = 1
	// ChunkBytes is the size of one bitmap chunk; ChunkRegions regions each.
	ChunkBytes   = 4096
	ChunkRegions = ChunkBytes * 8
	chunkWords   = ChunkBytes / 8
	// BlockSectors is the metadata block size dm-clone reports (4 KiB).
	BlockSectors = 8
)

var (
	keySuperblock = []byte("sb")
	prefixBitmap  = []byte("bm/")
)

// Mode is dm-clone's metadata mode.
type Mode int32

const (
	ModeRW Mode = iota
	ModeRO
	ModeFail
)

func (m Mode) String() string {
	switch m {
	case ModeRW:
		return "rw"
	case ModeRO:
		return "ro"
	default:
		return "Fail"
	}
}

// Superblock is the store's header.
type Superblock struct {
	Magic      string `json:"magic"`
	Version    int    `json:"version"`
	RegionSize int64  `json:"region_size"` // bytes
	TargetSize int64  `json:"target_size"` // bytes
	Source     string `json:"source"`      // path or URI, as the table gave it
	SourceSize int64  `json:"source_size"`
	SourceID   string `json:"source_id,omitempty"` // a pin: ETag, Last-Modified + size
	// Destination is the destination the bitmap describes, as the table
	// named it. Metadata says which regions of that device hold data: on
	// any other device the same bits would serve garbage as clone data.
	Destination string    `json:"destination,omitempty"`
	Created     time.Time `json:"created"`
	// PreviousSources are the sources this clone was redirected from,
	// oldest first (SetSource).
	PreviousSources []string `json:"previous_sources,omitempty"`
}

// Options open a store.
type Options struct {
	Dir        string
	TargetSize int64 // bytes
	RegionSize int64 // bytes, a power of two
	Source     string
	SourceSize int64
	SourceID   string
	// Destination names the device the bitmap describes; a store made
	// for another destination is refused (ErrOtherDevice). Empty skips
	// the check.
	Destination string
	Logger      *slog.Logger
	// WrapKV, if set, wraps the file store (fault injection in tests).
	WrapKV func(KV) KV
	// CommitBatchChunks bounds the chunks one batch of a commit writes
	// (Commit); 0 means DefaultCommitBatchChunks. Tests set it small.
	CommitBatchChunks int
}

// Validate checks the options.
func (o *Options) Validate() error {
	if o.Dir == "" {
		return fmt.Errorf("%w: no directory given", ErrOpen)
	}
	if _, err := regions.NewGeometry(o.TargetSize, o.RegionSize); err != nil {
		return err
	}
	if o.CommitBatchChunks < 0 {
		return fmt.Errorf("%w: negative commit batch size %d", ErrOpen, o.CommitBatchChunks)
	}
	return nil
}

// Stats are counters for metrics.
type Stats struct {
	Commits       uint64
	CommitErrors  uint64
	CommitNanos   int64 // total time spent in successful commits
	ChunksWritten uint64
}

// Store is an open metadata store.
type Store struct {
	log       *slog.Logger
	kv        KV
	dir       string
	sb        Superblock
	nrRegions uint64
	nrChunks  uint64
	// batchChunks bounds the chunks of one commit batch.
	batchChunks int

	// bitmap is nil once every region is hydrated and committed.
	bitmap atomic.Pointer[regions.Bitmap]
	// dirty has one bit per chunk changed since the last commit started.
	dirty   []atomic.Uint64
	changed atomic.Bool
	mode    atomic.Int32

	// commitMu serialises Commit, the abort that may follow, and Close.
	commitMu sync.Mutex
	// persisted marks chunks present in the store; guarded by commitMu.
	persisted      []bool
	persistedCount atomic.Uint64
	closed         bool // guarded by commitMu

	commits, commitErrors, chunksWritten atomic.Uint64
	commitNanos                          atomic.Int64
}

// Open opens the store in opts.Dir, formatting it when the directory is
// missing or empty.
func Open(opts Options) (*Store, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fresh, legacy, err := prepareDir(opts.Dir)
	if err != nil {
		return nil, err
	}
	if legacy {
		if err := migrateBadger(opts.Dir, log); errors.Is(err, ErrNotStore) {
			return nil, err
		} else if err != nil {
			return nil, classifyOpenError(opts.Dir, fmt.Errorf("converting the badger store of an earlier nbdclone: %w", err))
		}
	} else if err := removeBadgerLeftovers(opts.Dir); err != nil {
		log.Warn("removing the files of a converted badger store", "dir", opts.Dir, "err", err)
	}
	fkv, err := openFileKV(opts.Dir)
	if err != nil {
		return nil, classifyOpenError(opts.Dir, err)
	}
	var kv KV = fkv
	if opts.WrapKV != nil {
		kv = opts.WrapKV(kv)
	}
	s := &Store{log: log, kv: kv, dir: opts.Dir, batchChunks: opts.CommitBatchChunks}
	if s.batchChunks == 0 {
		s.batchChunks = DefaultCommitBatchChunks
	}
	if err := s.load(opts, fresh); err != nil {
		kv.Close()
		return nil, err
	}
	return s, nil
}

// prepareDir creates a missing directory and reports whether the store is
// new, and whether it is the badger store of an earlier nbdclone (or one
// whose conversion was interrupted: badger's MANIFEST goes first once the
// file store holds everything). A non-empty directory must hold a store.
func prepareDir(dir string) (fresh, legacy bool, err error) {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return false, false, fmt.Errorf("%w: %w", ErrOpen, err)
		}
		return true, false, nil
	case err != nil:
		return false, false, fmt.Errorf("%w: %w", ErrOpen, err)
	case !fi.IsDir():
		return false, false, fmt.Errorf("%w: %s is not a directory", ErrOpen, dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false, false, fmt.Errorf("%w: %w", ErrOpen, err)
	}
	if len(entries) == 0 {
		return true, false, nil
	}
	if _, err := os.Stat(filepath.Join(dir, badgerManifest)); err == nil {
		return false, true, nil
	}
	if _, err := os.Stat(filepath.Join(dir, metaName)); err != nil {
		return false, false, fmt.Errorf("%w: %s", ErrNotStore, dir)
	}
	return false, false, nil
}

func classifyOpenError(dir string, err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "directory lock"), errors.Is(err, syscall.EWOULDBLOCK):
		return fmt.Errorf("%w: %s", ErrLocked, dir)
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EROFS), strings.Contains(msg, "read-only file system"):
		return fmt.Errorf("%w: %w", ErrNoWrite, err)
	default:
		return fmt.Errorf("%w: %s: %w", ErrCorrupt, dir, err)
	}
}

func (s *Store) load(opts Options, fresh bool) error {
	raw, err := s.kv.Get(keySuperblock)
	if err != nil {
		return fmt.Errorf("%w: reading superblock: %w", ErrCorrupt, err)
	}
	if raw == nil {
		if !fresh {
			// A store without a superblock: an interrupted format (the
			// superblock is the first and only write of a format) or,
			// converted, someone else's badger store. Only the former is
			// empty.
			empty := true
			if err := s.kv.Scan(nil, func(_, _ []byte) error { empty = false; return nil }); err != nil {
				return fmt.Errorf("%w: %w", ErrCorrupt, err)
			}
			if !empty {
				return fmt.Errorf("%w: %s holds a key-value store without an nbdclone superblock", ErrNotStore, opts.Dir)
			}
		}
		s.sb = Superblock{
			Magic: superblockMagic, Version: superblockVersion,
			RegionSize: opts.RegionSize, TargetSize: opts.TargetSize,
			Source: opts.Source, SourceSize: opts.SourceSize, SourceID: opts.SourceID,
			Destination: opts.Destination, Created: time.Now().UTC(),
		}
		if err := s.putSuperblock(); err != nil {
			return fmt.Errorf("%w: formatting: %w", ErrNoWrite, err)
		}
		s.log.Info("metadata formatted", "dir", opts.Dir, "region_size", opts.RegionSize, "target_size", opts.TargetSize)
	} else {
		if err := json.Unmarshal(raw, &s.sb); err != nil || s.sb.Magic != superblockMagic {
			return fmt.Errorf("%w: bad superblock in %s", ErrCorrupt, opts.Dir)
		}
		if s.sb.Version < minSuperblockVersion || s.sb.Version > superblockVersion {
			return fmt.Errorf("%w: superblock version %d, this nbdclone reads %d to %d",
				ErrCorrupt, s.sb.Version, minSuperblockVersion, superblockVersion)
		}
		if s.sb.RegionSize != opts.RegionSize || s.sb.TargetSize != opts.TargetSize {
			return fmt.Errorf("%w (metadata: region %d B, target %d B; table: region %d B, target %d B)",
				ErrMismatch, s.sb.RegionSize, s.sb.TargetSize, opts.RegionSize, opts.TargetSize)
		}
		if s.sb.Source != opts.Source {
			s.log.Warn("metadata was made for another source path", "metadata_source", s.sb.Source, "table_source", opts.Source)
		}
		if err := s.checkDestination(opts); err != nil {
			return err
		}
		if err := s.checkSourceID(opts); err != nil {
			return err
		}
		if s.sb.Version < superblockVersion {
			s.sb.Version = superblockVersion
			if err := s.putSuperblock(); err != nil {
				return fmt.Errorf("%w: upgrading the superblock: %w", ErrNoWrite, err)
			}
			s.log.Info("metadata format upgraded", "version", superblockVersion)
		}
	}
	g, _ := regions.NewGeometry(opts.TargetSize, opts.RegionSize)
	s.nrRegions = g.NrRegions()
	s.nrChunks = (s.nrRegions + ChunkRegions - 1) / ChunkRegions
	s.dirty = make([]atomic.Uint64, (s.nrChunks+63)/64)
	s.persisted = make([]bool, s.nrChunks)
	b, err := s.readBitmap()
	if err != nil {
		return err
	}
	s.bitmap.Store(b)
	s.releaseIfDone()
	return nil
}

// putSuperblock writes s.sb.
func (s *Store) putSuperblock() error {
	b, err := json.Marshal(s.sb)
	if err != nil {
		return err
	}
	return s.kv.Put([]Entry{{Key: keySuperblock, Value: b}})
}

// checkDestination refuses a store made for another destination: its bits
// say which regions of that device hold clone data, and trusting them on
// this one would serve whatever this device holds there. A store from
// before destinations were recorded takes this one.
func (s *Store) checkDestination(opts Options) error {
	switch {
	case opts.Destination == "" || s.sb.Destination == opts.Destination:
		return nil
	case s.sb.Destination == "":
		s.sb.Destination = opts.Destination
		if err := s.putSuperblock(); err != nil {
			return fmt.Errorf("%w: recording the destination: %w", ErrNoWrite, err)
		}
		return nil
	default:
		return fmt.Errorf("%w: %s describes %s, the table names %s (if the device moved, "+
			"name it by its old path, e.g. a symlink; otherwise use empty metadata)",
			ErrOtherDevice, opts.Dir, s.sb.Destination, opts.Destination)
	}
}

// checkSourceID refuses a source whose pinned identity changed. A store
// made without a pin takes the source's identity now; a pinned store
// accepts an unpinnable source only under another name (the user pointed
// the table elsewhere on purpose, and was warned above).
func (s *Store) checkSourceID(opts Options) error {
	switch {
	case s.sb.SourceID == opts.SourceID:
		return nil
	case s.sb.SourceID == "":
		s.sb.SourceID = opts.SourceID
		if err := s.putSuperblock(); err != nil {
			return fmt.Errorf("%w: recording the source identity: %w", ErrNoWrite, err)
		}
		s.log.Info("source identity pinned", "source_id", opts.SourceID)
		return nil
	case opts.SourceID == "" && s.sb.Source != opts.Source:
		s.log.Warn("the new source cannot be checked against the one this clone was made from",
			"metadata_source_id", s.sb.SourceID, "table_source", opts.Source)
		return nil
	default:
		now := opts.SourceID
		if now == "" {
			now = "(none: the source no longer identifies itself)"
		}
		return fmt.Errorf("%w: made from %s, the source is now %s; refusing to mix two versions "+
			"(restore the original object, or start a new clone on empty metadata)", ErrSourceChanged, s.sb.SourceID, now)
	}
}

// readBitmap loads the committed bitmap from the store.
func (s *Store) readBitmap() (*regions.Bitmap, error) {
	b := regions.NewBitmap(s.nrRegions)
	words := make([]uint64, chunkWords)
	var count uint64
	persisted := make([]bool, s.nrChunks)
	err := s.kv.Scan(prefixBitmap, func(key, value []byte) error {
		if len(key) != len(prefixBitmap)+8 {
			return fmt.Errorf("%w: bad bitmap key %q", ErrCorrupt, key)
		}
		c := binary.BigEndian.Uint64(key[len(prefixBitmap):])
		if c >= s.nrChunks {
			return fmt.Errorf("%w: bitmap chunk %d beyond the device (%d chunks)", ErrCorrupt, c, s.nrChunks)
		}
		n := s.chunkWordCount(c)
		if err := decodeChunk(value, words[:n]); err != nil {
			return fmt.Errorf("%w: chunk %d: %w", ErrCorrupt, c, err)
		}
		b.LoadWords(c*chunkWords, words[:n])
		if !persisted[c] {
			persisted[c] = true
			count++
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: reading bitmap: %w", ErrCorrupt, err)
	}
	s.persisted = persisted
	s.persistedCount.Store(count)
	return b, nil
}

// chunkWordCount is the number of bitmap words chunk c holds (the last may
// be short).
func (s *Store) chunkWordCount(c uint64) uint64 {
	totalWords := (s.nrRegions + 63) / 64
	return min(chunkWords, totalWords-c*chunkWords)
}

func chunkKey(c uint64) []byte {
	return appendChunkKey(make([]byte, 0, len(prefixBitmap)+8), c)
}

func appendChunkKey(dst []byte, c uint64) []byte {
	return binary.BigEndian.AppendUint64(append(dst, prefixBitmap...), c)
}

// Superblock returns the store's header.
func (s *Store) Superblock() Superblock { return s.sb }

// NrRegions is the number of regions the bitmap covers.
func (s *Store) NrRegions() uint64 { return s.nrRegions }

// Mode is the current metadata mode.
func (s *Store) Mode() Mode { return Mode(s.mode.Load()) }

// IsHydrated reports whether region r is hydrated (in core).
func (s *Store) IsHydrated(r uint64) bool {
	b := s.bitmap.Load()
	return b == nil || b.Test(r)
}

// RangeHydrated reports whether regions [r, r+n) are all hydrated.
func (s *Store) RangeHydrated(r, n uint64) bool {
	b := s.bitmap.Load()
	return b == nil || b.AllSet(r, n)
}

// NextUnhydrated returns the first unhydrated region at or after r, or
// NrRegions() if there is none.
func (s *Store) NextUnhydrated(r uint64) uint64 {
	b := s.bitmap.Load()
	if b == nil {
		return s.nrRegions
	}
	return b.NextClear(r)
}

// NextHydrated returns the first hydrated region at or after r, or
// NrRegions().
func (s *Store) NextHydrated(r uint64) uint64 {
	b := s.bitmap.Load()
	if b == nil {
		return min(r, s.nrRegions)
	}
	return b.NextSet(r)
}

// NextUnhydratedBefore returns the first unhydrated region in [r, end), or
// end (at most NrRegions()) if there is none; it looks only at that range.
func (s *Store) NextUnhydratedBefore(r, end uint64) uint64 {
	b := s.bitmap.Load()
	if b == nil {
		return min(end, s.nrRegions)
	}
	return b.NextClearBefore(r, end)
}

// NextHydratedBefore returns the first hydrated region in [r, end), or end
// (at most NrRegions()); it looks only at that range.
func (s *Store) NextHydratedBefore(r, end uint64) uint64 {
	b := s.bitmap.Load()
	if b == nil {
		return min(r, end, s.nrRegions)
	}
	return b.NextSetBefore(r, end)
}

// Hydrated is the number of hydrated regions (in core).
func (s *Store) Hydrated() uint64 {
	b := s.bitmap.Load()
	if b == nil {
		return s.nrRegions
	}
	return b.Count()
}

// Done reports whether every region is hydrated (in core).
func (s *Store) Done() bool { return s.Hydrated() == s.nrRegions }

// Released reports whether the in-core bitmap has been released because
// every region is hydrated and committed.
func (s *Store) Released() bool { return s.bitmap.Load() == nil }

// Changed reports whether the bitmap changed since the last commit started.
func (s *Store) Changed() bool { return s.changed.Load() }

// SetHydrated marks region r hydrated. The caller has made its data (or,
// for a discard, its undefined content) final on the destination.
func (s *Store) SetHydrated(r uint64) error {
	_, err := s.SetRange(r, 1)
	return err
}

// SetRange marks regions [r, r+n) hydrated and returns how many were not.
func (s *Store) SetRange(r, n uint64) (uint64, error) {
	if s.Mode() != ModeRW {
		return 0, ErrReadOnly
	}
	b := s.bitmap.Load()
	if b == nil || n == 0 {
		return 0, nil
	}
	changed := b.SetRange(r, n)
	if changed == 0 {
		return 0, nil
	}
	for c := r / ChunkRegions; c <= (r+n-1)/ChunkRegions; c++ {
		s.dirty[c/64].Or(1 << (c % 64))
	}
	s.changed.Store(true)
	return changed, nil
}

// Syncer is the destination as Commit sees it.
type Syncer interface{ Sync() error }

// Commit makes the bitmap durable: dirty chunks are snapshotted, dest is
// synced, then the chunks are written. The dirty chunks go in batches of
// at most Options.CommitBatchChunks chunks and about commitBatchBytes
// coded bytes, each snapshotted, synced and written in turn, so a commit that
// rewrites every chunk of a large bitmap holds one batch in memory, not
// all of them. It does nothing if nothing changed. On failure the store
// aborts the transaction (reloads the committed bitmap) and goes ro, or
// Fail if the reload fails; the error is returned. Batches written before
// the failure stay committed.
func (s *Store) Commit(dest Syncer) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if !s.changed.Load() {
		return nil
	}
	if s.Mode() != ModeRW {
		return ErrReadOnly
	}
	start := time.Now()
	s.changed.Store(false)
	bm := s.bitmap.Load()
	b := s.newCommitBatch()
	words := make([]uint64, chunkWords)
	batches := 0
	for w := range s.dirty {
		// The marks of this word are cleared before its chunks are read:
		// a bit set after the read marks its chunk again, for the next
		// commit.
		mask := s.dirty[w].Swap(0)
		for mask != 0 {
			bit := uint64(trailingZeros(mask))
			mask &= mask - 1
			c := uint64(w)*64 + bit
			n := s.chunkWordCount(c)
			bm.Words(c*chunkWords, words[:n])
			full := bm.AllSet(c*ChunkRegions, min(ChunkRegions, s.nrRegions-c*ChunkRegions))
			b.add(c, words[:n], full, !s.persisted[c])
			if b.full(s.batchChunks) {
				if err := s.commitBatchLocked(dest, b); err != nil {
					return err
				}
				batches++
			}
		}
	}
	// The last batch; also an empty one when nothing was written, so a
	// commit always syncs the destination.
	if len(b.entries) > 0 || batches == 0 {
		if err := s.commitBatchLocked(dest, b); err != nil {
			return err
		}
	}
	s.commits.Add(1)
	s.commitNanos.Add(int64(time.Since(start)))
	s.releaseIfDone()
	return nil
}

// commitBatchLocked writes one batch of a commit: the space check, the
// destination sync, then the chunks. Its chunks were read before the sync,
// so every bit it writes has its data durable on the destination
// (durability order); chunks stand alone and bits only go from 0 to 1, so
// a crash between two batches leaves a store that claims no more than
// the destination holds. On failure the commit is aborted (failedLocked).
// The batch is reset for the next one.
func (s *Store) commitBatchLocked(dest Syncer, b *commitBatch) error {
	if err := dest.Sync(); err != nil {
		return s.failedLocked("destination flush", err, true)
	}
	if err := s.kv.Put(b.entries); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			err = fmt.Errorf("%w: %w", ErrNoSpace, err)
		}
		return s.failedLocked("commit", err, false)
	}
	for _, c := range b.newChunks {
		s.persisted[c] = true
	}
	s.persistedCount.Add(uint64(len(b.newChunks)))
	s.chunksWritten.Add(uint64(len(b.entries)))
	b.reset()
	return nil
}

// Commit batch bounds (see Commit). At 10% of the regions hydrated at
// random a chunk codes to about 2 KiB: a batch is about 1 MiB, one journal
// write and one pass over its slots, and a commit rewriting the 8192
// chunks of a 1 TiB bitmap with 4 KiB regions takes 16 batches.
const (
	DefaultCommitBatchChunks = 512
	commitBatchBytes         = 1 << 20
	// maxChunkEntry is the most one chunk adds to a batch's buffer: its
	// key and a raw chunk.
	maxChunkEntry = len("bm/") + 8 + 1 + ChunkBytes
)

// commitBatch is one batch of a commit: the coded chunks and keys, in one
// buffer reused from batch to batch (KV.Put keeps nothing once it returns).
type commitBatch struct {
	entries   []Entry
	newChunks []uint64 // chunks not yet in the store
	buf       []byte   // the entries' keys and values
}

func (s *Store) newCommitBatch() *commitBatch {
	// Sized for the batch, or for the chunks dirty now when fewer: a
	// commit of a few chunks allocates a few KiB.
	dirty := 0
	for w := range s.dirty {
		dirty += onesCount(s.dirty[w].Load())
	}
	n := max(1, min(dirty, s.batchChunks))
	return &commitBatch{
		entries: make([]Entry, 0, n),
		buf:     make([]byte, 0, min(n*maxChunkEntry, commitBatchBytes+maxChunkEntry)),
	}
}

func (b *commitBatch) add(c uint64, words []uint64, full, isNew bool) {
	k := len(b.buf)
	b.buf = appendChunkKey(b.buf, c)
	v := len(b.buf)
	b.buf = appendChunk(b.buf, words, full)
	b.entries = append(b.entries, Entry{Key: b.buf[k:v:v], Value: b.buf[v:len(b.buf):len(b.buf)]})
	if isNew {
		b.newChunks = append(b.newChunks, c)
	}
}

// full reports whether the batch must be written before another chunk is
// added.
func (b *commitBatch) full(maxChunks int) bool {
	return len(b.entries) >= maxChunks || len(b.buf) >= commitBatchBytes
}

func (b *commitBatch) reset() {
	clear(b.entries) // drop the references into buf
	b.entries = b.entries[:0]
	b.newChunks = b.newChunks[:0]
	b.buf = b.buf[:0]
}

// DestinationFailed handles a destination flush that failed outside a
// commit (nothing to commit): as in a commit, the transaction is aborted,
// the committed bitmap reloaded and the store goes ro. The destination may
// have dropped acknowledged writes (the kernel reports a lost writeback
// once, then syncs succeed again), so nothing may claim durability from
// here on.
func (s *Store) DestinationFailed(cause error) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return s.failedLocked("destination flush", cause, true)
}

// releaseIfDone drops the in-core bitmap once every region is hydrated and
// nothing is left to commit: from then on every region reads as hydrated.
func (s *Store) releaseIfDone() {
	b := s.bitmap.Load()
	if b == nil || !b.Full() || s.changed.Load() {
		return
	}
	for w := range s.dirty {
		if s.dirty[w].Load() != 0 {
			return
		}
	}
	s.bitmap.Store(nil)
	s.log.Info("every region hydrated and committed: in-core bitmap released", "regions", s.nrRegions)
}

// failedLocked handles a failed commit: the transaction is aborted and the
// store goes ro (Fail if it cannot even be read). What happens to the bits
// of the aborted transaction depends on what failed:
//   - the destination flush (destFailed): as dm-clone, the committed bitmap
//     is reloaded, since the destination may not hold what those bits
//     promise; those regions read from the source again;
//   - the metadata write or the space check: the destination holds the
//     data, so the in-core bitmap is kept and reads still see every
//     acknowledged write (dm-clone reloads here too, and acknowledged
//     writes vanish from reads while the device runs). Nothing of it is
//     persisted: after a restart those regions read from the source, as
//     after any crash.
func (s *Store) failedLocked(op string, cause error, destFailed bool) error {
	s.commitErrors.Add(1)
	s.log.Error("metadata operation failed; aborting the transaction", "op", op, "err", cause)
	s.setMode(ModeRO)
	if destFailed {
		b, err := s.readBitmap()
		if err != nil {
			s.log.Error("failed to reload the on-disk bitmap", "err", err)
			s.setMode(ModeFail)
		} else {
			s.bitmap.Store(b)
		}
	} else if _, err := s.kv.Get(keySuperblock); err != nil {
		s.log.Error("metadata store unreadable", "err", err)
		s.setMode(ModeFail)
	}
	for w := range s.dirty {
		s.dirty[w].Store(0)
	}
	s.changed.Store(false)
	return fmt.Errorf("metadata: %s failed: %w", op, cause)
}

func (s *Store) setMode(m Mode) {
	for {
		old := Mode(s.mode.Load())
		if old == ModeFail || old >= m {
			return
		}
		if s.mode.CompareAndSwap(int32(old), int32(m)) {
			s.log.Warn("switching metadata mode", "from", old.String(), "to", m.String())
			return
		}
	}
}

// Blocks returns dm-clone's metadata block counts: used = persisted chunks
// + the superblock, total = chunks for the whole bitmap + the superblock.
func (s *Store) Blocks() (used, total uint64) {
	return s.persistedCount.Load() + 1, s.nrChunks + 1
}

// Stats returns a snapshot of the counters.
func (s *Store) Stats() Stats {
	return Stats{
		Commits:       s.commits.Load(),
		CommitErrors:  s.commitErrors.Load(),
		CommitNanos:   s.commitNanos.Load(),
		ChunksWritten: s.chunksWritten.Load(),
	}
}

// Close closes the store without committing. Idempotent.
func (s *Store) Close() error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if err := s.kv.Close(); err != nil {
		return fmt.Errorf("metadata: close: %w", err)
	}
	return nil
}

// SetSource records that the clone now reads its unhydrated regions from
// source (a redirect onto its parent's source): the superblock is
// rewritten in one synced transaction, the old source kept in
// PreviousSources. The pin is cleared: the next Open pins the new source.
// The caller has made every region where the two sources differ hydrated
// and committed.
func (s *Store) SetSource(source string) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.Mode() != ModeRW {
		return ErrReadOnly
	}
	if s.sb.Source == source && s.sb.SourceID == "" {
		return nil
	}
	sb := s.sb
	if sb.Source != source {
		sb.PreviousSources = append(append([]string(nil), sb.PreviousSources...), sb.Source)
	}
	// Pinned by a table built on the old source after a crash: unpinned
	// again, so the new source's identity is taken at the next open.
	sb.Source, sb.SourceID = source, ""
	b, _ := json.Marshal(sb)
	if err := s.kv.Put([]Entry{{Key: keySuperblock, Value: b}}); err != nil {
		return fmt.Errorf("metadata: recording the new source: %w", err)
	}
	s.sb = sb
	s.log.Info("source switched", "source", source, "previous", sb.PreviousSources)
	return nil
}
