package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"time"
)

// Control API request bodies.
type (
	createRequest struct {
		Name  string `json:"name"`
		Table string `json:"table"`
		// Dir resolves relative paths in the table: the CLI's working
		// directory.
		Dir string `json:"dir"`
	}
	loadRequest struct {
		Table string `json:"table"`
		Dir   string `json:"dir"`
		// Force loads a linear table over a clone not fully hydrated.
		Force bool `json:"force,omitempty"`
	}
	suspendRequest struct {
		// TimeoutMillis bounds the drain of in-flight I/O; 0 is the
		// daemon's default (30 s).
		TimeoutMillis int64 `json:"timeout_ms"`
	}
	messageRequest struct {
		Sector string   `json:"sector"`
		Args   []string `json:"args"`
	}
	errorResponse struct {
		Error string `json:"error"`
		Kind  string `json:"kind"`
	}
)

const maxRequestBody = 1 << 20

// errorKinds maps sentinels to the wire "kind" and HTTP status, in the
// order errors.Is tries them.
var errorKinds = []struct {
	err    error
	kind   string
	status int
}{
	{ErrNotFound, "not_found", http.StatusNotFound},
	{ErrFailed, "failed", http.StatusConflict},
	{ErrInvalid, "invalid", http.StatusBadRequest},
	{ErrExists, "exists", http.StatusConflict},
	{ErrBusy, "busy", http.StatusConflict},
	{ErrTimeout, "timeout", http.StatusGatewayTimeout},
	{ErrClosed, "closed", http.StatusServiceUnavailable},
	{context.Canceled, "canceled", http.StatusServiceUnavailable},
	{context.DeadlineExceeded, "timeout", http.StatusGatewayTimeout},
	{ErrInternal, "internal", http.StatusInternalServerError},
}

