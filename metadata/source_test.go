package metadata

import (
	"errors"
	"slices"
	"testing"
)

// TestSetSource: a redirect's new source is durable, the old one is kept
// in PreviousSources, and the pin is cleared so the new source's identity
// is taken at the next open; a pin taken by a table on the old source
// (after a crash) is cleared by recording the new source again.
func TestSetSource(t *testing.T) {
	dir := t.TempDir()
	open := func(source, id string) (*Store, error) {
		return Open(Options{Dir: dir, TargetSize: 1 << 20, RegionSize: 4096, Source: source, SourceSize: 1 << 20, SourceID: id})
	}
	s, err := open("dev:a", "dev:a@1")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetSource("/golden"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := s.SetSource("/x"); !errors.Is(err, ErrClosed) {
		t.Fatalf("SetSource after Close: %v", err)
	}
	// The old table comes back (the crash window): pins the parent again.
	s, err = open("dev:a", "dev:a@1")
	if err != nil {
		t.Fatal(err)
	}
	if sb := s.Superblock(); sb.Source != "/golden" || sb.SourceID != "dev:a@1" || !slices.Equal(sb.PreviousSources, []string{"dev:a"}) {
		t.Fatalf("superblock %+v", sb)
	}
	if err := s.SetSource("/golden"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = open("/golden", "etag-1")
	if err != nil {
		t.Fatalf("opening on the recorded source: %v", err)
	}
	if sb := s.Superblock(); sb.Source != "/golden" || sb.SourceID != "etag-1" || !slices.Equal(sb.PreviousSources, []string{"dev:a"}) {
		t.Fatalf("superblock %+v", sb)
	}
	s.Close()
	if _, err := open("/golden", "etag-2"); !errors.Is(err, ErrSourceChanged) {
		t.Fatalf("a changed source after the redirect: %v", err)
	}
}
