package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
)

// eventRoutes serves the event stream:
//
//	GET /v1/events[?device=NAME]   NDJSON, one Event per line, until the
//	                               client leaves or the daemon stops
//
// The reply's headers are sent once the subscription is in place: every
// event raised after the client saw them is in the stream (or counted in
// an EventLost). NAME need not exist yet.
func (d *Daemon) eventRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/events", func(w http.ResponseWriter, req *http.Request) {
		device := req.URL.Query().Get("device")
		if device != "" {
			if err := validName(device); err != nil {
				d.writeError(w, req, err)
				return
			}
		}
		sub := d.bus.subscribe(device, 0)
		defer d.bus.unsubscribe(sub)
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		if err := rc.Flush(); err != nil {
			return
		}
		enc := json.NewEncoder(w)
		for {
			select {
			case ev := <-sub.C():
				if err := enc.Encode(ev); err != nil {
					return // the client left
				}
				if len(sub.C()) == 0 {
					if err := rc.Flush(); err != nil {
						return
					}
				}
			case <-req.Context().Done():
				return
			}
		}
	})
}

// EventStream is an open `nbdclone events` stream.
type EventStream struct {
	body   io.ReadCloser
	lines  *bufio.Scanner
	cancel context.CancelFunc
}

// Events subscribes to the daemon's events, of device name only unless
// name is "". It returns once the subscription is in place: every event
// raised from then on is read by Next, in order (or reported as an
// EventLost when this reader falls too far behind).
func (c *Client) Events(ctx context.Context, name string) (*EventStream, error) {
	p := "/v1/events"
	if name != "" {
		p += "?device=" + url.QueryEscape(name)
	}
	ctx, cancel := context.WithCancel(ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://nbdclone"+p, nil)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		cancel()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, c.unreachable(err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		cancel()
		return nil, decodeError(resp)
	}
	lines := bufio.NewScanner(resp.Body)
	lines.Buffer(make([]byte, 64<<10), maxRequestBody)
	return &EventStream{body: resp.Body, lines: lines, cancel: cancel}, nil
}

// Next blocks for the next event. It fails with ctx's error once the
// stream's context ends, and with ErrUnreachable when the daemon ends it
// (it stopped).
func (s *EventStream) Next() (Event, error) {
	if !s.lines.Scan() {
		err := s.lines.Err()
		if err == nil {
			err = io.EOF
		}
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return Event{}, err
		}
		return Event{}, &opError{kind: ErrUnreachable, cause: err, msg: "the nbdclone daemon ended the event stream (it stopped)"}
	}
	var ev Event
	if err := json.Unmarshal(s.lines.Bytes(), &ev); err != nil {
		return Event{}, fmt.Errorf("%w: bad event from the daemon: %w", ErrInternal, err)
	}
	return ev, nil
}

// Close ends the stream.
func (s *EventStream) Close() error {
	s.cancel()
	return s.body.Close()
}
