package blockdev

// Extent is a run of a device with one allocation state.
type Extent struct {
	Length int64
	// Hole: the range is not allocated (reads as zeroes unless Zero says
	// otherwise for a device that cannot promise it).
	Hole bool
	// Zero: the range reads as zeroes.
	Zero bool
}

// Mapper is implemented by devices that can tell allocated ranges from
// holes: SEEK_DATA/SEEK_HOLE on files, BLOCK_STATUS base:allocation on an
// NBD source. Callers type-assert for it; a device without it is all data.
type Mapper interface {
	// Map describes [off, off+n) as consecutive extents starting at off.
	// It may describe less than n bytes (at least one extent), never more.
	Map(off, n int64) ([]Extent, error)
}
