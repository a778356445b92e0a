// Package pkgdoc holds one test: every package of the module has a doc.go
// whose package comment states its job (house style rule 1).
package pkgdoc
