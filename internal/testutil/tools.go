package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// InCI reports whether tests run under CI (CI=true), where anything a test
// needs and lacks is a failure, not a skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable fails the test under CI and skips it elsewhere.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("required under CI=true: "+format, args...)
	}
	t.Skipf("unavailable: "+format, args...)
}

// NeedTool returns the path of an executable, or fails (CI) / skips.
func NeedTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Unavailable(t, "%s not found in PATH (run scripts/install-deps.sh)", name)
	}
	return p
}

// NeedRoot fails (CI) / skips when not running as root.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "root privileges")
	}
}

// ShortDir returns a short temporary directory: unix socket paths are
// limited to 108 bytes, and t.TempDir paths can be longer.
func ShortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "nbdc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Sock returns a socket path in a short directory.
func Sock(t testing.TB, name string) string {
	t.Helper()
	return filepath.Join(ShortDir(t), name)
}
