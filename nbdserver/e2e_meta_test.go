package nbdserver

// Metadata contexts and TLS with clients nobody here wrote: libnbd's
// nbdinfo and QEMU's qemu-img.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// mapEntry is one extent of `nbdinfo --map --json`.
type mapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   uint32 `json:"type"`
}

func nbdinfoMap(t *testing.T, context, uri string) []mapEntry {
	t.Helper()
	out := runTool(t, "nbdinfo", "--map="+context, "--json", uri)
	var m []mapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map=%s --json: %v\n%s", context, err, out)
	}
	return m
}

// sparseContent is data at [64K, 192K) and in the last 4 KiB block, zeroes
// elsewhere; wantAlloc is its base:allocation map.
func sparseContent(size int) ([]byte, []mapEntry) {
	b := make([]byte, size)
	copy(b[64<<10:], randomBytes(5, 128<<10))
	b[size-1] = 0x5a
	const hz = StateHole | StateZero
	return b, []mapEntry{
		{0, 64 << 10, hz},
		{64 << 10, 128 << 10, 0},
		{192 << 10, int64(size) - 192<<10 - 4096, hz},
		{int64(size) - 4096, 4096, 0},
	}
}

func TestNbdinfoMap(t *testing.T) {
	const size = 4 << 20
	e := newMemExports(t)
	disk := e.add("disk", "", newMemExport(size, allFlags))
	content, wantAlloc := sparseContent(size)
	disk.fill(content)
	disk.contexts = []string{ContextBaseAllocation, testHydrated}
	// x-test:hydrated: flag 1 on the first MiB.
	disk.setExtents(func(metaContext string, off, n int64, maxExtents int) ([]Extent, error) {
		if metaContext == ContextBaseAllocation {
			return disk.zeroExtents(off, n, maxExtents), nil
		}
		if off < 1<<20 {
			return []Extent{{Length: min(n, 1<<20-off), Flags: 1}}, nil
		}
		return []Extent{{Length: n}}, nil
	})
	e.add("plain", "", newMemExport(size, allFlags))
	srv := startServer(t, e, Options{})
	uri := nbdURI(srv.sock, "disk")

	if got := nbdinfoMap(t, ContextBaseAllocation, uri); fmt.Sprint(got) != fmt.Sprint(wantAlloc) {
		t.Errorf("nbdinfo --map\n got %v\nwant %v", got, wantAlloc)
	}
	wantHydrated := []mapEntry{{0, 1 << 20, 1}, {1 << 20, size - 1<<20, 0}}
	if got := nbdinfoMap(t, testHydrated, uri); fmt.Sprint(got) != fmt.Sprint(wantHydrated) {
		t.Errorf("nbdinfo --map=%s\n got %v\nwant %v", testHydrated, got, wantHydrated)
	}

	// nbdinfo --json lists the contexts an export offers, and none for an
	// export without them.
	var info struct {
		Exports []struct {
			Contexts []string `json:"contexts"`
		} `json:"exports"`
	}
	for name, want := range map[string]string{"disk": "[base:allocation x-test:hydrated]", "plain": "[]"} {
		out := runTool(t, "nbdinfo", "--json", nbdURI(srv.sock, name))
		if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
			t.Fatalf("%v\n%s", err, out)
		}
		if got := fmt.Sprint(info.Exports[0].Contexts); got != want {
			t.Errorf("%s: contexts %s, want %s", name, got, want)
		}
	}

	// qemu-img map: zero where the export says so, data elsewhere.
	out := runTool(t, "qemu-img", "map", "--output=json", "-f", "raw", uri)
	var qm []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Zero   bool  `json:"zero"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &qm); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	var got []string
	for _, m := range qm {
		got = append(got, fmt.Sprintf("%d+%d zero=%v data=%v", m.Start, m.Length, m.Zero, m.Data))
	}
	var want []string
	for _, m := range wantAlloc {
		want = append(want, fmt.Sprintf("%d+%d zero=%v data=%v", m.Offset, m.Length, m.Type != 0, m.Type == 0))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("qemu-img map\n got %q\nwant %q", got, want)
	}
}

func TestNbdinfoTLS(t *testing.T) {
	pki := newTestPKI(t)
	e := newMemExports(t)
	disk := e.add("disk", "a disk", newMemExport(4<<20, allFlags))
	content, wantAlloc := sparseContent(4 << 20)
	disk.fill(content)
	disk.contexts = []string{ContextBaseAllocation}
	srv := startServer(t, e, Options{TLS: TLSRequire, TLSConfig: pki.serverConfig(true)})
	certs := pki.certDir(t, true)
	tlsURI := fmt.Sprintf("nbds+unix:///disk?socket=%s&tls-certificates=%s", srv.sock, certs)

	var info struct {
		TLS     bool `json:"TLS"`
		Exports []struct {
			Name string `json:"export-name"`
			Size int64  `json:"export-size"`
		} `json:"exports"`
	}
	out := runTool(t, "nbdinfo", "--json", tlsURI)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !info.TLS || len(info.Exports) != 1 || info.Exports[0].Name != "disk" || info.Exports[0].Size != 4<<20 {
		t.Errorf("nbdinfo over TLS: %+v", info)
	}
	if got := nbdinfoMap(t, ContextBaseAllocation, tlsURI); fmt.Sprint(got) != fmt.Sprint(wantAlloc) {
		t.Errorf("nbdinfo --map over TLS\n got %v\nwant %v", got, wantAlloc)
	}
	out = runTool(t, "nbdinfo", "--list", fmt.Sprintf("nbds+unix://?socket=%s&tls-certificates=%s", srv.sock, certs))
	if !strings.Contains(out, `export="disk"`) {
		t.Errorf("nbdinfo --list over TLS:\n%s", out)
	}
	// Data goes both ways intact, through libnbd and QEMU's TLS.
	file := filepath.Join(t.TempDir(), "disk.img")
	fresh := randomBytes(6, 4<<20)
	if err := os.WriteFile(file, fresh, 0o600); err != nil {
		t.Fatal(err)
	}
	runTool(t, "nbdcopy", "--connections=4", file, tlsURI)
	if i := firstDiff(disk.snapshot(), fresh); i >= 0 {
		t.Fatalf("nbdcopy over TLS: bytes differ at %d", i)
	}
	runTool(t, "qemu-img", "compare", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+certs,
		"--image-opts", "driver=nbd,server.type=unix,server.path="+srv.sock+",export=disk,tls-creds=tls0,tls-hostname=localhost",
		"driver=file,filename="+file)

	// Refused: without a client certificate, and without TLS at all.
	noCert := fmt.Sprintf("nbds+unix:///disk?socket=%s&tls-certificates=%s", srv.sock, pki.certDir(t, false))
	if out, err := runToolErr(t, "nbdinfo", noCert); err == nil {
		t.Errorf("nbdinfo without a client certificate connected:\n%s", out)
	}
	if out, err := runToolErr(t, "nbdinfo", nbdURI(srv.sock, "disk")); err == nil || !strings.Contains(out, "TLS") {
		t.Errorf("nbdinfo without TLS: %v\n%s", err, out)
	}
	if out, err := runToolErr(t, "nbdinfo", "--list", "nbd+unix://?socket="+srv.sock); err == nil || strings.Contains(out, "disk") {
		t.Errorf("nbdinfo --list without TLS: %v\n%s", err, out)
	}
}
