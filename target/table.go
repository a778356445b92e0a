package target

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// SectorSize is the unit of every table length and offset, as in device-mapper.
const SectorSize = 512

// ErrTable is wrapped by every table-line syntax error.
var ErrTable = errors.New("target: invalid table")

// Table is one parsed table line: "<start> <length> <type> <args...>".
type Table struct {
	Start  uint64 // sectors; always 0 (one target per device)
	Length uint64 // sectors
	Type   string
	Args   []string
}

// ParseTable parses one table line. nbdclone devices have exactly one
// target, starting at sector 0.
func ParseTable(line string) (Table, error) {
	lines := strings.FieldsFunc(strings.TrimSpace(line), func(r rune) bool { return r == '\n' || r == ';' })
	if len(lines) == 0 {
		return Table{}, fmt.Errorf("%w: empty table", ErrTable)
	}
	if len(lines) > 1 {
		return Table{}, fmt.Errorf("%w: one target line per device (got %d)", ErrTable, len(lines))
	}
	f := strings.Fields(lines[0])
	if len(f) < 3 {
		return Table{}, fmt.Errorf("%w: want \"<start> <length> <type> <args...>\"", ErrTable)
	}
	start, err := strconv.ParseUint(f[0], 10, 64)
	if err != nil {
		return Table{}, fmt.Errorf("%w: bad start sector %q", ErrTable, f[0])
	}
	if start != 0 {
		return Table{}, fmt.Errorf("%w: the target must start at sector 0", ErrTable)
	}
	length, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil || length == 0 {
		return Table{}, fmt.Errorf("%w: bad length %q (sectors, > 0)", ErrTable, f[1])
	}
	if length > (1<<63-1)/SectorSize {
		return Table{}, fmt.Errorf("%w: length %d sectors is too large", ErrTable, length)
	}
	return Table{Start: start, Length: length, Type: f[2], Args: f[3:]}, nil
}

// String is the canonical form of the line.
func (t Table) String() string {
	s := fmt.Sprintf("%d %d %s", t.Start, t.Length, t.Type)
	if len(t.Args) > 0 {
		s += " " + strings.Join(t.Args, " ")
	}
	return s
}

// Bytes is the target length in bytes.
func (t Table) Bytes() int64 { return int64(t.Length) * SectorSize }
