package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/nbdclone/nbdclone/daemon"
)

const rootLong = `nbdclone is the Linux dm-clone target rebuilt in userspace, served over NBD.

One daemon (nbdclone serve) serves block devices over NBD. A "clone" device is
a writable one-to-one copy of a read-only source: usable at once, filled
("hydrated") from the source in the background region by region, and, once
full, swapped for a plain "linear" mapping of the destination while NBD
clients stay connected. The other commands mirror dmsetup and talk to the
daemon over its control socket.

Tables are dm table lines, one target per device, starting at sector 0
(sectors are 512 bytes):

  0 <length> clone <metadata> <destination> <source> <region size>
      [<#features> [no_hydration] [no_discard_passdown] [auto_linear]
      [<#core args> [hydration_threshold <n>] [hydration_batch_size <n>]]]
  0 <length> linear <device> <offset>

<metadata> is the clone's metadata store (a directory, created if missing),
<destination> a file or block device and <source> a read-only file or block
device, each at least <length> sectors long; <region size> is in sectors (a
power of 2, 8 to 2097152). <device> and <offset> of a linear table are a file
or block device and a sector offset into it. Relative paths are resolved
against the directory you run nbdclone in.

Each device is exported under its own name, for example
  nbd+unix:///NAME?socket=/run/nbdclone/nbd.sock

Errors are printed as "nbdclone: <message>" on stderr, with dm-clone's own
text for table and message errors, and the exit status is 1.`

const rootExample = `  nbdclone serve &
  nbdclone create clone --table "0 2097152 clone ./md ./dest.img /dev/sdb 8 1 no_hydration"
  nbdcopy 'nbd+unix:///clone?socket=/run/nbdclone/nbd.sock' copy.img
  nbdclone message clone 0 enable_hydration
  nbdclone status clone --watch      # or: nbdclone wait clone --progress
  nbdclone events clone --until hydrated
  nbdclone suspend clone
  nbdclone load clone --table "0 2097152 linear ./dest.img 0"
  nbdclone resume clone`

// cli holds the state shared by the commands of one invocation.
type cli struct {
	env     *env
	control string
}

func newRootCmd(e *env) *cobra.Command {
	c := &cli{env: e}
	root := &cobra.Command{
		Use:           "nbdclone",
		Short:         "dm-clone in userspace, served over NBD",
		Long:          rootLong,
		Example:       rootExample,
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.CompletionOptions.DisableDefaultCmd = true
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return &usageError{cmd: cmd.CommandPath(), err: err}
	})
	defControl := e.getenv(daemon.ControlEnv)
	if defControl == "" {
		defControl = daemon.DefaultControl
	}
	root.PersistentFlags().StringVar(&c.control, "control", defControl,
		"control socket of the daemon; $"+daemon.ControlEnv+" sets the default")

	root.AddCommand(
		c.serveCmd(),
		c.createCmd(),
		c.loadCmd(),
		c.suspendCmd(),
		c.resumeCmd(),
		c.messageCmd(),
		c.statusCmd(),
		c.tableCmd(),
		c.removeCmd(),
		c.lsCmd(),
		c.waitCmd(),
		c.eventsCmd(),
		c.attachCmd(),
		c.detachCmd(),
		c.showCmd(),
		c.redirectCmd(),
		c.splitCmd(),
	)
	return root
}

// args checks the positional argument count, with a usage error naming
// what is missing.
func args(min, max int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if len(a) < min || (max >= 0 && len(a) > max) {
			return &usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("%s: want %s", cmd.Name(), what)}
		}
		return nil
	}
}

func (c *cli) dial() (*daemon.Client, error) {
	return daemon.Dial(c.control)
}

// withClient runs fn with a client of the daemon.
func (c *cli) withClient(ctx context.Context, fn func(*daemon.Client) error) error {
	cl, err := c.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	return fn(cl)
}

