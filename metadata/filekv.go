package metadata

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// The store's files, inside its directory. metaName holds the superblock
// and one fixed slot per bitmap chunk; journalName the last Put, written
// and synced before any slot it changes.
const (
	metaName    = "nbdclone.meta"
	journalName = "nbdclone.journal"
)

// Layout of metaName. The superblock slot comes first; chunk c's slot is
// at slotBase + c×slotBytes. A slot is a 16-byte header (magic, value
// length, CRC-32C over the key and the value, zero) and the value. A chunk
// value is at most 4097 bytes (a tag and a raw chunk), so a slot spans one
// 4 KiB block when its chunk codes small and two when it is raw; a slot
// never written is a hole and costs no space.
const (
	sbSlotBytes    = 64 << 10
	slotBase       = sbSlotBytes
	slotBytes      = 8 << 10
	slotHeaderSize = 16
	slotMagic      = 0x4b43424e // "NBCK"
	sbMagic        = 0x4253424e // "NBSB"
	journalMagic   = 0x4c4a424e // "NBJL"
	// journalHeaderSize: magic, entry count, record bytes (u64), CRC, zero.
	journalHeaderSize = 24
	// recordHeaderSize: key length (u16), value length (u32).
	recordHeaderSize = 6
	// scanBytes is what Scan reads at a time.
	scanBytes = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// fileKV is the store on disk: a superblock slot and one fixed slot per
// bitmap chunk in one file, overwritten in place, and a journal that makes
// every Put atomic. Put writes its entries to the journal and syncs it,
// then writes them to their slots and syncs those; Open replays a journal
// whose checksum holds (idempotent: it always holds the last Put), so a
// slot torn by a crash is rewritten whole. Overwriting a slot needs no new
// space on an overwrite-in-place filesystem; a new chunk needs its block.
// Nothing is mapped: a full filesystem is an error from a write, never a
// signal.
//
// Keys are the store's own: keySuperblock and chunkKey(c); Put refuses
// any other.
type fileKV struct {
	mu      sync.Mutex
	meta    *os.File
	journal *os.File
	buf     []byte // the journal image of a Put, reused
}

// openFileKV opens (creating if needed) the files in dir, takes the
// store's lock (flock on the meta file) and replays the journal.
func openFileKV(dir string) (*fileKV, error) {
	meta, err := os.OpenFile(filepath.Join(dir, metaName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(meta.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		meta.Close()
		return nil, fmt.Errorf("locking %s: %w", meta.Name(), err)
	}
	journal, err := os.OpenFile(filepath.Join(dir, journalName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		meta.Close()
		return nil, err
	}
	kv := &fileKV{meta: meta, journal: journal}
	if err := kv.replay(); err != nil {
		kv.Close()
		return nil, err
	}
	// The files' names must survive a crash as well as their content.
	if err := syncDir(dir); err != nil {
		kv.Close()
		return nil, err
	}
	return kv, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}

// slotOffset is where key's slot starts and how much of it a value may
// use.
func slotOffset(key []byte) (off, room int64, err error) {
	if bytes.Equal(key, keySuperblock) {
		return 0, sbSlotBytes - slotHeaderSize, nil
	}
	if len(key) == len(prefixBitmap)+8 && bytes.HasPrefix(key, prefixBitmap) {
		c := binary.BigEndian.Uint64(key[len(prefixBitmap):])
		if c >= (1<<62-slotBase)/slotBytes {
			return 0, 0, fmt.Errorf("chunk %d beyond any file", c)
		}
		return slotBase + int64(c)*slotBytes, slotBytes - slotHeaderSize, nil
	}
	return 0, 0, fmt.Errorf("no slot for key %q", key)
}

func slotMagicFor(off int64) uint32 {
	if off == 0 {
		return sbMagic
	}
	return slotMagic
}

func slotCRC(key, value []byte) uint32 {
	return crc32.Update(crc32.Checksum(key, castagnoli), castagnoli, value)
}

// Get reads key's slot from disk: (nil, nil) when it was never written.
func (kv *fileKV) Get(key []byte) ([]byte, error) {
	off, room, err := slotOffset(key)
	if err != nil {
		return nil, err
	}
	kv.mu.Lock()
	defer kv.mu.Unlock()
	return kv.getLocked(key, off, room)
}

func (kv *fileKV) getLocked(key []byte, off, room int64) ([]byte, error) {
	var h [slotHeaderSize]byte
	if _, err := kv.meta.ReadAt(h[:], off); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, fmt.Errorf("reading %s at %d: %w", kv.meta.Name(), off, err)
	}
	n := int64(binary.LittleEndian.Uint32(h[4:]))
	if n > room {
		return nil, fmt.Errorf("%w: slot of %q claims %d bytes", ErrCorrupt, key, n)
	}
	v := make([]byte, n)
	if _, err := kv.meta.ReadAt(v, off+slotHeaderSize); err != nil {
		return nil, fmt.Errorf("reading %s at %d: %w", kv.meta.Name(), off, err)
	}
	return decodeSlot(key, h[:], v, off)
}

// decodeSlot checks a slot: its value, nil for a slot never written, or
// ErrCorrupt.
func decodeSlot(key, h, v []byte, off int64) ([]byte, error) {
	magic := binary.LittleEndian.Uint32(h)
	if magic == 0 && binary.LittleEndian.Uint32(h[4:]) == 0 && binary.LittleEndian.Uint32(h[8:]) == 0 {
		return nil, nil
	}
	if magic != slotMagicFor(off) || binary.LittleEndian.Uint32(h[8:]) != slotCRC(key, v) {
		return nil, fmt.Errorf("%w: bad checksum in the slot of %q", ErrCorrupt, key)
	}
	return v, nil
}

// Scan calls fn for the present keys with the prefix in key order: the
// chunks ("bm/…"), then the superblock ("sb"). Holes (chunks never
// written) are skipped with SEEK_DATA.
func (kv *fileKV) Scan(prefix []byte, fn func(key, value []byte) error) error {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	if bytes.HasPrefix(prefixBitmap, prefix) || bytes.HasPrefix(prefix, prefixBitmap) {
		if err := kv.scanChunks(prefix, fn); err != nil {
			return err
		}
	}
	if bytes.HasPrefix(keySuperblock, prefix) {
		v, err := kv.getLocked(keySuperblock, 0, sbSlotBytes-slotHeaderSize)
		if err != nil {
			return err
		}
		if v != nil {
			return fn(keySuperblock, v)
		}
	}
	return nil
}

func (kv *fileKV) scanChunks(prefix []byte, fn func(key, value []byte) error) error {
	fi, err := kv.meta.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	fd := int(kv.meta.Fd())
	buf := make([]byte, scanBytes)
	key := make([]byte, 0, len(prefixBitmap)+8)
	for off := int64(slotBase); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		switch {
		case errors.Is(err, syscall.ENXIO):
			return nil
		case errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EOPNOTSUPP):
			data = off // no SEEK_DATA here: read everything
		case err != nil:
			return fmt.Errorf("seeking data in %s: %w", kv.meta.Name(), err)
		}
		// From the slot that holds the first data byte, whole slots.
		off = slotBase + (data-slotBase)/slotBytes*slotBytes
		n, err := kv.meta.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("reading %s at %d: %w", kv.meta.Name(), off, err)
		}
		if n == 0 {
			return nil
		}
		// A short read at the end of the file ends in a slot whose tail
		// was never written: zeroes.
		clear(buf[n:])
		end := min(int64(len(buf)), size-off+slotBytes-1) / slotBytes * slotBytes
		for i := int64(0); i < end; i += slotBytes {
			c := uint64(off-slotBase+i) / slotBytes
			key = appendChunkKey(key[:0], c)
			if !bytes.HasPrefix(key, prefix) {
				continue
			}
			slot := buf[i : i+slotBytes]
			vlen := int64(binary.LittleEndian.Uint32(slot[4:]))
			if vlen > slotBytes-slotHeaderSize {
				return fmt.Errorf("%w: slot of chunk %d claims %d bytes", ErrCorrupt, c, vlen)
			}
			v, err := decodeSlot(key, slot[:slotHeaderSize], slot[slotHeaderSize:slotHeaderSize+vlen], off+i)
			if err != nil {
				return err
			}
			if v == nil {
				continue
			}
			if err := fn(key, v); err != nil {
				return err
			}
		}
		off += end
	}
	return nil
}

