package nbdserver

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/nbdwire"
)

// testPKI is a CA, a server certificate for localhost signed by it, and a
// client certificate signed by it (or by another CA, for rejection tests).
type testPKI struct {
	caPool *x509.CertPool
	server tls.Certificate
	client tls.Certificate
	// PEM encodings, for libnbd's tls-certificates directory.
	caPEM, clientCertPEM, clientKeyPEM []byte
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	p, err := makeTestPKI()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func makeTestPKI() (*testPKI, error) {
	caKey, caCert, caDER, err := makeCert(nil, nil, &x509.Certificate{
		Subject:               pkix.Name{CommonName: "nbdserver test CA"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	})
	if err != nil {
		return nil, err
	}
	p := &testPKI{caPool: x509.NewCertPool()}
	p.caPool.AddCert(caCert)
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	serverKey, _, serverDER, err := makeCert(caKey, caCert, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "localhost"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return nil, err
	}
	p.server = tls.Certificate{Certificate: [][]byte{serverDER}, PrivateKey: serverKey}
	clientKey, _, clientDER, err := makeCert(caKey, caCert, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "nbd client"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return nil, err
	}
	p.client = tls.Certificate{Certificate: [][]byte{clientDER}, PrivateKey: clientKey}
	p.clientCertPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: clientDER})
	keyDER, err := x509.MarshalPKCS8PrivateKey(clientKey)
	if err != nil {
		return nil, err
	}
	p.clientKeyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	return p, nil
}

// makeCert makes a key and a certificate from tmpl, signed by parent (self
// signed when parent is nil).
func makeCert(parentKey *ecdsa.PrivateKey, parent, tmpl *x509.Certificate) (*ecdsa.PrivateKey, *x509.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, err
	}
	return key, cert, der, nil
}

// serverConfig is the server side; verifyPeer requires client certificates.
func (p *testPKI) serverConfig(verifyPeer bool) *tls.Config {
	cfg := &tls.Config{Certificates: []tls.Certificate{p.server}}
	if verifyPeer {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = p.caPool
	}
	return cfg
}

// clientConfig trusts the CA and presents the client certificate if asked.
func (p *testPKI) clientConfig(withCert bool) *tls.Config {
	cfg := &tls.Config{RootCAs: p.caPool, ServerName: "localhost"}
	if withCert {
		cfg.Certificates = []tls.Certificate{p.client}
	}
	return cfg
}

