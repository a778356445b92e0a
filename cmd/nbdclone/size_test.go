package main

import "testing"

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "4096": 4096, "64K": 64 << 10, "256M": 256 << 20, "256MiB": 256 << 20, "1g": 1 << 30,
		"2GB": 2 << 30, "1T": 1 << 40, " 8M ": 8 << 20, "512B": 512,
	} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "M", "1X", "1.5G", "99999999999T"} {
		if got, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", bad, got)
		}
	}
}
