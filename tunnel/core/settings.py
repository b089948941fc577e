"""Settings of the sans-IO cores: every tunable default lives here, once.

Why a module of its own: the same numbers used to be written in the config
loader, in the cores' constructors and in the path, and they disagreed (a path's
timeout 10 s against 3 s everywhere else; idle probing off in the cores, on in
the config).  Now the config loader reads TOML into these frozen dataclasses
(``tunnel/app/config.py``: ``ServerConfig.settings()``, ``ClientConfig.settings()``)
and the cores take them whole; tests build them with ``dataclasses.replace``.
Constants that are not configurable (protocol timers, admission mechanics) stay
beside the code that uses them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional

PROBE_INTERVAL = 0.1  # seconds between PINGs on a path with traffic
DEAD_INTERVAL = 0.3  # no PONG for this long: the path is down
IDLE_PROBE_INTERVAL = 0.5  # PINGs of an idle tunnel (no DATA for a second), at most
TIMEOUT = 3.0  # silence that ends a session which carries no tunnel; the server's CONFIG says it
HANDSHAKE_TIMEOUT = 10.0  # a client's DTLS handshake is given up after this
DEDUP_WINDOW = 4096  # tunnel sequence numbers remembered for duplicate suppression
LINGER = 30.0  # seconds the server keeps a tunnel without paths for its client to come back
MAX_TUNNELS = 1024
MAX_PATHS = 8  # per tunnel
HANDSHAKE_RATE = 10.0  # verified handshakes per second per source prefix (burst: twice that)
MAX_HANDSHAKES = 256  # half-open (verified, not yet established) handshakes at once, all sources
PENDING_QUEUE = 3  # packets held per tunnel while none of its paths is up
PENDING_EXPIRY = 10.0  # seconds such a packet is held at most


def fitted_idle_probe_interval(probe: float, dead: float, timeout: float) -> float:
    """The idle probe interval when none is configured: IDLE_PROBE_INTERVAL, but an idle
    path's dead interval (stretched by the same factor) stays at half the timeout."""
    return max(probe, min(IDLE_PROBE_INTERVAL, probe * timeout / (2 * dead)))


@dataclass(frozen=True)
class PathSettings:
    """How every path probes and when it gives up (both roles)."""

    probe_interval: float = PROBE_INTERVAL
    dead_interval: float = DEAD_INTERVAL
    idle_probe_interval: Optional[float] = IDLE_PROBE_INTERVAL  # None: always probe every probe_interval
    timeout: float = TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT


@dataclass(frozen=True)
class ClientSettings:
    """A client core's settings (``[client]`` in client.toml)."""

    mode: str = "duplicate"  # without a policy file: the one class's scheduling mode
    redundancy: int = 2  # redundant mode: copies per packet
    pin_flows: bool = False  # balance: one flow stays on one path
    dedup_window: int = DEDUP_WINDOW
    path: PathSettings = field(default_factory=PathSettings)


@dataclass(frozen=True)
class Limits:
    """What one server grants: tunnels, paths, handshakes, packets held (``[server]`` limits)."""

    max_tunnels: int = MAX_TUNNELS
    max_paths: int = MAX_PATHS
    handshake_rate: float = HANDSHAKE_RATE
    max_handshakes: int = MAX_HANDSHAKES
    pending_queue: int = PENDING_QUEUE
    pending_expiry: float = PENDING_EXPIRY


@dataclass(frozen=True)
class ServerSettings:
    """A server core's settings (``[server]`` and ``[clients]`` in server.toml)."""

    datagram_mtu: int  # the largest UDP payload the underlay carries
    inner_mtu: int  # the TUN's MTU, told to clients in CONFIG
    routes: tuple[ipaddress._BaseNetwork, ...] = ()  # prefixes every client routes into the tunnel
    mode: str = "client"  # "client": the mode each client asks for in HELLO
    dedup_window: int = DEDUP_WINDOW
    linger: float = LINGER
    allowed_clients: Optional[frozenset[str]] = None  # None: any client with a certificate from our CA
    client_routes: dict[str, list] = field(default_factory=dict)  # name -> prefixes the client routes (its LAN)
    client_to_client: bool = False
    unknown_destination: str = "drop"  # or "icmp": an unreachable for packets with no route
    path: PathSettings = field(default_factory=PathSettings)
    limits: Limits = field(default_factory=Limits)