// certDir writes libnbd's tls-certificates layout: ca-cert.pem, and the
// client's certificate and key when withClient.
func (p *testPKI) certDir(t testing.TB, withClient bool) string {
	t.Helper()
	dir := t.TempDir()
	files := map[string][]byte{"ca-cert.pem": p.caPEM}
	if withClient {
		files["client-cert.pem"] = p.clientCertPEM
		files["client-key.pem"] = p.clientKeyPEM
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// startTLS sends NBD_OPT_STARTTLS and, on ACK, runs the client handshake;
// it returns the handshake error.
func (rc *rawClient) startTLS(cfg *tls.Config) error {
	rc.t.Helper()
	rc.sendOption(nbdwire.OptStartTLS, nil)
	rc.expectOptReply(nbdwire.OptStartTLS, nbdwire.RepAck)
	tc := tls.Client(rc.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	rc.nc = tc
	rc.r = bufio.NewReader(tc)
	return nil
}

func TestTLSRequired(t *testing.T) {
	pki := newTestPKI(t)
	e, disk, _ := twoExports(t)
	disk.contexts = []string{ContextBaseAllocation}
	srv := startServer(t, e, Options{TLS: TLSRequire, TLSConfig: pki.serverConfig(true)})

	// Before TLS, nothing but STARTTLS and ABORT: not even the list.
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{
		{nbdwire.OptList, nil},
		{nbdwire.OptInfo, infoRequest("disk")},
		{nbdwire.OptGo, infoRequest("disk")},
		{nbdwire.OptStructuredReply, nil},
		{nbdwire.OptListMetaContext, metaRequest("disk")},
		{nbdwire.OptSetMetaContext, metaRequest("disk", ContextBaseAllocation)},
		{4242, []byte("x")},
	} {
		rc.sendOption(o.opt, o.data)
		r := rc.expectOptReply(o.opt, nbdwire.RepErrTLSReqd)
		if strings.Contains(string(r.data), "disk") {
			t.Errorf("option %d: the refusal names an export: %q", o.opt, r.data)
		}
	}
	if n := e.opens.Load(); n != 0 {
		t.Errorf("exports opened %d times before TLS", n)
	}
	rc.sendOption(nbdwire.OptAbort, nil)
	rc.expectOptReply(nbdwire.OptAbort, nbdwire.RepAck)
	rc.expectEOF()

	// NBD_OPT_EXPORT_NAME cannot fail politely: the session ends.
	rc = dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptExportName, []byte("disk"))
	rc.expectEOF()
	// So does a client without fixed newstyle, which cannot do TLS.
	rc = dialRaw(t, srv.sock)
	rc.handshake(0)
	rc.sendOption(nbdwire.OptExportName, []byte("disk"))
	rc.expectEOF()

	// With TLS and a client certificate, everything works, encrypted.
	rc = dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	if err := rc.startTLS(pki.clientConfig(true)); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	rc.sendOption(nbdwire.OptStartTLS, nil)
	rc.expectOptReply(nbdwire.OptStartTLS, nbdwire.RepErrInvalid) // already active
	rc.sendOption(nbdwire.OptList, nil)
	if r := rc.readOptReply(); r.typ != nbdwire.RepServer || !strings.Contains(string(r.data), "disk") {
		t.Fatalf("LIST over TLS: %#x %q", r.typ, r.data)
	}
	for r := rc.readOptReply(); r.typ != nbdwire.RepAck; r = rc.readOptReply() {
	}
	rc.sendOption(nbdwire.OptStructuredReply, nil)
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)
	if sel, typ := rc.metaOption(nbdwire.OptSetMetaContext, metaRequest("disk", ContextBaseAllocation)); typ != nbdwire.RepAck || len(sel) != 1 {
		t.Fatalf("SET over TLS: %v %#x", sel, typ)
	}
	rc.goExport("disk", true)
	payload := []byte(strings.Repeat("secret", 1000))
	rc.request(nbdwire.CmdWrite, nbdwire.CmdFlagFUA, 1, 4096, uint32(len(payload)), payload)
	rc.expectSimple(1, 0)
	rc.request(nbdwire.CmdRead, 0, 2, 4096, uint32(len(payload)), nil)
	if c := rc.readChunk(); c.typ != nbdwire.ReplyTypeOffsetData || string(c.payload[8:]) != string(payload) {
		t.Fatalf("read over TLS: chunk type %d", c.typ)
	}
	if got, errno := rc.blockStatus(3, 0, 0, 8192); errno != 0 || len(got[1]) != 2 {
		t.Fatalf("block status over TLS: %v %d", got, errno)
	}
	rc.request(nbdwire.CmdDisc, 0, 4, 0, 0, nil)
	rc.expectEOF()

	// Without a client certificate, or with one the CA did not sign, the
	// handshake fails and the server goes on serving.
	other := newTestPKI(t)
	for name, cfg := range map[string]*tls.Config{
		"no client certificate":  pki.clientConfig(false),
		"certificate of another": {RootCAs: pki.caPool, ServerName: "localhost", Certificates: []tls.Certificate{other.client}},
	} {
		rc := dialRaw(t, srv.sock)
		rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
		err := rc.startTLS(cfg)
		if err == nil {
			// TLS 1.3: the server's verdict comes with the first read.
			b := be.AppendUint64(nil, nbdwire.OptMagic)
			b = be.AppendUint32(b, nbdwire.OptList)
			b = be.AppendUint32(b, 0)
			if _, err = rc.nc.Write(b); err == nil {
				_, err = rc.r.ReadByte()
			}
		}
		if err == nil {
			t.Errorf("%s: TLS session established", name)
		}
	}
	// A client that does not trust the server's certificate gives up.
	rc = dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	if err := rc.startTLS(other.clientConfig(true)); err == nil {
		t.Error("handshake succeeded against an unknown CA")
	}
	rc.nc.Close()
	waitFor(t, "failed handshakes to close", func() bool { return len(srv.Connections()) == 0 })

	tc := dialRaw(t, srv.sock)
	tc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	if err := tc.startTLS(pki.clientConfig(true)); err != nil {
		t.Fatal(err)
	}
	tc.goExport("disk", false)
	tc.request(nbdwire.CmdRead, 0, 1, 4096, 6, nil)
	if errno, _, data := tc.readSimple(6); errno != 0 || string(data) != "secret" {
		t.Fatalf("read after refused handshakes: errno %d %q", errno, data)
	}
}

// TestTLSOptional: with TLS on, a client may go without it, or upgrade
// after some options; the upgrade forgets what was negotiated before.
func TestTLSOptional(t *testing.T) {
	pki := newTestPKI(t)
	e, disk, _ := twoExports(t)
	disk.contexts = []string{ContextBaseAllocation}
	srv := startServer(t, e, Options{TLS: TLSOn, TLSConfig: pki.serverConfig(false)})

	checkServes(t, srv.sock) // plaintext

	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptStructuredReply, nil)
	rc.expectOptReply(nbdwire.OptStructuredReply, nbdwire.RepAck)
	rc.metaOption(nbdwire.OptSetMetaContext, metaRequest("disk", ContextBaseAllocation))
	rc.sendOption(nbdwire.OptStartTLS, []byte{1})
	rc.expectOptReply(nbdwire.OptStartTLS, nbdwire.RepErrInvalid)
	// No client certificate needed without peer verification.
	if err := rc.startTLS(pki.clientConfig(false)); err != nil {
		t.Fatal(err)
	}
	// Structured replies and contexts were reset: simple replies, and no
	// BLOCK_STATUS.
	rc.goExport("disk", false)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 512, nil)
	if errno, _, data := rc.readSimple(512); errno != 0 || len(data) != 512 {
		t.Fatalf("read: errno %d", errno)
	}
	rc.request(nbdwire.CmdBlockStatus, 0, 2, 0, 512, nil)
	rc.expectSimple(2, nbdwire.EINVAL)
}