// tableArg returns the table from --table, or from stdin when it is not a
// terminal (as dmsetup reads it).
func (c *cli) tableArg(cmd *cobra.Command, flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if isTerminal(c.env.stdin) {
		return "", &usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("%s: no table: give --table LINE or pipe the table line on stdin", cmd.Name())}
	}
	data, err := io.ReadAll(io.LimitReader(c.env.stdin, 1<<20))
	if err != nil {
		return "", fmt.Errorf("reading the table from stdin: %w", err)
	}
	line := strings.TrimSpace(string(data))
	if line == "" {
		return "", &usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("%s: no table: give --table LINE or pipe the table line on stdin", cmd.Name())}
	}
	return line, nil
}

func (c *cli) cwd() (string, error) {
	dir, err := c.env.getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	return dir, nil
}

const tableHelp = `The table is one dm table line (see "nbdclone help"), given with --table or,
when --table is absent, read from stdin. Relative paths in it are resolved
against the current directory.`

func (c *cli) createCmd() *cobra.Command {
	var table string
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a device from a table and resume it",
		Long: `Create device NAME from a table, resume it and export it over NBD as NAME
(like dmsetup create). Constructor errors (dm-clone's text, e.g. "Region size
is not a power of 2") fail the command and nothing is created. The device and
its table are recorded in the daemon's state directory and come back when the
daemon restarts.

NAME is 1 to 64 characters of A-Z a-z 0-9 _ . + - (not "." or "..").

` + tableHelp,
		Example: `  nbdclone create clone --table "0 2097152 clone ./md ./dest.img ./src.img 8"
  echo "0 2097152 linear /dev/sdb 0" | nbdclone create plain`,
		Args: args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			line, err := c.tableArg(cmd, table)
			if err != nil {
				return err
			}
			dir, err := c.cwd()
			if err != nil {
				return err
			}
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				_, err := cl.Create(cmd.Context(), a[0], line, dir)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&table, "table", "", "the table line (default: read from stdin)")
	return cmd
}

func (c *cli) loadCmd() *cobra.Command {
	var (
		table string
		force bool
	)
	cmd := &cobra.Command{
		Use:   "load NAME",
		Short: "Load a table into a device's inactive slot",
		Long: `Load a table as the inactive table of device NAME (like dmsetup load); the
next "nbdclone resume NAME" swaps it in while NBD clients stay connected. The
table is built now, so constructor errors come out here, except for a clone
table on the same metadata store as the live clone (that store is in use until
the swap): it is built at resume, and if it fails then, the old table is
restored and resume reports the error. Loading again replaces the inactive
table. The length must equal the device's: NBD clients cannot see a size
change.

A linear table over a clone that is not fully hydrated is refused: the
destination's unhydrated regions hold whatever was there before, not the
source's data. Wait for hydration ("nbdclone wait NAME"), or give --force.

` + tableHelp,
		Example: `  nbdclone suspend clone
  nbdclone load clone --table "0 2097152 linear ./dest.img 0"
  nbdclone resume clone`,
		Args: args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			line, err := c.tableArg(cmd, table)
			if err != nil {
				return err
			}
			dir, err := c.cwd()
			if err != nil {
				return err
			}
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				return cl.LoadForce(cmd.Context(), a[0], line, dir, force)
			})
		},
	}
	cmd.Flags().StringVar(&table, "table", "", "the table line (default: read from stdin)")
	cmd.Flags().BoolVar(&force, "force", false, "load a linear table over a clone that is not fully hydrated, or a table over other data on a device other devices read (dev:NAME)")
	return cmd
}

