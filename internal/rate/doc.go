// Package rate estimates a hydration's throughput and time remaining from
// samples of bytes hydrated: the one estimator behind the progress bar
// (nbdclone wait --progress, status --watch) and the daemon's rate and
// ETA metrics, so both say the same thing.
//
// Invariants:
//
//  1. The rate is the progress between the oldest and the newest sample
//     of the last Window (never less than two samples): unknown (-1) until
//     two samples exist with time between them.
//  2. The ETA is remaining bytes over that rate: 0 when nothing remains,
//     unknown while the rate is unknown or zero.
//  3. Time comes from the caller (samples carry it): no clock inside.
package rate