// TestTLSPlaintextAfterStartTLS: bytes the client sends after STARTTLS
// before the server's reply would be injected into the TLS session; the
// server hangs up instead.
func TestTLSPlaintextAfterStartTLS(t *testing.T) {
	pki := newTestPKI(t)
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{TLS: TLSRequire, TLSConfig: pki.serverConfig(false)})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	b := be.AppendUint64(nil, nbdwire.OptMagic)
	b = be.AppendUint32(b, nbdwire.OptStartTLS)
	b = be.AppendUint32(b, 0)
	b = be.AppendUint64(b, nbdwire.OptMagic) // the next option, too early
	b = be.AppendUint32(b, nbdwire.OptList)
	b = be.AppendUint32(b, 0)
	rc.write(b)
	rc.expectEOF()
	checkTLSServes(t, srv.sock, pki)
}

// TestTLSHandshakeGarbage: a client that sends garbage instead of a TLS
// ClientHello is disconnected; others are served.
func TestTLSHandshakeGarbage(t *testing.T) {
	pki := newTestPKI(t)
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{TLS: TLSRequire, TLSConfig: pki.serverConfig(false)})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptStartTLS, nil)
	rc.expectOptReply(nbdwire.OptStartTLS, nbdwire.RepAck)
	rc.write([]byte("this is not a ClientHello, not at all, no................"))
	b, _ := bufio.NewReader(rc.nc).ReadString(0)
	if !strings.HasPrefix(b, "\x15") && b != "" { // a TLS alert, or nothing
		t.Errorf("server answered garbage with %q", b)
	}
	checkTLSServes(t, srv.sock, pki)
}

// TestTLSShutdownDuringHandshake: Close does not wait for a client stuck
// in the TLS handshake.
func TestTLSShutdownDuringHandshake(t *testing.T) {
	pki := newTestPKI(t)
	e, _, _ := twoExports(t)
	srv := startServer(t, e, Options{TLS: TLSRequire, TLSConfig: pki.serverConfig(false)})
	rc := dialRaw(t, srv.sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	rc.sendOption(nbdwire.OptStartTLS, nil)
	rc.expectOptReply(nbdwire.OptStartTLS, nbdwire.RepAck)
	// No ClientHello: the server waits in its handshake until Close.
	srv.Close()
	rc.expectEOF()
}

func checkTLSServes(t *testing.T, sock string, pki *testPKI) {
	t.Helper()
	rc := dialRaw(t, sock)
	rc.handshake(nbdwire.FlagCFixedNewstyle | nbdwire.FlagCNoZeroes)
	if err := rc.startTLS(pki.clientConfig(true)); err != nil {
		t.Fatal(err)
	}
	rc.goExport("disk", false)
	rc.request(nbdwire.CmdRead, 0, 1, 0, 512, nil)
	if errno, _, _ := rc.readSimple(512); errno != 0 {
		t.Fatalf("errno %d", errno)
	}
	rc.request(nbdwire.CmdDisc, 0, 2, 0, 0, nil)
	rc.expectEOF()
}

func TestTLSOptionsValidate(t *testing.T) {
	pki := newTestPKI(t)
	for name, o := range map[string]Options{
		"mode without config":  {TLS: TLSOn},
		"config without cert":  {TLS: TLSRequire, TLSConfig: &tls.Config{}},
		"unknown mode":         {TLS: TLSMode(7), TLSConfig: pki.serverConfig(false)},
		"negative mode":        {TLS: TLSMode(-1)},
		"require, no anything": {TLS: TLSRequire},
	} {
		if err := o.Validate(); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("%s: Validate = %v", name, err)
		}
	}
	o := Options{TLS: TLSOn, TLSConfig: &tls.Config{Certificates: []tls.Certificate{pki.server}, MinVersion: tls.VersionTLS10}}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if o.TLSConfig.MinVersion != tls.VersionTLS12 {
		t.Errorf("MinVersion %#x: the spec wants TLS 1.2 at least", o.TLSConfig.MinVersion)
	}
	for _, s := range []string{"off", "on", "require"} {
		if m, err := ParseTLSMode(s); err != nil || m.String() != s {
			t.Errorf("ParseTLSMode(%q) = %v, %v", s, m, err)
		}
	}
	if _, err := ParseTLSMode("yes"); err == nil {
		t.Error("ParseTLSMode(yes) succeeded")
	}
}
