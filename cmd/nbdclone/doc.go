// Command nbdclone is the CLI of nbdclone: `nbdclone serve` runs the daemon,
// every other command mirrors dmsetup and is a thin call to the daemon's
// control API (daemon.Client).
//
// Invariants: errors go to stderr as "nbdclone: <message>", where message is
// the daemon's text (dm-clone's own for constructor and message errors), and
// the exit status is 1; output on stdout is what dmsetup prints for the same
// command; relative paths in tables are sent with the CLI's working
// directory so the daemon resolves them as the user meant.
package main
