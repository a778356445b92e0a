package blockdev

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeTLSDir writes a CA and a server certificate for "localhost" signed
// by it, in nbdkit's --tls-certificates layout (ca-cert.pem,
// server-cert.pem, server-key.pem).
func writeTLSDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "nbdclone test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srv := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"}, DNSNames: []string{"localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvDER, err := x509.CreateCertificate(rand.Reader, srv, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(srvKey)
	for name, blk := range map[string]*pem.Block{
		"ca-cert.pem":     {Type: "CERTIFICATE", Bytes: caDER},
		"server-cert.pem": {Type: "CERTIFICATE", Bytes: srvDER},
		"server-key.pem":  {Type: "EC PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(blk), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestNBDSAgainstNBDKit: nbds+unix with nbdkit --tls=require: the server's
// certificate is verified against the CA of tls-certificates; without it
// (system roots) the handshake fails, and plain NBD is refused by the
// server.
func TestNBDSAgainstNBDKit(t *testing.T) {
	data := randomData(30, 2<<20)
	src := tempFile(t, data)
	certs := writeTLSDir(t)
	uri := startNBDKit(t, "--tls=require", "--tls-certificates="+certs, "file", src)
	sock := strings.TrimPrefix(uri, "nbd+unix:///?socket=")
	d, err := OpenNBD(context.Background(), "nbds+unix:///?socket="+sock+"&tls-certificates="+certs, NBDOptions{Retry: fastRetry})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	checkReads(t, d, data, 3, 50)
	if _, err := OpenNBD(context.Background(), "nbds+unix:///?socket="+sock, NBDOptions{Retry: fastRetry}); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a certificate from an unknown CA was accepted: %v", err)
	}
	_, err = OpenNBD(context.Background(), uri, NBDOptions{Retry: fastRetry})
	if err == nil || !strings.Contains(err.Error(), "TLS required") {
		t.Fatalf("plain NBD to a TLS-only server: %v", err)
	}
	if errors.Is(err, ErrTimeout) {
		t.Fatal("refusal took the whole timeout")
	}
}