func (c *cli) suspendCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "suspend NAME",
		Short: "Suspend a device: hold new I/O, drain I/O in flight, commit metadata",
		Long: `Suspend device NAME (like dmsetup suspend). New NBD requests wait (they do
not fail) until resume; requests in flight are allowed to finish; then the
target stops background hydration, waits for the copies in flight and commits
its metadata. If the requests in flight do not finish within --timeout, the
device is left running and the command fails. Suspending a suspended device
does nothing.`,
		Example: `  nbdclone suspend clone --timeout 1m`,
		Args:    args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				return cl.Suspend(cmd.Context(), a[0], timeout)
			})
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", daemon.DefaultSuspendTimeout, "how long to wait for I/O in flight to drain")
	return cmd
}

func (c *cli) resumeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "resume NAME",
		Short: "Resume a device, swapping in its loaded table if any",
		Long: `Resume device NAME (like dmsetup resume). If a table was loaded, the device is
suspended first if it is not, the old table is closed and the new one takes
its place; NBD requests held during the swap then go to the new table, so
clients never notice. If the new table fails to build, the old one is
restored and resumed, and the command fails with the error. A device that
failed to come back after a daemon restart is rebuilt from its table.`,
		Example: `  nbdclone resume clone`,
		Args:    args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				return cl.Resume(cmd.Context(), a[0])
			})
		},
	}
}

func (c *cli) messageCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "message NAME SECTOR ARGS...",
		Short: "Send a message to a device's target",
		Long: `Send a message to the target of device NAME (like dmsetup message). SECTOR
must be 0 (one target per device). The clone target understands:

  enable_hydration              start background hydration
  disable_hydration             stop it (copies in flight finish, none start)
  hydration_threshold <n>       at most n regions copied at once (0 pauses)
  hydration_batch_size <n>      copy up to n contiguous regions per copy

Anything else fails with "Unsupported message". Messages change the status
line, not the table.`,
		Example: `  nbdclone message clone 0 enable_hydration
  nbdclone message clone 0 hydration_threshold 64`,
		Args: args(3, -1, "NAME SECTOR ARGS..."),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				return cl.Message(cmd.Context(), a[0], a[1], a[2:])
			})
		},
	}
	// Message arguments may look like flags.
	cmd.Flags().SetInterspersed(false)
	return cmd
}

func outputFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVarP(p, "output", "o", "text", "output format: text or json")
}

func checkOutput(cmd *cobra.Command, o string) error {
	if o != "text" && o != "json" {
		return &usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("%s: unknown output format %q (want text or json)", cmd.Name(), o)}
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *cli) statusCmd() *cobra.Command {
	var output string
	var watch bool
	cmd := &cobra.Command{
		Use:   "status [NAME]",
		Short: "Print the status of one device or of every device",
		Long: `Print the status line of device NAME exactly as dmsetup status prints it:

  clone:  0 <len> clone <md block size> <used>/<total md blocks> <region size>
          <hydrated>/<total regions> <hydrating> <#features> <features>*
          4 hydration_threshold <n> hydration_batch_size <m> <rw|ro>
          (or "Fail" in place of all that after "clone" when metadata failed)
  linear: 0 <len> linear

Sizes are in sectors. Like dm-clone, asking for the status of a clone commits
its metadata first (unless the device is suspended).

Without NAME, one line per device: "NAME: <status line>".

With -o json, the device and a structured snapshot of its target (regions,
hydration, metadata mode, counters) are printed instead; that never commits
metadata.

With --watch, follow clone device NAME's hydration instead: a live progress
bar (percent, rate in MiB/s over the last 10 seconds, ETA, and why hydration
waits, if it does) on a terminal, or a progress line every 5 seconds when
stdout is not one. It ends when hydration completes, or on Ctrl-C (exit 0);
unlike "wait --progress" it keeps watching through stopped or disabled
hydration.`,
		Example: `  nbdclone status clone
  nbdclone status -o json clone
  nbdclone status clone --watch`,
		Args: args(0, 1, "at most one NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if err := checkOutput(cmd, output); err != nil {
				return err
			}
			ctx := cmd.Context()
			out := c.env.stdout
			if watch && (len(a) != 1 || output == "json") {
				return &usageError{cmd: cmd.CommandPath(), err: errors.New("status: --watch wants one NAME and text output")}
			}
			return c.withClient(ctx, func(cl *daemon.Client) error {
				if watch {
					return watchProgress(ctx, cl, a[0], out, time.Now)
				}
				if len(a) == 1 {
					if output == "json" {
						st, err := cl.Info(ctx, a[0])
						if err != nil {
							return err
						}
						return writeJSON(out, st)
					}
					line, err := cl.Status(ctx, a[0])
					if err != nil {
						return err
					}
					_, err = fmt.Fprintln(out, line)
					return err
				}
				devs, err := cl.List(ctx)
				if err != nil {
					return err
				}
				if output == "json" {
					all := []daemon.DeviceStatus{}
					for _, d := range devs {
						st, err := cl.Info(ctx, d.Name)
						if err == nil {
							all = append(all, st)
						}
					}
					return writeJSON(out, all)
				}
				if len(devs) == 0 {
					fmt.Fprintln(out, "No devices found")
					return nil
				}
				var failed []string
				for _, d := range devs {
					line, err := cl.Status(ctx, d.Name)
					switch {
					case errors.Is(err, daemon.ErrNotFound):
						continue // removed meanwhile
					case err != nil:
						fmt.Fprintf(c.env.stderr, "nbdclone: %s: %s\n", d.Name, err)
						failed = append(failed, d.Name)
						continue
					}
					fmt.Fprintf(out, "%s: %s\n", d.Name, line)
				}
				if len(failed) > 0 {
					return fmt.Errorf("no status for %s", strings.Join(failed, ", "))
				}
				return nil
			})
		},
	}
	outputFlag(cmd, &output)
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "follow hydration with a progress bar until it completes")
	return cmd
}

