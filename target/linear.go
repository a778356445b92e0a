package target

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/nbdclone/nbdclone/blockdev"
)

// linear maps the target one-to-one onto a device at an offset: what a clone
// becomes once it is hydrated (dm-linear).
type linear struct {
	table  Table
	dev    blockdev.Device
	path   string
	offset int64 // bytes
	size   int64

	closeOnce sync.Once
	closeErr  error
}

func newLinear(t Table, env Env) (Target, error) {
	if len(t.Args) != 2 {
		return nil, dmErr("Invalid argument count", nil)
	}
	sector, err := strconv.ParseUint(t.Args[1], 10, 64)
	if err != nil || sector > (1<<63-1)/SectorSize {
		return nil, dmErr("Invalid device sector", nil)
	}
	path := env.Path(t.Args[0])
	dev, err := env.openDevice(path)
	if err != nil {
		return nil, dmErr("Device lookup failed", err)
	}
	l := &linear{table: t, dev: dev, path: path, offset: int64(sector) * SectorSize, size: t.Bytes()}
	if end := l.offset + l.size; end < l.offset || end > dev.Size() {
		dev.Close()
		return nil, dmErr(fmt.Sprintf("Device %s too small for target: start=%d, len=%d, dev_size=%d",
			path, sector, t.Length, dev.Size()/SectorSize), nil)
	}
	return l, nil
}

func (l *linear) Size() int64 { return l.size }

func (l *linear) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > l.size {
		return ErrRange
	}
	return nil
}

func (l *linear) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := l.check(off, int64(len(p))); err != nil {
		return err
	}
	_, err := l.dev.ReadAt(p, l.offset+off)
	return err
}

func (l *linear) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	if err := l.check(off, int64(len(p))); err != nil {
		return err
	}
	if _, err := l.dev.WriteAt(p, l.offset+off); err != nil {
		return err
	}
	if fua {
		return l.dev.Sync()
	}
	return nil
}

func (l *linear) WriteZeroes(_ context.Context, off, n int64, fua bool) error {
	if err := l.check(off, n); err != nil {
		return err
	}
	if err := l.dev.WriteZeroes(l.offset+off, n); err != nil {
		return err
	}
	if fua {
		return l.dev.Sync()
	}
	return nil
}

func (l *linear) Trim(_ context.Context, off, n int64) error {
	if err := l.check(off, n); err != nil {
		return err
	}
	err := l.dev.Discard(l.offset+off, n)
	if errors.Is(err, blockdev.ErrNotSupported) {
		// A discard is advisory: a device that can't is still correct.
		return nil
	}
	return err
}

func (l *linear) Flush(context.Context) error { return l.dev.Sync() }

// Cache has nothing to do: the data is already local.
func (l *linear) Cache(_ context.Context, off, n int64) error { return l.check(off, n) }

// Status: dm-linear prints nothing for INFO.
func (l *linear) Status() string { return "" }

// Table is dm-linear's: the device and the offset as a number.
func (l *linear) Table() string {
	return l.table.Args[0] + " " + strconv.FormatInt(l.offset/SectorSize, 10)
}

func (l *linear) Message(context.Context, []string) error {
	return dmErr("Unsupported message", nil)
}

func (l *linear) Info() Info { return Info{Type: "linear", Size: l.size} }

func (l *linear) Suspend(context.Context) error { return nil }
func (l *linear) Resume() error                 { return nil }

// Events never fire for a linear target.
func (l *linear) Events() <-chan struct{} { return nil }

func (l *linear) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.dev.Close() })
	return l.closeErr
}
