package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/nbdclone/nbdclone/daemon"
)

func (c *cli) showCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "show NAME",
		Short: "Show a device's clone family: source chain, children, hydration, space used",
		Long: `Show where device NAME sits in its clone family: the chain of sources above it
(dev:NAME for a device of this daemon, up to the root path or URI) and its
depth, the devices that read it (its children: while it has any it is
read-only and cannot be removed), how much is hydrated, the hydration mode
(enabled, disabled, stopped, complete, or linear), and the space the
destination really takes (st_blocks × 512: a sparse destination costs only
what was written or hydrated).`,
		Example: `  nbdclone show b
  nbdclone show -o json b`,
		Args: args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if err := checkOutput(cmd, output); err != nil {
				return err
			}
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				f, err := cl.Family(cmd.Context(), a[0])
				if err != nil {
					return err
				}
				if output == "json" {
					return writeJSON(c.env.stdout, f)
				}
				return printFamily(c.env.stdout, f)
			})
		},
	}
	outputFlag(cmd, &output)
	return cmd
}

func printFamily(w io.Writer, f daemon.Family) error {
	var b strings.Builder
	fmt.Fprintf(&b, "name:        %s (%s, %s)\n", f.Name, f.Type, f.State)
	chain := "-"
	if len(f.Chain) > 0 {
		chain = strings.Join(f.Chain, " <- ")
	}
	fmt.Fprintf(&b, "sources:     %s\n", chain)
	fmt.Fprintf(&b, "depth:       %d\n", f.Depth)
	children := "-"
	if len(f.Children) > 0 {
		children = strings.Join(f.Children, ", ")
	}
	fmt.Fprintf(&b, "children:    %s\n", children)
	if f.Regions > 0 {
		fmt.Fprintf(&b, "hydrated:    %.1f%% (%d/%d regions)\n", 100*f.HydratedFraction, f.HydratedRegions, f.Regions)
	} else {
		fmt.Fprintf(&b, "hydrated:    %.1f%%\n", 100*f.HydratedFraction)
	}
	fmt.Fprintf(&b, "hydration:   %s\n", f.Hydration)
	if f.Destination != "" {
		fmt.Fprintf(&b, "destination: %s\n", f.Destination)
	}
	fmt.Fprintf(&b, "allocated:   %d bytes of %d\n", f.AllocatedBytes, f.SizeBytes)
	switch sc := f.SourceCache; {
	case sc == nil:
	case sc.CapacityBytes == 0:
		fmt.Fprintf(&b, "source:      reader shared by %d clone(s), no cache (serve --source-cache)\n", sc.Users)
	default:
		fmt.Fprintf(&b, "source:      reader shared by %d clone(s), cache %d/%d bytes, this device %d hits %d misses\n",
			sc.Users, sc.UsedBytes, sc.CapacityBytes, sc.DeviceHits, sc.DeviceMisses)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func (c *cli) redirectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "redirect NAME",
		Short: "Detach a clone of a device onto that device's own source",
		Long: `Detach device NAME, whose table reads another device of this daemon
(<source dev> dev:PARENT), from PARENT: every region PARENT holds (hydrated or
written) that NAME has not hydrated is copied into NAME while NAME serves I/O,
then NAME is suspended briefly and its source switched to PARENT's own source.
The switch is recorded in NAME's metadata, then the new table is saved in the
state directory. NAME reads the same before and after; PARENT can then be
removed. Prints the new source.`,
		Example: `  nbdclone redirect b && nbdclone remove a`,
		Args:    args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				src, err := cl.Redirect(cmd.Context(), a[0])
				if err != nil {
					return err
				}
				_, err = fmt.Fprintln(c.env.stdout, src)
				return err
			})
		},
	}
}

func (c *cli) splitCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "split NAME",
		Short: "Hydrate a clone fully and swap it to linear",
		Long: `Make device NAME independent of its whole source chain: every region not yet
hydrated is copied now (with priority, whatever the hydration settings), the
metadata is committed, and the device is swapped live to "linear
<destination> 0" as auto_linear does (NBD clients stay connected). Returns at
once for a linear device.`,
		Example: `  nbdclone split b`,
		Args:    args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				return cl.Split(cmd.Context(), a[0])
			})
		},
	}
}
