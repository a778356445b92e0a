package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/nbdclone/nbdclone/daemon"
)

func (c *cli) eventsCmd() *cobra.Command {
	var output string
	var until []string
	cmd := &cobra.Command{
		Use:   "events [NAME]",
		Short: "Print the daemon's events as they happen",
		Long: `Print the daemon's events, of device NAME only if given, one line each as
they happen, until interrupted (Ctrl-C) or until an event named by --until.
Like dmsetup wait, but for every event and with what happened:

  created restored removed failed loaded suspended resumed swapped
  attached detached hydrated hydration_stopped hydration_resumed
  mode_changed linear auto_linear_failed

A text line is "<local time> <type> <device>[ nbd=/dev/nbdX][: <detail>]".
With -o json, each event is one JSON object per line (NDJSON): seq, time,
type, device, nbd, table (the live table after the event), detail.

Events are numbered (seq) from the daemon's start. A reader too slow to keep
up loses events rather than slowing the daemon down: a "lost" line (type
"lost", with the count in "lost") marks where. NAME need not exist yet:
"nbdclone events clone --until created" waits for it.`,
		Example: `  nbdclone events
  nbdclone events clone --until hydrated,hydration_stopped
  nbdclone events -o json | jq -c 'select(.type == "hydrated")'`,
		Args: args(0, 1, "at most one NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if err := checkOutput(cmd, output); err != nil {
				return err
			}
			name := ""
			if len(a) == 1 {
				name = a[0]
			}
			ctx := cmd.Context()
			return c.withClient(ctx, func(cl *daemon.Client) error {
				return printEvents(ctx, cl, name, output == "json", until, func(s string) error {
					_, err := fmt.Fprintln(c.env.stdout, s)
					return err
				})
			})
		},
	}
	outputFlag(cmd, &output)
	cmd.Flags().StringSliceVar(&until, "until", nil, "exit 0 after printing an event of one of these types (comma-separated)")
	return cmd
}

// printEvents streams events to print until ctx ends (a clean exit) or an
// event of a type in until was printed.
func printEvents(ctx context.Context, cl *daemon.Client, name string, asJSON bool, until []string, print func(string) error) error {
	stream, err := cl.Events(ctx, name)
	if err != nil {
		return err
	}
	defer stream.Close()
	for {
		ev, err := stream.Next()
		if err != nil {
			if ctx.Err() != nil && errors.Is(err, context.Canceled) {
				return nil // interrupted: the normal end
			}
			return err
		}
		line := ev.String()
		if asJSON {
			b, err := json.Marshal(ev)
			if err != nil {
				return fmt.Errorf("encoding event %d: %w", ev.Seq, err)
			}
			line = string(b)
		}
		if err := print(line); err != nil {
			return err
		}
		if slices.ContainsFunc(until, func(k string) bool { return strings.EqualFold(strings.TrimSpace(k), ev.Kind) }) {
			return nil
		}
	}
}
