package e2e

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/testutil"
)

// vmSteps are the guest's steps (scripts/vm/guest.sh), each of which must
// print "VMTEST <step> ok".
var vmSteps = []string{
	"modules", "serve", "source-image", "create", "attach", "attach-busy", "mount", "write", "fstrim",
	"kill-restart", "hydrate-auto-linear", "swap-under-reader", "refuse-linear", "detach-busy",
	"umount-fsck", "detach", "no-module", "stop",
}

// TestVM boots Debian's kernel under qemu (TCG) with a busybox initramfs
// and runs the user's flow on a real /dev/nbd0 (scripts/vm): attach, mount,
// fstrim, a daemon crash under a writer, hydration with auto_linear, live
// swaps under a reader, detach, e2fsck. The host kernel has no nbd driver,
// so this is the only test of the kernel path.
func TestVM(t *testing.T) {
	testutil.NeedTool(t, "qemu-system-x86_64")
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Dir(filepath.Dir(file))
	log := filepath.Join(t.TempDir(), "guest.log")
	// The guest has 8 minutes; the build and the first download of the
	// kernel package take well under one.
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(root, "scripts", "vm", "run.sh"), log)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "GO="+filepath.Join(runtime.GOROOT(), "bin", "go"), "VM_TIMEOUT=480")
	cmd.WaitDelay = 10 * time.Second
	start := time.Now()
	out, err := cmd.CombinedOutput()
	t.Logf("scripts/vm/run.sh (%v):\n%s", time.Since(start).Round(time.Second), out)
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Fatalf("the VM test did not finish in 9 minutes")
	case errors.As(err, &ee) && ee.ExitCode() == 3:
		testutil.Unavailable(t, "the VM test's tools or kernel package: %s", strings.TrimSpace(string(out)))
	case err != nil:
		t.Fatalf("scripts/vm/run.sh: %v", err)
	}
	// run.sh checked the steps; check them again here, so this test fails
	// on its own if the script's check were ever loosened.
	guest, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	lines := regexp.MustCompile(`VMTEST [^\r\n]*`).FindAllString(string(guest), -1)
	for _, s := range vmSteps {
		found := false
		for _, l := range lines {
			if strings.HasPrefix(l, "VMTEST "+s+" ok") {
				found = true
			}
			if strings.HasPrefix(l, "VMTEST "+s+" FAIL") {
				t.Errorf("%s", l)
			}
		}
		if !found {
			t.Errorf("step %s did not pass", s)
		}
	}
	if len(lines) == 0 || lines[len(lines)-1] != "VMTEST end" {
		t.Errorf("the guest did not reach its end")
	}
}
