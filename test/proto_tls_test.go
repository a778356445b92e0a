package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdclone/nbdclone/internal/harness"
	"github.com/nbdclone/nbdclone/internal/testutil"
)

// pkiFiles are PEM files made by makePKI: the server's certificate and
// key, its CA, and libnbd's tls-certificates directories with and without
// a client certificate.
type pkiFiles struct {
	serverCert, serverKey, ca string
	clientDir, caOnlyDir      string
}

// makePKI makes a CA, a server certificate for localhost and a client
// certificate, with crypto/x509 (no openssl).
func makePKI(t testing.TB) pkiFiles {
	t.Helper()
	dir := t.TempDir()
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	keyDER := func(k *ecdsa.PrivateKey) []byte {
		b, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	serial := int64(0)
	sign := func(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, signer *ecdsa.PrivateKey) []byte {
		serial++
		tmpl.SerialNumber = big.NewInt(serial)
		tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
		if parent == nil {
			parent = tmpl
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	caKey := newKey()
	caTmpl := &x509.Certificate{Subject: pkix.Name{CommonName: "nbdclone test CA"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER := sign(caTmpl, nil, &caKey.PublicKey, caKey)
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	serverKey, clientKey := newKey(), newKey()
	serverDER := sign(&x509.Certificate{Subject: pkix.Name{CommonName: "localhost"}, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, caCert, &serverKey.PublicKey, caKey)
	clientDER := sign(&x509.Certificate{Subject: pkix.Name{CommonName: "client"}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, caCert, &clientKey.PublicKey, caKey)
	p := pkiFiles{
		serverCert: write("server-cert.pem", "CERTIFICATE", serverDER),
		serverKey:  write("server-key.pem", "PRIVATE KEY", keyDER(serverKey)),
		ca:         write("ca-cert.pem", "CERTIFICATE", caDER),
		clientDir:  filepath.Join(dir, "client"),
		caOnlyDir:  filepath.Join(dir, "anonymous"),
	}
	// libnbd's layout: ca-cert.pem, client-cert.pem, client-key.pem.
	write("client/ca-cert.pem", "CERTIFICATE", caDER)
	write("client/client-cert.pem", "CERTIFICATE", clientDER)
	write("client/client-key.pem", "PRIVATE KEY", keyDER(clientKey))
	write("anonymous/ca-cert.pem", "CERTIFICATE", caDER)
	return p
}

// TestProtoTLSRequired: `nbdclone serve --tls require --tls-verify-peer`:
// libnbd clients with a client certificate connect over nbds+unix://, list,
// map and copy; without a certificate, or without TLS, they are refused;
// `nbdclone ls` gives nbds URIs.
func TestProtoTLSRequired(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	testutil.NeedTool(t, "nbdcopy")
	pki := makePKI(t)
	d := harness.Serve(t, "--tls", "require", "--tls-cert", pki.serverCert, "--tls-key", pki.serverKey,
		"--tls-ca", pki.ca, "--tls-verify-peer")
	const size = 8 << 20
	src := makeSource(t, d.Dir, 40, size)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), size)
	cli(t, d, "create", "c", "--table", fmt.Sprintf("0 %d clone ./md ./dest.img ./src.img 128 1 no_hydration", size/sector))

	tlsURI := func(certs string) string {
		return fmt.Sprintf("nbds+unix:///c?socket=%s&tls-certificates=%s", d.NBD, certs)
	}
	var info struct {
		TLS     bool `json:"TLS"`
		Exports []struct {
			Name     string   `json:"export-name"`
			Size     int64    `json:"export-size"`
			Contexts []string `json:"contexts"`
		} `json:"exports"`
	}
	out := run(t, "nbdinfo", "--json", tlsURI(pki.clientDir))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !info.TLS || len(info.Exports) != 1 || info.Exports[0].Name != "c" || info.Exports[0].Size != size || len(info.Exports[0].Contexts) != 2 {
		t.Errorf("nbdinfo over TLS: %s", out)
	}
	if out := run(t, "nbdinfo", "--list", fmt.Sprintf("nbds+unix://?socket=%s&tls-certificates=%s", d.NBD, pki.clientDir)); !strings.Contains(out, `export="c"`) {
		t.Errorf("nbdinfo --list over TLS:\n%s", out)
	}
	if m := nbdinfoMap(t, "nbdclone:hydrated", tlsURI(pki.clientDir)); fmt.Sprint(m) != fmt.Sprint([]nbdMapEntry{{0, size, 0}}) {
		t.Errorf("hydrated map over TLS: %v", m)
	}
	outImg := filepath.Join(d.Dir, "out.img")
	run(t, "nbdcopy", "--connections=4", "--threads=4", tlsURI(pki.clientDir), outImg)
	if diff := firstDiff(readFile(t, outImg), src); diff != "" {
		t.Fatalf("nbdcopy over TLS: %s", diff)
	}

	// Refused: no client certificate; no TLS at all (nothing listed).
	if out, err := runErr("nbdinfo", tlsURI(pki.caOnlyDir)); err == nil {
		t.Errorf("nbdinfo without a client certificate connected:\n%s", out)
	}
	if out, err := runErr("nbdinfo", d.URI("c")); err == nil || !strings.Contains(out, "TLS") {
		t.Errorf("nbdinfo without TLS: %v\n%s", err, out)
	}
	if out, err := runErr("nbdinfo", "--list", "nbd+unix://?socket="+d.NBD); err == nil || strings.Contains(out, `export="c"`) {
		t.Errorf("nbdinfo --list without TLS: %v\n%s", err, out)
	}

	devs := lsDevices(t, d)
	if len(devs) != 1 || len(devs[0].URIs) != 1 || !strings.HasPrefix(devs[0].URIs[0], "nbds+unix:///c?socket=") {
		t.Errorf("ls URIs: %+v", devs)
	}
}

// TestProtoTLSOptional: with --tls on, plaintext clients work and TLS
// clients work without a client certificate.
func TestProtoTLSOptional(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	pki := makePKI(t)
	d := harness.Serve(t, "--tls", "on", "--tls-cert", pki.serverCert, "--tls-key", pki.serverKey)
	makeSource(t, d.Dir, 41, 1<<20)
	harness.MakeImage(t, filepath.Join(d.Dir, "dest.img"), 1<<20)
	cli(t, d, "create", "c", "--table", "0 2048 clone ./md ./dest.img ./src.img 8")
	for uri, wantTLS := range map[string]bool{
		d.URI("c"): false,
		fmt.Sprintf("nbds+unix:///c?socket=%s&tls-certificates=%s", d.NBD, pki.caOnlyDir): true,
	} {
		var info struct {
			TLS bool `json:"TLS"`
		}
		out := run(t, "nbdinfo", "--json", uri)
		if err := json.Unmarshal([]byte(out), &info); err != nil || info.TLS != wantTLS {
			t.Errorf("nbdinfo --json %s: TLS %v (%v), want %v", uri, info.TLS, err, wantTLS)
		}
	}
}

// TestProtoTLSFlags: bad TLS flag combinations stop `nbdclone serve`
// before it listens.
func TestProtoTLSFlags(t *testing.T) {
	pki := makePKI(t)
	bin := harness.Binary(t)
	dir := testutil.ShortDir(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tls", "maybe"}, "want off, on or require"},
		{[]string{"--tls", "require"}, "needs a server certificate and key"},
		{[]string{"--tls", "on", "--tls-cert", pki.serverCert, "--tls-key", pki.serverKey, "--tls-verify-peer"}, "needs the CA"},
		{[]string{"--tls", "on", "--tls-cert", pki.serverCert, "--tls-key", pki.serverKey, "--tls-ca", pki.ca}, "only used with --tls-verify-peer"},
		{[]string{"--tls-cert", pki.serverCert, "--tls-key", pki.serverKey}, "with TLS off"},
		{[]string{"--tls", "on", "--tls-cert", pki.serverKey, "--tls-key", pki.serverCert}, "server certificate"},
		{[]string{"--tls", "on", "--tls-cert", pki.serverCert, "--tls-key", pki.serverKey, "--tls-verify-peer", "--tls-ca", pki.serverKey}, "no PEM certificate"},
	} {
		args := append([]string{"serve", "--control", filepath.Join(dir, "c.sock"), "--listen", "unix:" + filepath.Join(dir, "n.sock"),
			"--state", filepath.Join(dir, "state")}, tc.args...)
		// The bound only turns a daemon that started anyway into a failure.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = harness.Env()
		out, err := cmd.CombinedOutput()
		cancel()
		if err == nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("serve %q: %v, want an error saying %q:\n%s", tc.args, err, tc.want, out)
		}
	}
}
