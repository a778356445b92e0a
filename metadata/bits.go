package metadata

import "math/bits"

func trailingZeros(x uint64) int { return bits.TrailingZeros64(x) }

func onesCount(x uint64) int { return bits.OnesCount64(x) }
