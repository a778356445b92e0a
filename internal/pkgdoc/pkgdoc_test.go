package pkgdoc

import (
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestEveryPackageHasDocGo(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", "{{.Dir}}", "github.com/nbdclone/nbdclone/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dirs := strings.Fields(string(out))
	if len(dirs) < 8 {
		t.Fatalf("go list found only %d packages", len(dirs))
	}
	for _, dir := range dirs {
		path := filepath.Join(dir, "doc.go")
		if _, err := os.Stat(path); err != nil {
			t.Errorf("%s has no doc.go", dir)
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ParseComments|parser.PackageClauseOnly)
		if err != nil {
			t.Errorf("%s: %v", path, err)
			continue
		}
		if f.Doc == nil || len(strings.TrimSpace(f.Doc.Text())) < 20 {
			t.Errorf("%s has no package comment stating the package's job", path)
		}
	}
}
