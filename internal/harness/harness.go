package harness

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/daemon"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

var build struct {
	sync.Once
	dir, path string
	err       error
}

// moduleRoot is the repository root, found from this file's path.
func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Binary builds cmd/nbdclone once per test process and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	build.Do(func() {
		build.dir, build.err = os.MkdirTemp("", "nbdclone-bin")
		if build.err != nil {
			return
		}
		build.path = filepath.Join(build.dir, "nbdclone")
		args := []string{"build", "-o", build.path}
		if raceEnabled {
			args = append(args, "-race")
		}
		args = append(args, "./cmd/nbdclone")
		cmd := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), args...)
		cmd.Dir = moduleRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if build.err != nil {
		t.Fatal(build.err)
	}
	return build.path
}

// Cleanup removes the built binary; call it from TestMain after m.Run.
func Cleanup() {
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
}

// Env is the environment for nbdclone processes: a -race binary otherwise
// sleeps 1 s at exit.
func Env(extra ...string) []string {
	return append(append(os.Environ(), "GORACE=atexit_sleep_ms=0"), extra...)
}

// Daemon is one `nbdclone serve` with temporary sockets and state, and a
// work directory the CLI runs in.
type Daemon struct {
	T                   testing.TB
	Bin                 string
	Control, NBD, State string
	Dir                 string
	// ExtraArgs are appended to `nbdclone serve` on (re)start.
	ExtraArgs []string

	cmd    *exec.Cmd
	log    *lockedBuffer
	exited chan error // holds the exit error once the process ended
	// reaped: Stop or Kill saw this process end. Only the test goroutine
	// touches it; cmd.ProcessState belongs to the goroutine in Wait.
	reaped bool
}

// Serve starts a daemon and waits until its control socket answers.
func Serve(t testing.TB, extraArgs ...string) *Daemon {
	t.Helper()
	sock := testutil.ShortDir(t)
	d := &Daemon{
		T:         t,
		Bin:       Binary(t),
		Control:   filepath.Join(sock, "control.sock"),
		NBD:       filepath.Join(sock, "nbd.sock"),
		State:     filepath.Join(t.TempDir(), "state"),
		Dir:       t.TempDir(),
		ExtraArgs: extraArgs,
	}
	d.Start()
	t.Cleanup(func() {
		d.Stop()
		if t.Failed() {
			t.Logf("serve log:\n%s", d.Log())
		}
	})
	return d
}

// Start (re)starts the daemon process on the same sockets and state.
func (d *Daemon) Start() {
	t := d.T
	t.Helper()
	d.log = &lockedBuffer{}
	d.exited = make(chan error, 1)
	d.reaped = false
	args := append([]string{"serve", "--control", d.Control, "--listen", "unix:" + d.NBD, "--state", d.State, "--log-level", "debug"}, d.ExtraArgs...)
	d.cmd = exec.Command(d.Bin, args...)
	d.cmd.Env = Env()
	d.cmd.Stdout = io.Discard
	d.cmd.Stderr = d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cmd, exited := d.cmd, d.exited
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := daemon.Dial(d.Control); err == nil {
			c.Close()
			return
		}
		select {
		case err := <-d.exited:
			d.exited <- err
			t.Fatalf("serve exited: %v\n%s", err, d.Log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve not up in 30s:\n%s", d.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop sends SIGTERM and expects a clean exit; a daemon that had already
// exited by itself (a crash) is an error. Idempotent.
func (d *Daemon) Stop() {
	if d.cmd == nil || d.reaped {
		return
	}
	d.reaped = true
	select {
	case err := <-d.exited:
		d.exited <- err
		d.T.Errorf("serve exited by itself before SIGTERM: %v", err)
		return
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.exited:
		if err != nil {
			d.T.Errorf("serve exited with %v after SIGTERM", err)
		}
		d.exited <- err
	case <-time.After(60 * time.Second):
		d.cmd.Process.Kill()
		d.T.Errorf("serve did not exit within 60s of SIGTERM")
	}
}

// Kill kills the daemon with SIGKILL (a crash) and waits for it.
func (d *Daemon) Kill() {
	if d.cmd == nil || d.reaped {
		return
	}
	d.reaped = true
	d.cmd.Process.Kill()
	err := <-d.exited
	d.exited <- err
}

// Log is what the daemon wrote to stderr so far.
func (d *Daemon) Log() string { return d.log.String() }

// URI is the NBD URI of an export.
func (d *Daemon) URI(name string) string { return "nbd+unix:///" + name + "?socket=" + d.NBD }

// Result is a finished command.
type Result struct {
	Stdout, Stderr string
	Code           int
}

// CLI runs nbdclone in d.Dir with the control socket in the environment.
func (d *Daemon) CLI(stdin string, args ...string) Result {
	d.T.Helper()
	cmd := exec.Command(d.Bin, args...)
	cmd.Dir = d.Dir
	cmd.Env = Env(daemon.ControlEnv + "=" + d.Control)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := Result{Stdout: stdout.String(), Stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.Code = ee.ExitCode()
	} else if err != nil {
		d.T.Fatalf("nbdclone %v: %v", args, err)
	}
	return r
}

// OK runs a command that must succeed and returns its stdout.
func (d *Daemon) OK(args ...string) string {
	d.T.Helper()
	r := d.CLI("", args...)
	if r.Code != 0 || r.Stderr != "" {
		d.T.Fatalf("nbdclone %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// Fails runs a command that must fail with exit 1 and exactly stderr.
func (d *Daemon) Fails(stderr string, args ...string) {
	d.T.Helper()
	r := d.CLI("", args...)
	if r.Code != 1 || r.Stderr != stderr || r.Stdout != "" {
		d.T.Errorf("nbdclone %s: exit %d, stdout %q, stderr %q; want exit 1, stderr %q",
			strings.Join(args, " "), r.Code, r.Stdout, r.Stderr, stderr)
	}
}

// Run runs an external tool that must succeed and returns its combined
// output.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// MakeImage creates a sparse file of size bytes.
func MakeImage(t testing.TB, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
