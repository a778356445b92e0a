package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

const stateExt = ".json"

// stateRecord is one device's state file: enough to rebuild its live table.
type stateRecord struct {
	Name string `json:"name"`
	// Table is the canonical table line (target.Table.String) with its
	// relative paths resolved against Dir (target.Resolve).
	Table string `json:"table"`
	// Dir resolves the table's relative paths: the CLI's working directory.
	Dir     string    `json:"dir"`
	Created time.Time `json:"created"`
}

// stateDir persists stateRecords, one file per device (invariant 5).
type stateDir struct {
	dir string
}

func (s stateDir) path(name string) string { return filepath.Join(s.dir, name+stateExt) }

func (s stateDir) ensure() error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("%w: state directory: %w", ErrInternal, err)
	}
	return nil
}

// save writes rec atomically: a temp file, fsync, rename, fsync of the
// directory, so a crash leaves the old record or the new one.
func (s stateDir) save(rec stateRecord) (err error) {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("%w: state of %s: %w", ErrInternal, rec.Name, err)
	}
	data = append(data, '\n')
	f, err := os.CreateTemp(s.dir, "."+rec.Name+stateExt+".tmp-*")
	if err != nil {
		return fmt.Errorf("%w: state of %s: %w", ErrInternal, rec.Name, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
			err = fmt.Errorf("%w: state of %s: %w", ErrInternal, rec.Name, err)
		}
	}()
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, s.path(rec.Name)); err != nil {
		return err
	}
	return s.syncDir()
}

func (s stateDir) remove(name string) error {
	if err := os.Remove(s.path(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: state of %s: %w", ErrInternal, name, err)
	}
	if err := s.syncDir(); err != nil {
		return fmt.Errorf("%w: state of %s: %w", ErrInternal, name, err)
	}
	return nil
}

func (s stateDir) syncDir() error {
	d, err := os.Open(s.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// stateEntry is one state file as found at start: a record, or why it
// could not be read.
type stateEntry struct {
	name string
	rec  stateRecord
	err  error
}

// list reads every state file, sorted by name. Temp files of an
// interrupted save are removed.
func (s stateDir) list() ([]stateEntry, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("%w: state directory: %w", ErrInternal, err)
	}
	var out []stateEntry
	for _, e := range ents {
		fn := e.Name()
		// A temp file's random suffix is digits, so it never ends in .json.
		if !strings.HasSuffix(fn, stateExt) && strings.HasPrefix(fn, ".") && strings.Contains(fn, stateExt+".tmp-") {
			os.Remove(filepath.Join(s.dir, fn))
			continue
		}
		if !e.Type().IsRegular() || !strings.HasSuffix(fn, stateExt) {
			continue
		}
		name := strings.TrimSuffix(fn, stateExt)
		if validName(name) != nil {
			continue
		}
		ent := stateEntry{name: name}
		data, err := os.ReadFile(filepath.Join(s.dir, fn))
		switch {
		case err != nil:
			ent.err = err
		default:
			if err := json.Unmarshal(data, &ent.rec); err != nil {
				ent.err = fmt.Errorf("state file %s: %w", fn, err)
			} else if ent.rec.Name != name {
				ent.err = fmt.Errorf("state file %s names device %q", fn, ent.rec.Name)
			}
		}
		out = append(out, ent)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out, nil
}
