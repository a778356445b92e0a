package faultdev

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"

	"github.com/nbdclone/nbdclone/blockdev"
	"github.com/nbdclone/nbdclone/metadata"
)

// ErrCrashed is returned by every operation after a crash.
var ErrCrashed = fmt.Errorf("faultdev: crashed: %w", syscall.EIO)

// ErrInjected is the default injected error.
var ErrInjected = fmt.Errorf("faultdev: injected fault: %w", syscall.EIO)

// Op names an operation for a Plan.
type Op string

const (
	OpRead        Op = "read"
	OpWrite       Op = "write"
	OpSync        Op = "sync"
	OpDiscard     Op = "discard"
	OpWriteZeroes Op = "writezeroes"
	OpPut         Op = "put" // a metadata commit's write
)

// Plan decides which operations fail. It is shared by every wrapper of one
// test run, so "the Nth I/O" counts across the destination and metadata.
type Plan struct {
	mu sync.Mutex
	// Guarded by mu:
	n       int
	crashAt int // the operation index that crashes; -1: never
	crashed bool
	onCrash []func()
	// Fail, if set, is asked about every operation (after the crash check);
	// a non-nil error fails it.
	fail func(op Op, off, n int64) error
}

// NewPlan returns a plan that crashes at operation crashAt (0-based), or
// never if crashAt < 0.
func NewPlan(crashAt int) *Plan { return &Plan{crashAt: crashAt} }

// SetFail installs a fault function (nil removes it).
func (p *Plan) SetFail(f func(op Op, off, n int64) error) {
	p.mu.Lock()
	p.fail = f
	p.mu.Unlock()
}

// Ops is the number of operations seen so far.
func (p *Plan) Ops() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// Crashed reports whether the crash happened.
func (p *Plan) Crashed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.crashed
}

// Crash crashes now.
func (p *Plan) Crash() {
	p.mu.Lock()
	if p.crashed {
		p.mu.Unlock()
		return
	}
	p.crashed = true
	hooks := p.onCrash
	p.mu.Unlock()
	for _, h := range hooks {
		h()
	}
}

// check is called before each operation: it returns the error the
// operation must fail with, or nil to let it happen.
func (p *Plan) check(op Op, off, n int64) error {
	p.mu.Lock()
	i := p.n
	p.n++
	if !p.crashed && p.crashAt >= 0 && i >= p.crashAt {
		p.crashed = true
		hooks := p.onCrash
		p.mu.Unlock()
		for _, h := range hooks {
			h()
		}
		return ErrCrashed
	}
	crashed, fail := p.crashed, p.fail
	p.mu.Unlock()
	if crashed {
		return ErrCrashed
	}
	if fail != nil {
		return fail(op, off, n)
	}
	return nil
}

// Device wraps a read-write device: operations go through the plan, and the
// durable image (what survives a crash) is tracked in memory.
type Device struct {
	blockdev.Device
	plan *Plan

	mu sync.Mutex
	// Guarded by mu:
	durable []byte     // the device's content as of the last Sync
	pending []writeRec // writes since the last Sync, in order
}

type writeRec struct {
	off  int64
	data []byte
}

// Wrap wraps dev (whose current content is durable) with plan.
func Wrap(dev blockdev.Device, plan *Plan) (*Device, error) {
	d := &Device{Device: dev, plan: plan, durable: make([]byte, dev.Size())}
	if _, err := dev.ReadAt(d.durable, 0); err != nil {
		return nil, fmt.Errorf("faultdev: reading initial content: %w", err)
	}
	return d, nil
}

func (d *Device) ReadAt(p []byte, off int64) (int, error) {
	if err := d.plan.check(OpRead, off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.Device.ReadAt(p, off)
}

func (d *Device) WriteAt(p []byte, off int64) (int, error) {
	if err := d.plan.check(OpWrite, off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := d.Device.WriteAt(p, off)
	if n > 0 {
		d.record(off, append([]byte(nil), p[:n]...))
	}
	return n, err
}

func (d *Device) record(off int64, data []byte) {
	d.mu.Lock()
	d.pending = append(d.pending, writeRec{off, data})
	d.mu.Unlock()
}

func (d *Device) Sync() error {
	if err := d.plan.check(OpSync, 0, 0); err != nil {
		return err
	}
	// Writes completed before Sync was called are made durable; the
	// pending list is captured first so a write racing with Sync stays
	// pending (it may or may not be durable: we say not).
	d.mu.Lock()
	captured := len(d.pending)
	d.mu.Unlock()
	if err := d.Device.Sync(); err != nil {
		return err
	}
	d.mu.Lock()
	for _, w := range d.pending[:captured] {
		copy(d.durable[w.off:], w.data)
	}
	d.pending = append(d.pending[:0:0], d.pending[captured:]...)
	d.mu.Unlock()
	return nil
}

func (d *Device) Discard(off, n int64) error {
	if err := d.plan.check(OpDiscard, off, n); err != nil {
		return err
	}
	if err := d.Device.Discard(off, n); err != nil {
		return err
	}
	d.record(off, make([]byte, n)) // a punched file range reads as zeroes
	return nil
}

func (d *Device) WriteZeroes(off, n int64) error {
	if err := d.plan.check(OpWriteZeroes, off, n); err != nil {
		return err
	}
	if err := d.Device.WriteZeroes(off, n); err != nil {
		return err
	}
	d.record(off, make([]byte, n))
	return nil
}

// CrashImage returns what a power failure at the crash would leave: the
// durable image plus, when rng is non-nil, a random subset of the writes
// pending at the crash (each whole or not at all, in order), since a device
// may persist any of them.
func (d *Device) CrashImage(rng *rand.Rand) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	img := append([]byte(nil), d.durable...)
	if rng != nil {
		for _, w := range d.pending {
			if rng.IntN(2) == 0 {
				copy(img[w.off:], w.data)
			}
		}
	}
	return img
}

// Source wraps a read-only source with a plan (read faults only).
type Source struct {
	blockdev.Reader
	plan *Plan
}

// WrapSource wraps a source.
func WrapSource(r blockdev.Reader, plan *Plan) *Source { return &Source{Reader: r, plan: plan} }

func (s *Source) ReadAt(p []byte, off int64) (int, error) {
	if err := s.plan.check(OpRead, off, int64(len(p))); err != nil {
		return 0, err
	}
	return s.Reader.ReadAt(p, off)
}

// KV wraps a metadata store: each Put goes through the plan. A Put that
// fails writes nothing (badger's Put of several entries is several synced
// transactions; a crash part-way is modelled by failing before any).
type KV struct {
	metadata.KV
	plan *Plan
}

// WrapKV returns a metadata.Options.WrapKV function using plan.
func WrapKV(plan *Plan) func(metadata.KV) metadata.KV {
	return func(kv metadata.KV) metadata.KV { return &KV{KV: kv, plan: plan} }
}

func (k *KV) Put(entries []metadata.Entry) error {
	if err := k.plan.check(OpPut, 0, int64(len(entries))); err != nil {
		return err
	}
	return k.KV.Put(entries)
}

// IsInjected reports whether err comes from this package.
func IsInjected(err error) bool {
	return errors.Is(err, ErrCrashed) || errors.Is(err, ErrInjected)
}