func (c *cli) tableCmd() *cobra.Command {
	var inactive bool
	cmd := &cobra.Command{
		Use:   "table [NAME]",
		Short: "Print the table of one device or of every device",
		Long: `Print the live table of device NAME as dmsetup table does: "0 <len> <type>"
and the constructor arguments as given, except that paths are shown absolute
and cleaned (a clone's <metadata>, <destination> and <source>, a linear
table's <device>): relative ones are resolved against the directory the table
was given in. Messages do not change the table. With --inactive, the loaded
table not yet resumed (nothing if none). Without NAME, one line per device:
"NAME: <table>".`,
		Example: `  nbdclone table clone
  nbdclone table --inactive clone`,
		Args: args(0, 1, "at most one NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			ctx := cmd.Context()
			out := c.env.stdout
			return c.withClient(ctx, func(cl *daemon.Client) error {
				if len(a) == 1 {
					line, err := cl.Table(ctx, a[0], inactive)
					if err != nil || line == "" {
						return err
					}
					_, err = fmt.Fprintln(out, line)
					return err
				}
				devs, err := cl.List(ctx)
				if err != nil {
					return err
				}
				if len(devs) == 0 {
					fmt.Fprintln(out, "No devices found")
					return nil
				}
				for _, d := range devs {
					line, err := cl.Table(ctx, d.Name, inactive)
					switch {
					case errors.Is(err, daemon.ErrNotFound):
						continue
					case err != nil:
						return err
					case line == "":
						continue
					}
					fmt.Fprintf(out, "%s: %s\n", d.Name, line)
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&inactive, "inactive", false, "print the loaded (inactive) table instead of the live one")
	return cmd
}

func (c *cli) removeCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove a device",
		Long: `Remove device NAME (like dmsetup remove): it stops being exported, its I/O is
drained, its target suspended (committing metadata) and closed, and it is
forgotten by the state directory. The destination and metadata files stay.
While NBD clients are connected it fails with "device NAME is busy: N NBD
connection(s)", unless --force, which disconnects them first.`,
		Example: `  nbdclone remove clone
  nbdclone remove --force clone`,
		Args: args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				return cl.Remove(cmd.Context(), a[0], force)
			})
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "disconnect NBD clients instead of refusing")
	return cmd
}

