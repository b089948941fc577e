"""Which client certificates the server refuses although they verify (sans-IO).

Two sources: the serial numbers of a CRL signed by the CA (``crl`` in the
server config, read and checked by ``tunnel.app.certs.load_crl``) and client names
(certificate CNs) listed in ``deny``.  The server core asks :meth:`check` when a
client's handshake completes and again for every connected client when the
server reloads (SIGHUP); the files are read by the app layer, never here.

A CRL past its nextUpdate may miss revocations made since (the CA promised a new
one by then).  ``crl_expired`` in the server config says what the server does
about it:

- ``"warn"`` (the default): the stale CRL is still used; ``status`` and /metrics
  show it expired (``mptun_crl_expired 1``), the server logs it when it loads it.
- ``"refuse"``: fail closed for *new* handshakes: every handshake that completes
  while the CRL is expired is refused (the peer gets a CLOSE saying why, the log a
  rate-limited line), so no certificate is admitted on revocation data the CA no
  longer vouches for.  Tunnels already up are kept: they were admitted on a CRL
  that was current then, and closing every client because a re-signing job was
  late would turn a paperwork lapse into an outage the operator can only end
  by re-signing anyway.  New paths, rebinds and reconnects of those tunnels need
  a handshake, so they are refused too; a fresh CRL and SIGHUP end it, and the
  reload closes the tunnels of any client the fresh CRL revokes.

Time here is the wall clock (nextUpdate is a calendar time), injected as ``clock``
by the app layer (tunnel/app/server.py passes ``time.time``), so tests need not wait for
a CRL to expire; a ``next_update`` without a ``clock`` is a programming error.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable, Optional

CRL_EXPIRED = ("warn", "refuse")  # values of the server config's crl_expired (the first is the default)


@dataclass(frozen=True)
class Revocation:
    serials: frozenset[int] = frozenset()  # revoked by the CRL
    names: frozenset[str] = frozenset()  # denied by the config
    crl: Optional[str] = None  # the CRL file (None: no CRL configured)
    next_update: Optional[float] = None  # the CRL's nextUpdate, Unix time (None: none, or it gives none)
    crl_expired: str = CRL_EXPIRED[0]  # what an expired CRL means for handshakes (see above)
    clock: Optional[Callable[[], float]] = field(default=None, compare=False, repr=False)  # wall clock

    def __post_init__(self) -> None:
        if self.crl_expired not in CRL_EXPIRED:
            raise ValueError(f"crl_expired must be one of {', '.join(CRL_EXPIRED)}, not {self.crl_expired!r}")
        if self.next_update is not None and self.clock is None:
            raise ValueError("a CRL's next_update needs a wall clock to tell when it expires")

    def expired(self) -> bool:
        """Is the CRL past its nextUpdate now?"""
        return self.next_update is not None and self.clock is not None and self.clock() >= self.next_update

    def check(self, name: str, serial: Optional[int], handshake: bool = True) -> Optional[str]:
        """Why the client ``name`` with certificate ``serial`` is refused, or None.

        ``handshake``: asked for a handshake that just completed (True) or for a client
        already connected (False, a reload): an expired CRL with ``crl_expired = "refuse"``
        refuses the first only (see the module's docstring)."""
        if serial is not None and serial in self.serials:
            return f"client '{name}' revoked (CRL serial {serial:x})"
        if name in self.names:
            return f"client '{name}' denied by config"
        if handshake and self.crl_expired == "refuse" and self.expired():
            return (f"the server's CRL is past its nextUpdate ({self.next_update_text()}): "
                    f"no new handshakes until it is re-signed (crl_expired = \"refuse\")")
        return None

    def next_update_text(self) -> str:
        if self.next_update is None:
            return "none"
        return f"{dt.datetime.fromtimestamp(self.next_update, dt.timezone.utc):%Y-%m-%d %H:%M} UTC"

    def stats(self) -> dict:
        """For status and /metrics (``crl``: None when no CRL is configured)."""
        crl = None
        if self.crl is not None:
            crl = {"file": self.crl, "revoked": len(self.serials), "next_update": self.next_update,
                   "expired": self.expired(), "on_expiry": self.crl_expired}
        return {"crl": crl, "denied": len(self.names)}
