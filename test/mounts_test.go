package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// mounts attaches things to the kernel for a test (mounts, loop devices,
// nbdfuse) and registers with t.Cleanup how to undo each, so they are torn
// down in reverse order even when the test fails half way. Each attach also
// returns its undo, for tests that detach in the middle; undoing twice is
// harmless.
type mounts struct {
	t *testing.T
}

// isMounted reports whether dir is a mount point now.
func isMounted(dir string) bool {
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return true // let umount tell
	}
	for _, line := range strings.Split(string(info), "\n") {
		// Field 5 is the mount point, with spaces etc. escaped as \ooo.
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// umount unmounts dir if it is mounted, lazily if a plain unmount fails
// (the device under it may be gone when a test failed).
func (m mounts) umount(dir string) error {
	if !isMounted(dir) {
		return nil
	}
	if out, err := runErr("umount", dir); err != nil {
		if out2, err2 := runErr("umount", "-l", dir); err2 != nil {
			return fmt.Errorf("umount %s: %v %s; umount -l: %v %s", dir, err, out, err2, out2)
		}
	}
	return nil
}

// mount mounts dev on dir and returns the function that unmounts it, safe
// to call twice; Cleanup calls it too.
func (m mounts) mount(dev, dir string, opts ...string) func() {
	m.t.Helper()
	run(m.t, "mount", append(opts, dev, dir)...)
	done := false
	undo := func() {
		if done {
			return
		}
		done = true
		if err := m.umount(dir); err != nil {
			m.t.Error(err)
		}
	}
	m.t.Cleanup(undo)
	return undo
}

// loop attaches file to a free loop device and returns the device and the
// function that detaches it.
func (m mounts) loop(file string, opts ...string) (string, func()) {
	m.t.Helper()
	dev := strings.TrimSpace(run(m.t, "losetup", append(append([]string{"-f", "--show"}, opts...), file)...))
	if !strings.HasPrefix(dev, "/dev/loop") {
		m.t.Fatalf("losetup printed %q", dev)
	}
	done := false
	undo := func() {
		if done {
			return
		}
		done = true
		if out, err := runErr("losetup", "-d", dev); err != nil {
			m.t.Errorf("losetup -d %s: %v %s", dev, err, out)
		}
	}
	m.t.Cleanup(undo)
	return dev, undo
}

// nbdfuse exposes uri as the file dir/disk through nbdfuse and returns its
// path and the function that unmounts it and waits for nbdfuse to exit.
func (m mounts) nbdfuse(dir, uri string, size int64) (string, func()) {
	m.t.Helper()
	t := m.t
	disk := filepath.Join(dir, "disk")
	cmd := exec.Command("nbdfuse", disk, uri)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	done := false
	undo := func() {
		if done {
			return
		}
		done = true
		// Unmount even when nbdfuse died: its mount stays behind then.
		if err := m.umount(dir); err != nil {
			t.Error(err)
		}
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("nbdfuse exited with %v: %s", err, out.String())
			}
		case <-time.After(30 * time.Second):
			t.Errorf("nbdfuse still running 30s after its unmount; killing it")
			cmd.Process.Kill()
			<-exited
		}
	}
	t.Cleanup(undo)
	waitFor(t, time.Minute, "nbdfuse to show "+disk, func() bool {
		select {
		case err := <-exited:
			t.Fatalf("nbdfuse exited: %v\n%s", err, out.String())
		default:
		}
		fi, err := os.Stat(disk)
		return err == nil && fi.Size() == size
	})
	return disk, undo
}
