"""Events the sans-IO cores hand to the I/O shell (which logs them or acts on them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from tunnel.wire.frames import Config


@dataclass
class TunnelUp:
    """Client: the server sent CONFIG; configure the TUN device with it."""

    config: Config


@dataclass
class TunnelDown:
    """Client: the tunnel has no working path any more (it will reconnect)."""

    reason: str


@dataclass
class Connecting:
    """Client: a path starts a new session (the shell opens a fresh socket for ``key``)."""

    key: Hashable
    attempt: int


@dataclass
class PathJoined:
    """Client: a path carries the tunnel now (CONFIG arrived on it)."""

    key: Hashable
    name: str


@dataclass
class PathState:
    """A joined path changed state (up, degraded, down)."""

    key: Hashable
    name: str
    state: str


@dataclass
class PathUp:
    addr: Hashable  # client: the path key; server: the peer address
    peer: str  # the peer certificate's common name
    cipher: str


@dataclass
class PathDown:
    addr: Hashable
    reason: str


@dataclass
class Refused:
    """A peer was refused (bad certificate, unknown client, protocol error).  Reported at a
    bounded rate (tunnel/core/admission.py): ``unlogged`` refusals were counted, not reported, since
    the last one that was."""

    addr: tuple
    reason: str
    unlogged: int = 0


@dataclass
class ClientConnected:
    """Server: a client's tunnel exists now."""

    name: str
    address: str
    addr: tuple
    replaced: bool
    note: str = ""  # e.g. its certificate has another key than the tunnel it replaced


@dataclass
class ClientGone:
    name: str
    address: str
    reason: str


@dataclass
class LimitHit:
    """Server: a limit bit (max_tunnels, max_paths, handshake_rate, max_handshakes); reported at most every few seconds."""

    kind: str
    addr: Hashable
    reason: str


@dataclass(frozen=True)
class SpareKey:
    """Client: the key of a slot's spare session (NAT rebinding), a socket of its own."""

    base: Hashable


@dataclass
class Rebound:
    """Client: the spare session of path ``key`` joined the tunnel and replaced the silent
    one; its socket (opened for ``SpareKey(key)``) is now the path's socket."""

    key: Hashable
