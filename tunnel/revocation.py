"""Which client certificates the server refuses although they verify (sans-IO).

Two sources: the serial numbers of a CRL signed by the CA (``crl`` in the
server config, read and checked by ``tunnel.certs.load_crl``) and client names
(certificate CNs) listed in ``deny``.  The server core asks :meth:`check` when a
client's handshake completes and again for every connected client when the
server reloads (SIGHUP); the files are read by the app layer, never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Revocation:
    serials: frozenset[int] = frozenset()  # revoked by the CRL
    names: frozenset[str] = frozenset()  # denied by the config

    def check(self, name: str, serial: Optional[int]) -> Optional[str]:
        """Why the client ``name`` with certificate ``serial`` is refused, or None."""
        if serial is not None and serial in self.serials:
            return f"client '{name}' revoked (CRL serial {serial:x})"
        if name in self.names:
            return f"client '{name}' denied by config"
        return None
