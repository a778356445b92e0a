package metadata

// KV is the small key-value surface the store needs. The file store
// (filekv.go) is the only production one; tests wrap it to inject faults.
type KV interface {
	// Get returns the value of key, or (nil, nil) if absent.
	Get(key []byte) ([]byte, error)
	// Scan calls fn for every key with the prefix, in key order.
	Scan(prefix []byte, fn func(key, value []byte) error) error
	// Put writes all entries durably (synced) before returning; across a
	// crash it is all or none (a failed Put's entries may be completed at
	// the next open). Put keeps no reference to the entries once it
	// returns (a commit reuses their buffer for its next batch).
	Put(entries []Entry) error
	Close() error
}

// Entry is one key-value pair to write.
type Entry struct {
	Key, Value []byte
}
