package blockdev

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// object is a mutable http object served with http.ServeContent (Range,
// If-Match, If-Unmodified-Since as net/http implements them).
type object struct {
	mu      sync.Mutex
	data    []byte
	etag    string // "" sends none
	modTime time.Time
	// Knobs for failure tests; guarded by mu.
	failNext  int // answer this many requests with 503
	noHead    bool
	noRange   bool
	gets      int
	rangeGets int
}

func (o *object) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	data, etag, mod := o.data, o.etag, o.modTime
	fail := o.failNext > 0
	if fail {
		o.failNext--
	}
	noHead, noRange := o.noHead, o.noRange
	if r.Method == http.MethodGet {
		o.gets++
		if r.Header.Get("Range") != "" {
			o.rangeGets++
		}
	}
	o.mu.Unlock()
	switch {
	case fail:
		http.Error(w, "busy", http.StatusServiceUnavailable)
		return
	case noHead && r.Method == http.MethodHead:
		http.Error(w, "signature does not match", http.StatusForbidden)
		return
	case noRange:
		r.Header.Del("Range")
		w.Write(data)
		return
	}
	if etag != "" {
		w.Header().Set("ETag", etag)
	}
	http.ServeContent(w, r, "", mod, bytes.NewReader(data))
}

func (o *object) replace(data []byte, etag string, mod time.Time) {
	o.mu.Lock()
	o.data, o.etag, o.modTime = data, etag, mod
	o.mu.Unlock()
}

func serveObject(t *testing.T, o *object) string {
	t.Helper()
	srv := httptest.NewServer(o)
	t.Cleanup(srv.Close)
	return srv.URL + "/disk.img?X-Signature=secret"
}

var httpFast = HTTPOptions{RequestBytes: 64 << 10, Retry: fastRetry}

func checkHTTPReads(t *testing.T, h *HTTP, data []byte, seed uint64, count int) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 2))
	size := int64(len(data))
	for range count {
		off := r.Int64N(size)
		n := 1 + r.Int64N(min(size-off+10, 400<<10))
		p := make([]byte, n)
		got, err := h.ReadAt(p, off)
		want := min(n, size-off)
		if int64(got) != want || (want < n) != errors.Is(err, io.EOF) || want == n && err != nil {
			t.Fatalf("ReadAt %d+%d = %d, %v", off, n, got, err)
		}
		if !bytes.Equal(p[:got], data[off:off+want]) {
			t.Fatalf("ReadAt %d+%d: wrong data", off, n)
		}
	}
}

func TestHTTPReadsMatch(t *testing.T) {
	data := randomData(20, 3<<20+333)
	o := &object{data: data, etag: `"v1"`, modTime: time.Unix(1700000000, 0)}
	url := serveObject(t, o)
	h, err := OpenHTTP(context.Background(), url, httpFast)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if h.Size() != int64(len(data)) || h.SourceID() != `etag:"v1";size:`+fmt.Sprint(len(data)) {
		t.Fatalf("size %d id %q", h.Size(), h.SourceID())
	}
	checkHTTPReads(t, h, data, 1, 100)
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Go(func() { checkHTTPReads(t, h, data, uint64(g+10), 20) })
	}
	wg.Wait()
	if strings.Contains(h.name, "secret") {
		t.Fatalf("the URL's query leaks into messages: %s", h.name)
	}
}

func TestHTTPPinnedObjectChange(t *testing.T) {
	data := randomData(21, 1<<20)
	for _, etag := range []string{`"v1"`, ""} {
		t.Run("etag="+etag, func(t *testing.T) {
			mod := time.Unix(1700000000, 0)
			o := &object{data: data, etag: etag, modTime: mod}
			url := serveObject(t, o)
			h, err := OpenHTTP(context.Background(), url, httpFast)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			if etag == "" && h.SourceID() != "last-modified:"+mod.UTC().Format(http.TimeFormat)+";size:1048576" {
				t.Fatalf("id %q", h.SourceID())
			}
			checkHTTPReads(t, h, data, 2, 10)
			// Same size, new content, new validators.
			newData := randomData(22, 1<<20)
			o.replace(newData, strings.ReplaceAll(etag, "v1", "v2"), mod.Add(time.Hour))
			p := make([]byte, 8192)
			n, err := h.ReadAt(p, 4096)
			if !errors.Is(err, ErrSourceChanged) || n != 0 {
				t.Fatalf("read of a changed object: %d, %v", n, err)
			}
			h2, err := OpenHTTP(context.Background(), url, httpFast)
			if err != nil {
				t.Fatal(err)
			}
			defer h2.Close()
			if h2.SourceID() == h.SourceID() {
				t.Fatalf("a changed object has the same id %q", h.SourceID())
			}
		})
	}
}

