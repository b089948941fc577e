"""Events the sans-IO cores hand to the I/O shell (which logs them or acts on them)."""

from __future__ import annotations

from dataclasses import dataclass

from tunnel.frames import Config


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
    """Client: a new connection attempt starts (the shell opens a fresh socket)."""

    addr: tuple
    attempt: int


@dataclass
class PathUp:
    addr: tuple
    peer: str  # the peer certificate's common name
    cipher: str


@dataclass
class PathDown:
    addr: tuple
    reason: str


@dataclass
class Refused:
    """A peer was refused (bad certificate, unknown client, protocol error)."""

    addr: tuple
    reason: str


@dataclass
class ClientConnected:
    """Server: a client's tunnel exists now."""

    name: str
    address: str
    addr: tuple
    replaced: bool


@dataclass
class ClientGone:
    name: str
    address: str
    reason: str
