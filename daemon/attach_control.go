package daemon

import (
	"context"
	"net/http"
)

// attachRoutes serves the attachment routes (see controlHandler).
func (d *Daemon) attachRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/devices/{name}/attach", func(w http.ResponseWriter, req *http.Request) {
		var body attachRequest
		if !d.decode(w, req, &body) {
			return
		}
		at, err := d.att.attach(req.Context(), req.PathValue("name"), body)
		if err != nil {
			d.writeError(w, req, err)
			return
		}
		writeJSON(w, http.StatusOK, at)
	})
	mux.HandleFunc("GET /v1/attachments", func(w http.ResponseWriter, req *http.Request) {
		writeJSON(w, http.StatusOK, d.att.list())
	})
	mux.HandleFunc("POST /v1/detach", func(w http.ResponseWriter, req *http.Request) {
		var body detachRequest
		if !d.decode(w, req, &body) {
			return
		}
		d.reply(w, req, d.att.detach(req.Context(), body.Device, body.Force))
	})
}

// Attach connects the kernel's /dev/nbdX (device) to the export name; the
// daemon holds the connection, so it outlives the caller.
func (c *Client) Attach(ctx context.Context, name, device string, opts AttachOptions) (Attachment, error) {
	var at Attachment
	err := c.do(ctx, http.MethodPost, devPath(name, "attach"), attachRequest{Device: device, AttachOptions: opts}, &at)
	return at, err
}

// Detach disconnects /dev/nbdX. Without force it fails with ErrBusy while
// the device is mounted or held open.
func (c *Client) Detach(ctx context.Context, device string, force bool) error {
	return c.do(ctx, http.MethodPost, "/v1/detach", detachRequest{Device: device, Force: force}, nil)
}

// Attachments lists the /dev/nbdX attachments, by device number.
func (c *Client) Attachments(ctx context.Context) ([]Attachment, error) {
	var out []Attachment
	err := c.do(ctx, http.MethodGet, "/v1/attachments", nil, &out)
	return out, err
}

// LoadForce is Load; force loads a linear table over a clone that is not
// fully hydrated, which Load refuses.
func (c *Client) LoadForce(ctx context.Context, name, table, dir string, force bool) error {
	return c.do(ctx, http.MethodPost, devPath(name, "load"), loadRequest{Table: table, Dir: dir, Force: force}, nil)
}
