// Package harness runs the real nbdclone binary for end-to-end tests: it
// builds it once per test process (with -race when the tests run with
// -race), starts `nbdclone serve` on temporary sockets and state, and runs
// CLI commands and external tools with their output captured.
//
// Invariants: every daemon it starts is stopped with SIGTERM at test
// cleanup and must exit cleanly; nothing outside the test's temporary
// directories is touched.
package harness