// Put writes the entries atomically: the journal first (synced), then the
// slots (synced). When it returns nil every entry is durable; when it
// fails, either none is (the journal write failed) or the journal holds
// them all and the next open completes them.
func (kv *fileKV) Put(entries []Entry) error {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	size := journalHeaderSize
	for _, e := range entries {
		_, room, err := slotOffset(e.Key)
		if err != nil {
			return err
		}
		if int64(len(e.Value)) > room {
			return fmt.Errorf("a value of %d bytes for %q does not fit its slot (%d bytes)", len(e.Value), e.Key, room)
		}
		size += recordHeaderSize + len(e.Key) + len(e.Value)
	}
	if cap(kv.buf) < size {
		kv.buf = make([]byte, 0, size)
	}
	b := kv.buf[:journalHeaderSize]
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(e.Key)))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(e.Value)))
		b = append(append(b, e.Key...), e.Value...)
	}
	binary.LittleEndian.PutUint32(b[0:], journalMagic)
	binary.LittleEndian.PutUint32(b[4:], uint32(len(entries)))
	binary.LittleEndian.PutUint64(b[8:], uint64(len(b)-journalHeaderSize))
	clear(b[20:journalHeaderSize])
	binary.LittleEndian.PutUint32(b[16:], journalCRC(b))
	if _, err := kv.journal.WriteAt(b, 0); err != nil {
		return fmt.Errorf("writing the journal: %w", err)
	}
	if err := unix.Fdatasync(int(kv.journal.Fd())); err != nil {
		return fmt.Errorf("syncing the journal: %w", err)
	}
	return kv.applyLocked(entries)
}

