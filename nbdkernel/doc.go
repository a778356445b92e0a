// Package nbdkernel connects the Linux kernel's NBD client (/dev/nbdX) to
// an NBD export: the newstyle handshake on a socket, then the socket handed
// to the kernel through the nbd generic-netlink family (CONNECT, RECONFIGURE,
// DISCONNECT, STATUS), the interface nbd-client itself uses.
//
// Invariants:
//
//  1. The kernel only gets a socket whose handshake finished with
//     NBD_OPT_GO, and exactly the transmission flags the server advertised
//     there (FLUSH, FUA, TRIM, multi-conn): the kernel then sends FLUSH and
//     TRIM, which go-nbd's ioctl client never enables.
//  2. Nothing here reads past the server's final ACK: the socket's next
//     byte belongs to the kernel.
//  3. Every device is tagged with a backend identifier; a reconnect after a
//     daemon restart (RECONFIGURE) names it, and the kernel refuses a
//     device whose identifier differs, so a restart never grabs another
//     tool's /dev/nbdX.
//  4. Errors are sentinels (ErrNoModule, ErrBusy, ErrNoDevice, ...) with the
//     text a user can act on.
package nbdkernel
