"""The TUN device: /dev/net/tun is opened early, the interface made later.

Opening the clone device and creating the interface are two steps on purpose.
The client makes its TUN only on the first CONFIG, after it may have dropped
privileges (tunnel/app/privs.py) to a user who cannot open /dev/net/tun where the
node is mode 0600 (several distributions, containers and hardened hosts ship it
so): CAP_NET_ADMIN allows TUNSETIFF but not opening a node the user has no
permission on.  So the daemon opens the clone device at start (:class:`TunClone`,
while still root) and creates the interface on that descriptor when it needs
it.  The interface then lives as long as the daemon: a reconnect reuses it, and
closing its descriptor (at exit) removes it from the kernel.

python-pytun (used before) opens /dev/net/tun and issues TUNSETIFF in one call
and cannot take a descriptor opened earlier, so TUNSETIFF is issued here with
fcntl.ioctl and a packed ``struct ifreq``: a few lines, one path for both roles.

The fd is in non-blocking mode so one wakeup can drain every queued packet
(read until EAGAIN).  Addresses, MTU and routes are set through netlink
(tunnel.io.netlink), never here.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Optional

CLONE_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), <linux/if_tun.h>
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # packets are bare IP, no 4-byte packet-information header
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name, ifr_flags, the rest of the 40-byte union


class TunError(OSError):
    """The TUN device cannot be opened or made (one line: what and why; the CLI prints it)."""


class TunClone:
    """/dev/net/tun opened now; a :class:`TunDevice` made on it later takes the descriptor."""

    def __init__(self, path: str = CLONE_DEVICE):
        try:
            self.fd: Optional[int] = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            hint = " (load the tun module: modprobe tun)" if exc.errno == 2 else ""
            raise TunError(exc.errno, f"cannot open {path}: {exc.strerror}{hint}") from None

    def attach(self, name: str) -> tuple[int, str]:
        """TUNSETIFF (needs CAP_NET_ADMIN): the fd and the kernel's name for the new
        interface; the caller owns the fd from now on.  On failure the clone stays
        open, so a later call can try again."""
        if self.fd is None:
            raise ValueError("the TUN clone descriptor was used or closed already")
        if len(name.encode()) >= IFNAMSIZ:
            raise TunError(f"TUN name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        try:
            ifr = fcntl.ioctl(self.fd, TUNSETIFF, _IFREQ.pack(name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as exc:
            raise TunError(exc.errno, f"cannot create TUN device {name!r}: {exc.strerror}") from None
        fd, self.fd = self.fd, None
        return fd, _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()

    def close(self) -> None:
        """Close the descriptor if no device was made on it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class TunDevice:
    """A TUN interface and its non-blocking fd, made on ``clone`` (opened earlier) or on
    a fresh open of /dev/net/tun."""

    def __init__(self, name: str = "mptun%d", clone: Optional[TunClone] = None):
        own = clone is None
        if clone is None:
            clone = TunClone()
        try:
            self.fd, self.name = clone.attach(name)
        finally:
            if own:
                clone.close()
        self._open = True

    def close(self) -> None:
        """Closing the fd removes a non-persistent device from the kernel."""
        if self._open:
            self._open = False
            os.close(self.fd)