func TestHTTPFallbacksAndErrors(t *testing.T) {
	data := randomData(23, 256<<10)
	// HEAD refused (a presigned GET URL): a ranged GET finds the size.
	o := &object{data: data, etag: `"x"`, modTime: time.Now(), noHead: true}
	h, err := OpenHTTP(context.Background(), serveObject(t, o), httpFast)
	if err != nil {
		t.Fatal(err)
	}
	checkHTTPReads(t, h, data, 3, 10)
	h.Close()

	// Transient 503s are retried.
	o = &object{data: data, etag: `"x"`, modTime: time.Now(), failNext: 3}
	h, err = OpenHTTP(context.Background(), serveObject(t, o), httpFast)
	if err != nil {
		t.Fatal(err)
	}
	o.mu.Lock()
	o.failNext = 2
	o.mu.Unlock()
	checkHTTPReads(t, h, data, 4, 5)
	if h.RemoteStats().Retries < 5 {
		t.Fatalf("stats %+v", h.RemoteStats())
	}
	h.Close()

	// No Range support: refused at open.
	o = &object{data: data, modTime: time.Now(), noRange: true}
	if _, err := OpenHTTP(context.Background(), serveObject(t, o), httpFast); err == nil || !strings.Contains(err.Error(), "Range") {
		t.Fatalf("a server without Range support: %v", err)
	}
	// 404: permanent, one attempt.
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	var tries atomic.Int64
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { tries.Add(1); http.NotFound(w, r) })
	if _, err := OpenHTTP(context.Background(), srv.URL+"/x", httpFast); err == nil || tries.Load() > 2 {
		t.Fatalf("404: %v after %d requests", err, tries.Load())
	}
	for _, bad := range []string{"http://", "ftp://x/y", "https:///nohost"} {
		if _, err := OpenHTTP(context.Background(), bad, httpFast); !errors.Is(err, ErrBadURI) {
			t.Errorf("%s: %v", bad, err)
		}
	}
}

func TestHTTPSVerifiesCertificates(t *testing.T) {
	data := randomData(24, 128<<10)
	o := &object{data: data, etag: `"t"`, modTime: time.Now()}
	srv := httptest.NewTLSServer(o)
	defer srv.Close()
	if _, err := OpenHTTP(context.Background(), srv.URL+"/d", httpFast); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("an unknown CA was accepted: %v", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	opts := httpFast
	opts.TLSConfig = &tls.Config{RootCAs: pool}
	h, err := OpenHTTP(context.Background(), srv.URL+"/d", opts)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	checkHTTPReads(t, h, data, 5, 10)
}

func TestParseContentRange(t *testing.T) {
	for _, tc := range []struct {
		s           string
		a, b, total int64
		bad         bool
	}{
		{s: "bytes 0-0/10", a: 0, b: 0, total: 10},
		{s: "bytes 5-9/*", a: 5, b: 9, total: -1},
		{s: "bytes 9-5/10", bad: true},
		{s: "items 0-1/2", bad: true},
		{s: "bytes 0-1", bad: true},
		{s: "bytes x-1/2", bad: true},
	} {
		a, b, total, err := parseContentRange(tc.s)
		if (err != nil) != tc.bad || !tc.bad && (a != tc.a || b != tc.b || total != tc.total) {
			t.Errorf("%q: %d %d %d %v", tc.s, a, b, total, err)
		}
	}
}

func TestOpenSourceDispatch(t *testing.T) {
	p := tempFile(t, make([]byte, 8192))
	r, err := OpenSource(context.Background(), p, SourceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := r.(*File); !ok {
		t.Fatalf("a path opened as %T", r)
	}
	r.Close()
	if _, err := OpenSource(context.Background(), "s3://bucket/key", SourceOptions{}); !errors.Is(err, ErrBadURI) {
		t.Fatalf("s3: %v", err)
	}
	o := &object{data: make([]byte, 4096), etag: `"e"`, modTime: time.Now()}
	r, err = OpenSource(context.Background(), serveObject(t, o), SourceOptions{HTTP: httpFast})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := r.(*HTTP); !ok {
		t.Fatalf("a URL opened as %T", r)
	}
	r.Close()
	s := newFakeNBD(t, make([]byte, 8192))
	r, err = OpenSource(context.Background(), s.uri(), SourceOptions{NBD: NBDOptions{Retry: fastRetry}})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := r.(*NBD); !ok {
		t.Fatalf("an NBD URI opened as %T", r)
	}
	r.Close()
}
