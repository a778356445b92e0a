package main

import (
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/nbdclone/nbdclone/daemon"
)

func (c *cli) attachCmd() *cobra.Command {
	var opts daemon.AttachOptions
	cmd := &cobra.Command{
		Use:   "attach NAME /dev/nbdX",
		Short: "Attach a device to a kernel NBD block device (/dev/nbdX)",
		Long: `Attach device NAME to the kernel's NBD block device /dev/nbdX (the nbd
module must be loaded: modprobe nbd). The daemon makes the connections and
holds them, so /dev/nbdX stays attached after this command exits, across
suspend/load/resume (table swaps are invisible to the kernel), and across a
daemon restart: the attachment is recorded in the state directory, the
kernel holds the device's I/O while the daemon is away (up to
--dead-timeout) and the restarted daemon reconnects it.

The kernel is told everything the export can do (FLUSH, FUA, TRIM,
multi-connection), so fsync, fstrim and blkdiscard reach the clone. The
logical block size is the clone's region size, at most 4096, unless
--block-size says otherwise.

--timeout 0 (the default) never fails a slow request: requests wait while
the device is suspended. With a timeout, a suspend longer than it breaks
the connection.

Fails when /dev/nbdX is already connected (by nbd-client or another
attach), when NAME is already attached, or without the nbd module. "nbdclone
ls" shows the attachment; "nbdclone detach /dev/nbdX" ends it.`,
		Example: `  modprobe nbd
  nbdclone attach clone /dev/nbd0
  mount /dev/nbd0 /mnt`,
		Args: args(2, 2, "NAME /dev/nbdX"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				at, err := cl.Attach(cmd.Context(), a[0], a[1], opts)
				if err != nil {
					return err
				}
				_, err = fmt.Fprintln(c.env.stdout, at.Device)
				return err
			})
		},
	}
	f := cmd.Flags()
	f.IntVar(&opts.Connections, "connections", 1, "NBD connections the kernel spreads requests over (1 to 16)")
	opts.DeadTimeout = daemon.DefaultDeadTimeout
	f.Var((*seconds)(&opts.Timeout), "timeout", "fail requests not answered in this long, in seconds or as a duration (default 0: never)")
	f.Var((*seconds)(&opts.DeadTimeout), "dead-timeout", "how long the kernel holds I/O while the daemon is away (restarting), in seconds or as a duration")
	f.Uint32Var(&opts.BlockSize, "block-size", 0, "logical block size of /dev/nbdX: 512, 1024, 2048 or 4096 (default: the region size, at most 4096)")
	return cmd
}

func (c *cli) detachCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "detach /dev/nbdX",
		Short: "Detach a kernel NBD block device attached by nbdclone attach",
		Long: `Detach /dev/nbdX: the kernel disconnects and the device goes away; the
nbdclone device stays (remove it with "nbdclone remove"). Refused while
/dev/nbdX is mounted or held open exclusively, unless --force (the kernel
then fails the I/O it still has queued).`,
		Example: `  umount /mnt && nbdclone detach /dev/nbd0`,
		Args:    args(1, 1, "/dev/nbdX"),
		RunE: func(cmd *cobra.Command, a []string) error {
			return c.withClient(cmd.Context(), func(cl *daemon.Client) error {
				return cl.Detach(cmd.Context(), a[0], force)
			})
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "detach even while /dev/nbdX is in use")
	return cmd
}

// seconds is a duration flag that also takes a bare number of seconds, as
// nbd-client's -timeout does.
type seconds time.Duration

func (s *seconds) String() string { return time.Duration(*s).String() }
func (s *seconds) Type() string   { return "seconds" }

func (s *seconds) Set(v string) error {
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		*s = seconds(time.Duration(n) * time.Second)
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return fmt.Errorf("want seconds or a duration such as 2m, not %q", v)
	}
	*s = seconds(d)
	return nil
}