// journalCRC is the CRC-32C of a journal image (header and records) with
// the header's CRC field (bytes 16–19) taken as zero: what Put stores
// there and replay checks.
func journalCRC(b []byte) uint32 {
	var zero [4]byte
	c := crc32.Update(0, castagnoli, b[:16])
	c = crc32.Update(c, castagnoli, zero[:])
	return crc32.Update(c, castagnoli, b[20:])
}

// applyLocked writes entries to their slots and syncs the file.
func (kv *fileKV) applyLocked(entries []Entry) error {
	var h [slotHeaderSize]byte
	for _, e := range entries {
		off, _, err := slotOffset(e.Key)
		if err != nil {
			return err
		}
		binary.LittleEndian.PutUint32(h[0:], slotMagicFor(off))
		binary.LittleEndian.PutUint32(h[4:], uint32(len(e.Value)))
		binary.LittleEndian.PutUint32(h[8:], slotCRC(e.Key, e.Value))
		if _, err := unix.Pwritev(int(kv.meta.Fd()), [][]byte{h[:], e.Value}, off); err != nil {
			return fmt.Errorf("writing %s at %d: %w", kv.meta.Name(), off, err)
		}
	}
	if err := unix.Fdatasync(int(kv.meta.Fd())); err != nil {
		return fmt.Errorf("syncing %s: %w", kv.meta.Name(), err)
	}
	return nil
}

// replay applies the journal if it holds a whole Put. It is always the
// last one (every Put writes it before any slot), so applying it again
// changes nothing that a later write made.
func (kv *fileKV) replay() error {
	fi, err := kv.journal.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < journalHeaderSize {
		return nil
	}
	var h [journalHeaderSize]byte
	if _, err := kv.journal.ReadAt(h[:], 0); err != nil {
		return fmt.Errorf("reading the journal: %w", err)
	}
	n := binary.LittleEndian.Uint64(h[8:])
	if binary.LittleEndian.Uint32(h[0:]) != journalMagic || n > uint64(fi.Size()-journalHeaderSize) {
		return nil // a torn or empty journal: its Put never returned
	}
	b := make([]byte, journalHeaderSize+n)
	if _, err := kv.journal.ReadAt(b, 0); err != nil {
		return fmt.Errorf("reading the journal: %w", err)
	}
	if journalCRC(b) != binary.LittleEndian.Uint32(b[16:]) {
		return nil
	}
	count := binary.LittleEndian.Uint32(b[4:])
	entries := make([]Entry, 0, count)
	r := b[journalHeaderSize:]
	for range count {
		if len(r) < recordHeaderSize {
			return fmt.Errorf("%w: journal record truncated", ErrCorrupt)
		}
		kl, vl := int(binary.LittleEndian.Uint16(r)), int(binary.LittleEndian.Uint32(r[2:]))
		r = r[recordHeaderSize:]
		if len(r) < kl+vl {
			return fmt.Errorf("%w: journal record truncated", ErrCorrupt)
		}
		e := Entry{Key: r[:kl], Value: r[kl : kl+vl]}
		if _, room, err := slotOffset(e.Key); err != nil || int64(vl) > room {
			return fmt.Errorf("%w: journal record for %q of %d bytes", ErrCorrupt, e.Key, vl)
		}
		entries = append(entries, e)
		r = r[kl+vl:]
	}
	return kv.applyLocked(entries)
}

// Close releases the files and the lock.
func (kv *fileKV) Close() error {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	err := kv.journal.Close()
	if err2 := kv.meta.Close(); err == nil {
		err = err2
	}
	return err
}
