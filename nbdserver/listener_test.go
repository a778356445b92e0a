package nbdserver

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// TestListenerAllowlist: a listener restricted to some exports neither
// lists, describes nor opens the others; another listener of the same
// server still serves everything.
func TestListenerAllowlist(t *testing.T) {
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{})
	sock := testutil.Sock(t, "only-ro.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeListener(context.Background(), l, ListenerOptions{Exports: []string{"ro"}}) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; err != nil {
			t.Errorf("ServeListener: %v", err)
		}
	})

	rc := dialRaw(t, sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptList, nil)
	var listed []string
	for r := rc.readOptReply(); r.typ != nbdwire.RepAck; r = rc.readOptReply() {
		listed = append(listed, string(r.data[4:4+be.Uint32(r.data)]))
	}
	if strings.Join(listed, ",") != "ro" {
		t.Errorf("listed %q, want only ro", listed)
	}
	for _, opt := range []uint32{nbdwire.OptInfo, nbdwire.OptGo} {
		rc.sendOption(opt, infoRequest("disk"))
		rc.expectOptReply(opt, nbdwire.RepErrUnknown)
	}
	rc.sendOption(nbdwire.OptStructuredReply, nil)
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)
	if _, typ := rc.metaOption(nbdwire.OptListMetaContext, metaRequest("disk")); typ != nbdwire.RepErrUnknown {
		t.Errorf("LIST_META_CONTEXT of a hidden export: %#x", typ)
	}
	rc.goExport("ro", true)

	rc = dialRaw(t, sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle)
	rc.sendOption(nbdwire.OptExportName, []byte("disk"))
	rc.expectEOF()
	if n := e.opens.Load(); n != 1 {
		t.Errorf("%d opens, want only ro's", n)
	}
	checkServes(t, srv.sock) // the unrestricted listener
}

// TestListenerTLSOverride: a listener can run without TLS on a server
// that requires it (an in-process listener of trusted peers); a listener
// cannot ask for TLS the server has no configuration for.
func TestListenerTLSOverride(t *testing.T) {
	pki := newTestPKI(t)
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{TLS: TLSRequire, TLSConfig: pki.serverConfig(true)})
	sock := testutil.Sock(t, "plain.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	off := TLSOff
	served := make(chan error, 1)
	go func() { served <- srv.ServeListener(context.Background(), l, ListenerOptions{TLS: &off}) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; err != nil {
			t.Errorf("ServeListener: %v", err)
		}
	})
	checkServes(t, sock)
	// The server's own listener still requires TLS.
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptGo, infoRequest("disk"))
	rc.expectOptReply(nbdwire.OptGo, nbdwire.RepErrTLSReqd)

	plain, err := NewServer(e, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	l2, err := net.Listen("unix", testutil.Sock(t, "x.sock"))
	if err != nil {
		t.Fatal(err)
	}
	on := TLSOn
	if err := plain.ServeListener(context.Background(), l2, ListenerOptions{TLS: &on}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("TLS on a listener without TLSConfig: %v", err)
	}
}
