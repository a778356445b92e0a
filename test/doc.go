// Package e2e tests nbdclone end to end: the real binary (`nbdclone serve`
// and the CLI) driven only through its CLI, its control API and NBD clients
// nobody here wrote (nbdinfo, nbdcopy, nbdfuse, qemu-io, qemu-img, fio), with
// the kernel's ext4, loop devices and fstrim on top for the filesystem flow.
//
// Invariants:
//
//  1. Every test checks its promise with an assertion that can fail: data is
//     compared byte for byte against an image the test builds itself, and
//     counters against exact or bounded expected values.
//  2. A test that needs a tool or root fails under CI=true when it is
//     missing (testutil.NeedTool, testutil.NeedRoot); it never passes
//     silently.
//  3. Nothing is timed: timeouts only stop hangs.
//  4. Everything a test sets up outside its temporary directories (mounts,
//     loop devices, FUSE mounts, child processes) is torn down by t.Cleanup,
//     in reverse order, even when the test fails; processes are stopped by
//     their own pid.
package e2e