func (c *cli) lsCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List devices with their NBD export URI, state and connections",
		Long: `List every device: its name, the NBD URI it is exported at, its state and
the number of open NBD connections.

States: active (serving I/O), suspended (I/O held until resume) and failed
(the device could not be rebuilt when the daemon started, or lost its table;
the ERROR column says why; fix the cause and "nbdclone resume NAME", load a
new table and resume, or remove it).`,
		Example: `  nbdclone ls
  nbdclone ls -o json`,
		Args: args(0, 0, "no arguments"),
		RunE: func(cmd *cobra.Command, a []string) error {
			if err := checkOutput(cmd, output); err != nil {
				return err
			}
			ctx := cmd.Context()
			return c.withClient(ctx, func(cl *daemon.Client) error {
				devs, err := cl.List(ctx)
				if err != nil {
					return err
				}
				if output == "json" {
					return writeJSON(c.env.stdout, devs)
				}
				return printList(c.env.stdout, devs)
			})
		},
	}
	outputFlag(cmd, &output)
	return cmd
}

func printList(w io.Writer, devs []daemon.Device) error {
	if len(devs) == 0 {
		_, err := fmt.Fprintln(w, "No devices found")
		return err
	}
	anyFailed, anyAttached := false, false
	for _, d := range devs {
		anyFailed = anyFailed || d.State == daemon.StateFailed
		anyAttached = anyAttached || d.Attached != ""
	}
	var buf strings.Builder
	tw := tabwriter.NewWriter(&buf, 0, 8, 2, ' ', 0)
	header := "NAME\tEXPORT\tSTATE\tCONNECTIONS"
	if anyAttached {
		header += "\tATTACHED"
	}
	if anyFailed {
		header += "\tERROR"
	}
	fmt.Fprintln(tw, header)
	for _, d := range devs {
		uri := "-"
		if len(d.URIs) > 0 {
			uri = d.URIs[0]
		}
		row := fmt.Sprintf("%s\t%s\t%s\t%d", d.Name, uri, d.State, d.Connections)
		if anyAttached {
			row += "\t" + cmp.Or(d.Attached, "-")
		}
		if anyFailed {
			row += "\t" + d.Error
		}
		fmt.Fprintln(tw, row)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// An empty last cell leaves padding behind.
	for line := range strings.Lines(buf.String()) {
		if _, err := fmt.Fprintln(w, strings.TrimRight(line, " \n")); err != nil {
			return err
		}
	}
	return nil
}

func (c *cli) waitCmd() *cobra.Command {
	var progress bool
	cmd := &cobra.Command{
		Use:   "wait NAME",
		Short: "Wait until a clone device is fully hydrated",
		Long: `Block until every region of clone device NAME is hydrated and that is
committed (like dmsetup wait for dm-clone's completion event), then exit 0.
Returns at once for a linear device. Fails if hydration cannot finish: the
metadata is in Fail mode, hydration stopped after repeated copy errors, or
the device is removed. Background hydration must be enabled
("nbdclone message NAME 0 enable_hydration") for a clone created with
no_hydration to finish.

With --progress, draw a live progress bar (percent, rate in MiB/s, ETA) on a
terminal, or print a progress line every 5 seconds when stdout is not one.`,
		Example: `  nbdclone wait clone --progress && nbdclone suspend clone`,
		Args:    args(1, 1, "NAME"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				if !progress {
					_, err := cl.Wait(cmd.Context(), a[0])
					return err
				}
				return waitProgress(cmd.Context(), cl, a[0], c.env.stdout, time.Now)
			})
		},
	}
	cmd.Flags().BoolVar(&progress, "progress", false, "show hydration progress")
	return cmd
}

func (c *cli) absPath(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	if dir, err := c.env.getwd(); err == nil {
		return filepath.Join(dir, p)
	}
	return p
}
