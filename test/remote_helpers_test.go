package e2e

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// sourceServer is a real NBD server (nbdkit or qemu-nbd) in the foreground,
// serving one export on a unix socket: a clone's remote source.
type sourceServer struct {
	t    *testing.T
	name string   // the tool
	args []string // its arguments; the socket is part of them
	sock string
	cmd  *exec.Cmd
	done chan struct{}
	log  *lockedLog
}

type lockedLog struct{ strings.Builder }

// startNBDKit runs `nbdkit -f -U SOCK args...`.
func startNBDKit(t *testing.T, args ...string) *sourceServer {
	t.Helper()
	tool := testutil.NeedTool(t, "nbdkit")
	sock := testutil.Sock(t, "kit.sock")
	s := &sourceServer{t: t, name: tool, sock: sock, args: append([]string{"-f", "-U", sock}, args...)}
	s.start()
	t.Cleanup(func() { s.stop(syscall.SIGKILL) })
	return s
}

// startQemuNBD runs `qemu-nbd -f raw -r -t -k SOCK image` (read-only,
// persistent).
func startQemuNBD(t *testing.T, image string, extra ...string) *sourceServer {
	t.Helper()
	tool := testutil.NeedTool(t, "qemu-nbd")
	sock := testutil.Sock(t, "qemu.sock")
	args := append([]string{"-f", "raw", "-r", "-t", "-k", sock}, extra...)
	s := &sourceServer{t: t, name: tool, sock: sock, args: append(args, image)}
	s.start()
	t.Cleanup(func() { s.stop(syscall.SIGKILL) })
	return s
}

func (s *sourceServer) uri() string { return "nbd+unix:///?socket=" + s.sock }

// start starts the server and waits until its socket accepts connections
// (a hung server fails the test after a minute).
func (s *sourceServer) start() {
	s.t.Helper()
	os.Remove(s.sock) // a killed server leaves its socket behind
	s.cmd = exec.Command(s.name, s.args...)
	out, err := os.CreateTemp(s.t.TempDir(), "server-*.log")
	if err != nil {
		s.t.Fatal(err)
	}
	s.cmd.Stdout, s.cmd.Stderr = out, out
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("%s: %v", s.name, err)
	}
	s.done = make(chan struct{})
	cmd, done := s.cmd, s.done
	go func() { cmd.Wait(); out.Close(); close(done) }()
	deadline := time.Now().Add(time.Minute)
	for {
		if c, err := net.Dial("unix", s.sock); err == nil {
			c.Close()
			return
		}
		select {
		case <-done:
			b, _ := os.ReadFile(out.Name())
			s.t.Fatalf("%s %s exited at start:\n%s", s.name, strings.Join(s.args, " "), b)
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s not listening after a minute", s.name)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stop signals the server (by its own pid) and waits for it to exit; a
// server still serving a client after SIGTERM (nbdkit waits for its
// clients) is killed after ten seconds. Idempotent.
func (s *sourceServer) stop(sig syscall.Signal) {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Signal(sig)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd = nil
}

// nbdkitStats parses the stats filter's file: bytes read by pread.
var statsReadRE = regexp.MustCompile(`(?m)^read: (\d+) ops, [0-9.]+ s, ([0-9.]+) (bytes|[KMGTPE]?i?B)`)

// statsReadOps returns the number of reads and an upper bound of the bytes
// read that the stats filter reported (it prints bytes in human units).
func statsReadOps(t *testing.T, path string) (ops int64, bytes float64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var all strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		all.WriteString(sc.Text() + "\n")
	}
	m := statsReadRE.FindStringSubmatch(all.String())
	if m == nil {
		if strings.Contains(all.String(), "read:") {
			t.Fatalf("stats file %s: unparsed read line:\n%s", path, all.String())
		}
		return 0, 0 // no read at all
	}
	ops, _ = strconv.ParseInt(m[1], 10, 64)
	v, _ := strconv.ParseFloat(m[2], 64)
	mult := map[string]float64{"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
		"kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[m[3]]
	if mult == 0 {
		t.Fatalf("stats file %s: unit %q:\n%s", path, m[3], all.String())
	}
	return ops, v * mult
}

// nbdsh runs a Python snippet with nbdsh connected to uri and returns its
// output; the snippet prints what the test checks.
func nbdsh(t *testing.T, uri, script string) (string, error) {
	t.Helper()
	sh := nbdshell(t)
	args := append(sh[1:], "-u", uri, "-c", script)
	return runErr(sh[0], args...)
}

// createClone creates a clone of src (a URI or URL) in d's directory and
// returns the clone's NBD URI.
func createClone(t *testing.T, d *harness.Daemon, name string, size int64, src, extra string) string {
	t.Helper()
	harness.MakeImage(t, filepath.Join(d.Dir, name+".dst"), size)
	cli(t, d, "create", name, "--table", cloneLine(name, size, src, extra))
	return d.URI(name)
}

// cloneLine is createClone's table: NAME.md and NAME.dst in the daemon's
// directory, 4 KiB regions.
func cloneLine(name string, size int64, src, extra string) string {
	line := fmt.Sprintf("0 %d clone %s.md %s.dst %s 8", size/sector, name, name, src)
	if extra != "" {
		line += " " + extra
	}
	return line
}
