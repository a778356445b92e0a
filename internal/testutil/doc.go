// Package testutil holds helpers shared by tests: finding external tools and
// root privileges with CI's rule (missing ⇒ fail under CI=true, skip
// otherwise), temporary sockets and leak checks.
//
// Invariant: a test that needs something it cannot have never passes
// silently when CI=true.
package testutil