// controlHandler serves the control API. Requests and replies are JSON
// unless noted; errors are {"error": text, "kind": kind} with the status of
// errorKinds, and text is exactly what the CLI prints.
//
//	GET    /v1/devices                      list: []Device
//	POST   /v1/devices                      create {name, table, dir}: 201 Device
//	GET    /v1/devices/{name}               Device
//	DELETE /v1/devices/{name}[?force=1]     remove: 204
//	POST   /v1/devices/{name}/load          {table, dir, force}: 204
//	POST   /v1/devices/{name}/suspend       {timeout_ms}: 204
//	POST   /v1/devices/{name}/resume        204
//	POST   /v1/devices/{name}/message       {sector, args}: 204
//	GET    /v1/devices/{name}/status        the dm status line (text/plain)
//	GET    /v1/devices/{name}/status?format=json   DeviceStatus (no metadata commit)
//	GET    /v1/devices/{name}/table[?inactive=1]   the dm table line (text/plain)
//	POST   /v1/devices/{name}/wait          long poll until hydrated: target.Info
//	POST   /v1/devices/{name}/attach        {device, connections, ...}: Attachment
//	GET    /v1/attachments                  []Attachment
//	POST   /v1/detach                       {device, force}: 204
//	GET    /v1/devices/{name}/family        Family (show)
//	POST   /v1/devices/{name}/redirect      {"source": the new source}
//	POST   /v1/devices/{name}/split         204 once linear
func (d *Daemon) controlHandler() http.Handler {
	r := d.reg
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/devices", func(w http.ResponseWriter, req *http.Request) {
		writeJSON(w, http.StatusOK, r.list())
	})
	mux.HandleFunc("POST /v1/devices", func(w http.ResponseWriter, req *http.Request) {
		var body createRequest
		if !d.decode(w, req, &body) {
			return
		}
		if err := r.create(req.Context(), body.Name, body.Table, body.Dir); err != nil {
			d.writeError(w, req, err)
			return
		}
		dev, err := r.get(body.Name)
		if err != nil {
			d.writeError(w, req, err)
			return
		}
		writeJSON(w, http.StatusCreated, r.summary(dev))
	})
	mux.HandleFunc("GET /v1/devices/{name}", func(w http.ResponseWriter, req *http.Request) {
		dev, err := r.get(req.PathValue("name"))
		if err != nil {
			d.writeError(w, req, err)
			return
		}
		writeJSON(w, http.StatusOK, r.summary(dev))
	})
	mux.HandleFunc("DELETE /v1/devices/{name}", func(w http.ResponseWriter, req *http.Request) {
		force := isTrue(req.URL.Query().Get("force"))
		d.reply(w, req, r.remove(req.Context(), req.PathValue("name"), force))
	})
	mux.HandleFunc("POST /v1/devices/{name}/load", func(w http.ResponseWriter, req *http.Request) {
		var body loadRequest
		if !d.decode(w, req, &body) {
			return
		}
		d.reply(w, req, r.loadForce(req.Context(), req.PathValue("name"), body.Table, body.Dir, body.Force))
	})
	mux.HandleFunc("POST /v1/devices/{name}/suspend", func(w http.ResponseWriter, req *http.Request) {
		var body suspendRequest
		if !d.decode(w, req, &body) {
			return
		}
		timeout := time.Duration(body.TimeoutMillis) * time.Millisecond
		d.reply(w, req, r.suspend(req.Context(), req.PathValue("name"), timeout))
	})
	mux.HandleFunc("POST /v1/devices/{name}/resume", func(w http.ResponseWriter, req *http.Request) {
		d.reply(w, req, r.resume(req.Context(), req.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/devices/{name}/message", func(w http.ResponseWriter, req *http.Request) {
		var body messageRequest
		if !d.decode(w, req, &body) {
			return
		}
		d.reply(w, req, r.message(req.Context(), req.PathValue("name"), body.Sector, body.Args))
	})
	mux.HandleFunc("GET /v1/devices/{name}/status", func(w http.ResponseWriter, req *http.Request) {
		name := req.PathValue("name")
		if req.URL.Query().Get("format") == "json" {
			st, err := r.info(req.Context(), name)
			if err != nil {
				d.writeError(w, req, err)
				return
			}
			writeJSON(w, http.StatusOK, st)
			return
		}
		line, err := r.statusLine(req.Context(), name)
		if err != nil {
			d.writeError(w, req, err)
			return
		}
		writeText(w, line)
	})
	mux.HandleFunc("GET /v1/devices/{name}/table", func(w http.ResponseWriter, req *http.Request) {
		inactive := isTrue(req.URL.Query().Get("inactive"))
		line, err := r.tableLine(req.Context(), req.PathValue("name"), inactive)
		if err != nil {
			d.writeError(w, req, err)
			return
		}
		writeText(w, line)
	})
	mux.HandleFunc("POST /v1/devices/{name}/wait", func(w http.ResponseWriter, req *http.Request) {
		info, err := r.wait(req.Context(), req.PathValue("name"))
		if err != nil {
			d.writeError(w, req, err)
			return
		}
		writeJSON(w, http.StatusOK, info)
	})
	d.attachRoutes(mux)
	d.eventRoutes(mux) // GET /v1/events: the event stream (events_control.go)
	d.familyRoutes(mux)
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		writeJSON(w, http.StatusNotFound, errorResponse{Error: "no such control API route: " + req.Method + " " + req.URL.Path, Kind: "not_found"})
	})
	return mux
}

func isTrue(v string) bool {
	switch strings.ToLower(v) {
	case "1", "true", "yes":
		return true
	}
	return false
}

// decode reads a JSON body (an empty body is the zero value).
func (d *Daemon) decode(w http.ResponseWriter, req *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, req.Body, maxRequestBody))
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		d.writeError(w, req, wrapErr(ErrInvalid, err, "bad request body"))
		return false
	}
	return true
}

func (d *Daemon) reply(w http.ResponseWriter, req *http.Request, err error) {
	if err != nil {
		d.writeError(w, req, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) writeError(w http.ResponseWriter, req *http.Request, err error) {
	if cause := context.Cause(req.Context()); errors.Is(cause, ErrClosed) && errors.Is(err, context.Canceled) {
		err = cause // cancelled by the shutdown, not by the client
	}
	resp := errorResponse{Error: err.Error(), Kind: "internal"}
	status := http.StatusInternalServerError
	for _, k := range errorKinds {
		if errors.Is(err, k.err) {
			resp.Kind, status = k.kind, k.status
			break
		}
	}
	level := d.log.Info
	if status >= 500 && req.Context().Err() == nil {
		level = d.log.Error
	}
	level("control request failed", "method", req.Method, "path", req.URL.Path, "status", status, "err", err)
	writeJSON(w, status, resp)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeText(w http.ResponseWriter, line string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, line+"\n")
}
