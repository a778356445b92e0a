package blockdev

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Errors of remote sources. Test with errors.Is.
var (
	// ErrTimeout: a remote call did not complete within its timeout.
	ErrTimeout = errors.New("blockdev: remote call timed out")
	// ErrSourceChanged: a pinned remote object (an http(s) source) is no
	// longer the one the clone was made from. Never retried.
	ErrSourceChanged = errors.New("blockdev: the remote source changed since it was opened")
	// ErrProtocol: a remote server broke its protocol (a reply that does not
	// match the request). The connection is dropped and the call retried.
	ErrProtocol = errors.New("blockdev: protocol error")
)

// RetryPolicy bounds the attempts of one remote call: transient failures
// (timeouts, dropped connections, server errors that may pass) are retried
// after an exponential backoff with full jitter, until MaxAttempts or
// Timeout, whichever comes first. Permanent errors are returned at once.
type RetryPolicy struct {
	// MaxAttempts is the number of attempts of one call, the first
	// included. 0 means 6.
	MaxAttempts int
	// Backoff is the first pause; each further pause doubles it, up to
	// MaxBackoff. Each pause is drawn uniformly from [pause/2, pause].
	// 0 means 50 ms and 2 s.
	Backoff, MaxBackoff time.Duration
	// Timeout bounds the whole call, every attempt and pause included: no
	// call ever takes longer. 0 means 60 s.
	Timeout time.Duration
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.MaxAttempts <= 0 {
		p.MaxAttempts = 6
	}
	if p.Backoff <= 0 {
		p.Backoff = 50 * time.Millisecond
	}
	if p.MaxBackoff <= 0 {
		p.MaxBackoff = 2 * time.Second
	}
	if p.Timeout <= 0 {
		p.Timeout = 60 * time.Second
	}
	return p
}

// pause is the jittered backoff before attempt n+1 (n ≥ 1 attempts made).
func (p RetryPolicy) pause(n int) time.Duration {
	d := p.Backoff << min(n-1, 30)
	if d <= 0 || d > p.MaxBackoff {
		d = p.MaxBackoff
	}
	// Jitter: many copies failing together must not retry together.
	return d/2 + rand.N(d/2+1)
}

// permanentError marks an error that retrying cannot fix.
type permanentError struct{ err error }

func (e permanentError) Error() string { return e.err.Error() }
func (e permanentError) Unwrap() error { return e.err }

// permanent wraps err so retry returns it at once.
func permanent(err error) error {
	if err == nil {
		return nil
	}
	return permanentError{err}
}

func isPermanent(err error) bool {
	var p permanentError
	return errors.As(err, &p) || errors.Is(err, ErrSourceChanged)
}

// retry runs fn until it succeeds, fails permanently, or the policy gives
// up. fn gets a context bounded by the call's Timeout. onRetry (optional)
// is told about each failed attempt that will be retried.
func retry(ctx context.Context, p RetryPolicy, what string, fn func(ctx context.Context) error, onRetry func(attempt int, err error)) error {
	ctx, cancel := context.WithTimeout(ctx, p.Timeout)
	defer cancel()
	var err error
	for attempt := 1; ; attempt++ {
		err = fn(ctx)
		if err == nil {
			return nil
		}
		if isPermanent(err) {
			return err
		}
		if ctx.Err() != nil {
			break
		}
		if attempt >= p.MaxAttempts {
			return fmt.Errorf("%s: giving up after %d attempts: %w", what, attempt, err)
		}
		if onRetry != nil {
			onRetry(attempt, err)
		}
		t := time.NewTimer(p.pause(attempt))
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
		if ctx.Err() != nil {
			break
		}
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w after %v: %w", what, ErrTimeout, p.Timeout, err)
	}
	return fmt.Errorf("%s: %w (last error: %w)", what, ctx.Err(), err)
}
