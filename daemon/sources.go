package daemon

import (
	"context"
	"path/filepath"
	"strings"
	"sync"

	"github.com/nbdclone/nbdclone/blockdev"
)

// sourcePool shares clone sources: every clone whose table names the same
// path or URI reads through one reader and one bounded cache of recently
// read blocks (--source-cache), so N clones of one golden image read each
// block from it once while it stays cached. The reader is opened by the
// first clone and closed when the last one closes it.
type sourcePool struct {
	open     func(ctx context.Context, spec string) (blockdev.Reader, error)
	capacity int64 // cache bytes per source; 0 shares without caching

	mu sync.Mutex
	// Guarded by mu.
	shared map[string]*pooledSource
}

type pooledSource struct {
	src  *blockdev.SharedSource
	refs int
}

func newSourcePool(open func(ctx context.Context, spec string) (blockdev.Reader, error), capacity int64) *sourcePool {
	return &sourcePool{open: open, capacity: capacity, shared: map[string]*pooledSource{}}
}

// key names a source: a URI as written, a path cleaned.
func sourceKey(spec string) string {
	if strings.Contains(spec, "://") {
		return spec
	}
	return filepath.Clean(spec)
}

// get returns a handle on spec's shared reader, opening it if no clone
// holds it. Closing the handle gives the share back.
func (p *sourcePool) get(ctx context.Context, spec string) (blockdev.Reader, error) {
	key := sourceKey(spec)
	p.mu.Lock()
	if ps := p.shared[key]; ps != nil {
		ps.refs++
		p.mu.Unlock()
		return ps.src.Handle(func() { p.put(key, ps) }), nil
	}
	p.mu.Unlock()
	// Opened without the lock: a remote source dials and retries.
	r, err := p.open(ctx, spec)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	ps := p.shared[key]
	if ps == nil {
		ps = &pooledSource{src: blockdev.NewSharedSource(r, p.capacity)}
		p.shared[key] = ps
		r = nil
	}
	ps.refs++
	p.mu.Unlock()
	if r != nil {
		r.Close() // another clone opened it meanwhile
	}
	return ps.src.Handle(func() { p.put(key, ps) }), nil
}

func (p *sourcePool) put(key string, ps *pooledSource) {
	p.mu.Lock()
	ps.refs--
	last := ps.refs == 0
	if last && p.shared[key] == ps {
		delete(p.shared, key)
	}
	p.mu.Unlock()
	if last {
		ps.src.Close()
	}
}
