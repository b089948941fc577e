"""The TUN device: python-pytun opens it, the shell reads and writes its fd.

The fd is put in non-blocking mode so one wakeup can drain every queued packet
(read until EAGAIN).  Addresses, MTU and routes are set through netlink
(tunnel.netlink), never here.
"""

from __future__ import annotations

import os

import pytun


class TunDevice:
    def __init__(self, name: str = "mptun%d"):
        # IFF_NO_PI: packets are bare IP, no 4-byte packet-information header.
        self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        self.name: str = self._dev.name
        self.fd: int = self._dev.fileno()
        os.set_blocking(self.fd, False)

    def close(self) -> None:
        """Closing the fd removes a non-persistent device from the kernel."""
        if self._dev is not None:
            self._dev.close()
            self._dev = None
