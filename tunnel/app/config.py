"""Server and client configuration: TOML in, validated dataclasses out.

Every error names the file and the key (``server.toml: [server] listen: ...``)
so a user can fix it without reading code.  Relative paths are resolved
against the config file's directory.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from tunnel.core.policy import Policy, PolicyError, parse_policy
from tunnel.core.scheduler import MODES
from tunnel.core.settings import (
    DEAD_INTERVAL,
    DEDUP_WINDOW,
    HANDSHAKE_RATE,
    IDLE_PROBE_INTERVAL,
    LINGER,
    MAX_HANDSHAKES,
    MAX_PATHS,
    MAX_TUNNELS,
    PENDING_EXPIRY,
    PENDING_QUEUE,
    PROBE_INTERVAL,
    TIMEOUT,
    ClientSettings,
    Limits,
    PathSettings,
    ServerSettings,
    fitted_idle_probe_interval,
)

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem; str() is one line naming file and key."""


def _settings(cls, config, **given):
    """A settings dataclass ``cls`` (tunnel/core/settings.py): each field the config has under the
    same name is copied, ``given`` sets the others, and the rest keep their defaults."""
    names = [f.name for f in fields(cls) if f.name not in given and hasattr(config, f.name)]
    return cls(**{name: getattr(config, name) for name in names}, **given)


@dataclass(kw_only=True)
class _DaemonConfig:
    """What both daemons' configs have: identity files, TUN, path timing, logging, control."""

    path: Path
    certificate: Path
    key: Path
    ca: Path
    tun: str = "mptun0"
    probe_interval: float = PROBE_INTERVAL
    dead_interval: float = DEAD_INTERVAL
    idle_probe_interval: float = IDLE_PROBE_INTERVAL  # probes of an idle tunnel (no DATA for a second), tunnel/core/estimator.py
    timeout: float = TIMEOUT
    dedup_window: int = DEDUP_WINDOW
    policy: Optional[Path] = None
    log_format: str = "text"
    metrics: Optional[tuple[str, int]] = None
    log_level: str = "info"
    control: Optional[Path] = None
    user: Optional[str] = None  # drop to this user after set-up (keeping only what the role uses: tunnel/app/privs.py)
    group: Optional[str] = None
    keep_warm: bool = True  # a dummy pass over the packet path before a periodic packet is due (tunnel/core/warm.py)


@dataclass(kw_only=True)
class ServerConfig(_DaemonConfig):
    listen: list[tuple[str, int]]
    address: ipaddress.IPv4Interface
    pool_first: Optional[ipaddress.IPv4Address] = None
    pool_last: Optional[ipaddress.IPv4Address] = None
    mtu: Optional[int] = None
    routes: list = field(default_factory=list)
    mode: str = ServerSettings.mode
    linger: float = LINGER
    client_to_client: bool = ServerSettings.client_to_client
    unknown_destination: str = ServerSettings.unknown_destination
    limits: Limits = field(default_factory=Limits)  # max_tunnels, max_paths, handshake_rate, ... pending_expiry
    client_routes: dict[str, list] = field(default_factory=dict)  # name -> prefixes the client routes
    allow_unlisted_clients: bool = True
    clients: dict[str, Optional[ipaddress.IPv4Address]] = field(default_factory=dict)  # name -> static address
    crl: Optional[Path] = None  # CRL signed by the CA: revoked client certificates (reloaded on SIGHUP)
    crl_expired: str = "warn"  # a CRL past its nextUpdate: "warn" or "refuse" new handshakes (tunnel/core/revocation.py)
    deny: list[str] = field(default_factory=list)  # client names refused (reloaded on SIGHUP)
    pool6: Optional[ipaddress.IPv6Network] = None  # IPv6 inside the tunnel: one /128 per client from this prefix
    static_addresses6: dict[str, ipaddress.IPv6Address] = field(default_factory=dict)  # [clients.NAME] address6

    @property
    def static_addresses(self) -> dict[str, ipaddress.IPv4Address]:
        return {name: a for name, a in self.clients.items() if a is not None}

    def settings(self, datagram_mtu: int, inner_mtu: int) -> ServerSettings:
        """The server core's settings; the MTUs come from the underlay, known only at start-up."""
        return _settings(
            ServerSettings, self,
            datagram_mtu=datagram_mtu,
            inner_mtu=inner_mtu,
            routes=tuple(self.routes),
            allowed_clients=None if self.allow_unlisted_clients else frozenset(self.clients),
            path=_settings(PathSettings, self),
        )


@dataclass(kw_only=True)
class ClientConfig(_DaemonConfig):
    servers: list[tuple[str, int]]
    server_name: str
    interfaces: list[str] = field(default_factory=list)  # empty: every usable interface
    mode: str = ClientSettings.mode
    redundancy: int = ClientSettings.redundancy
    pin_flows: bool = ClientSettings.pin_flows

    def settings(self) -> ClientSettings:
        """The client core's settings."""
        return _settings(ClientSettings, self, path=_settings(PathSettings, self))


class _Section:
    """Reads keys of one table, remembering which were used, with errors that say where."""

    def __init__(self, path: Path, name: str, table: Any):
        self.path, self.name = path, name
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.table = table
        self.used: set[str] = set()

    def error(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.name}] {key}: {msg}")

    def get(self, key: str, kind, default: Any = ..., what: str = ""):
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.error(key, "missing (required)")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"expected {what or getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def file(self, key: str) -> Path:
        value = self.get(key, str, what="a file path")
        p = Path(value)
        if not p.is_absolute():
            p = self.path.parent / p
        try:
            exists = p.exists()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            raise self.error(key, f"not a usable file path: {exc}") from None
        if not exists:
            raise self.error(key, f"file {p} not found")
        if not os.access(p, os.R_OK):
            raise self.error(key, f"file {p} is not readable")
        return p

    def seconds(self, key: str, default: float) -> float:
        v = self.get(key, float, default, what="seconds (a number)")
        if not 0.01 <= v <= 3600:
            raise self.error(key, f"{v} is out of range (0.01 to 3600 seconds)")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.get(key, int, default, what="an integer")
        if not lo <= v <= hi:
            raise self.error(key, f"{v} is out of range ({lo} to {hi})")
        return v

    def choice(self, key: str, default: str, choices: tuple) -> str:
        v = self.get(key, str, default)
        if v not in choices:
            raise self.error(key, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def read_toml(path: str | Path, error: type[Exception] = ConfigError, kind: str = "") -> tuple[Path, dict]:
    """The file's path and its tables; ``error`` (one line naming the file) if it cannot be
    read or parsed.  ``kind`` names what a directory given instead is not ("policy file");
    without it a directory is a read error like any other."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return p, tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{p}: file not found") from None
    except PermissionError:
        raise error(f"{p}: not readable") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise error(f"{p}: not UTF-8 text") from None
    except OSError as exc:  # a directory, an I/O error
        if kind and isinstance(exc, IsADirectoryError):
            raise error(f"{p}: is a directory, not a {kind}") from None
        raise error(f"{p}: cannot read: {exc.strerror or exc}") from None


_load = read_toml  # the lab's scenario loader reads its files with the config's errors too


def load_policy(path: str | Path) -> Policy:
    """A policy file (docs/POLICY.md); a bad one raises PolicyError naming the file and key."""
    p, data = read_toml(path, PolicyError, "policy file")
    return parse_policy(data, str(p))


def _endpoint(sec: _Section, key: str, value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise sec.error(key, f"expected \"host:port\", got {value!r}")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host:
            raise sec.error(key, f"no host in {value!r}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise sec.error(key, f"bad port in {value!r}")
    return host, int(port)


def _common(sec: _Section) -> dict:
    level = sec.get("log_level", str, "info")
    if level not in LOG_LEVELS:
        raise sec.error("log_level", f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
    tun = sec.get("tun", str, "mptun0")
    if not 0 < len(tun) <= 15 or "/" in tun or " " in tun:
        raise sec.error("tun", f"{tun!r} is not a valid interface name (1-15 chars)")
    control = sec.get("control", str, None)
    probe = sec.seconds("probe_interval", PROBE_INTERVAL)
    dead = sec.seconds("dead_interval", DEAD_INTERVAL)
    if dead < 2 * probe:
        raise sec.error("dead_interval", f"{dead} s must be at least twice probe_interval ({probe} s)")
    policy = sec.file("policy") if "policy" in sec.table else None
    metrics = sec.get("metrics", str, None, what='"ADDR:PORT"')
    if metrics is not None:
        from tunnel.app.metrics import parse_metrics_address

        try:
            metrics = parse_metrics_address(metrics)
        except ValueError as exc:
            raise sec.error("metrics", str(exc)) from None
    timeout = sec.seconds("timeout", TIMEOUT)
    if timeout < dead:
        raise sec.error("timeout", f"{timeout} s must not be shorter than dead_interval ({dead} s)")
    # idle: the dead interval stretches with the probe interval and must stay below timeout
    # (half of it by default; a given value is checked, the default is fitted)
    if "idle_probe_interval" in sec.table:
        idle = sec.seconds("idle_probe_interval", IDLE_PROBE_INTERVAL)
        if idle < probe:
            raise sec.error("idle_probe_interval", f"{idle} s must not be shorter than probe_interval ({probe} s)")
        idle_dead = round(idle * dead / probe, 6)
        if idle_dead >= timeout:
            raise sec.error("idle_probe_interval", f"{idle} s makes an idle path's dead interval "
                            f"{idle_dead:g} s (x dead_interval / probe_interval), not below timeout ({timeout} s)")
    else:
        idle = fitted_idle_probe_interval(probe, dead, timeout)
    return {
        "certificate": sec.file("certificate"),
        "key": sec.file("key"),
        "ca": sec.file("ca"),
        "tun": tun,
        "probe_interval": probe,
        "dead_interval": dead,
        "idle_probe_interval": idle,
        "timeout": timeout,
        "dedup_window": sec.integer("dedup_window", DEDUP_WINDOW, 64, 1 << 20),
        "policy": policy,
        "metrics": metrics,
        "log_format": sec.choice("log_format", "text", ("text", "json")),
        "log_level": level,
        "control": Path(control) if control else None,
        "keep_warm": sec.get("keep_warm", bool, True),
        **_privileges(sec),
    }


def _privileges(sec: _Section) -> dict:
    """``user`` / ``group``: who the daemon becomes after set-up; both must exist here."""
    import grp
    import pwd

    user = sec.get("user", str, None, what="a user name")
    group = sec.get("group", str, None, what="a group name")
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise sec.error("user", f"no such user {user!r}") from None
    if group is not None:
        if user is None:
            raise sec.error("group", "needs user too (group alone does not drop privileges)")
        try:
            grp.getgrnam(group)
        except KeyError:
            raise sec.error("group", f"no such group {group!r}") from None
    return {"user": user, "group": group}


def _only_tables(path: Path, data: dict, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{path}: unknown table or key '{key}' (expected {', '.join(sorted(allowed))})")


def _main_table(path: str | Path, name: str, allowed: set[str]) -> tuple[Path, dict, _Section]:
    """The file, its tables, and the one table that must be there (``[server]``, ``[client]``)."""
    p, data = _load(path)
    _only_tables(p, data, allowed | {name})
    if name not in data:
        raise ConfigError(f"{p}: missing [{name}] table")
    return p, data, _Section(p, name, data[name])


def _endpoints(sec: _Section, key: str) -> list[tuple[str, int]]:
    """A "host:port" or a non-empty list of them."""
    raw = sec.get(key, (str, list), what='"host:port" or a list of them')
    out = [_endpoint(sec, key, v) for v in (raw if isinstance(raw, list) else [raw])]
    if not out:
        raise sec.error(key, "empty list")
    return out


def _prefixes(sec: _Section, key: str, pool6: Optional[ipaddress.IPv6Network]) -> list:
    """A list of prefixes; IPv6 ones only with pool6 (the tunnel carries IPv6 only then)."""
    out = []
    for r in sec.get(key, list, []):
        try:
            out.append(ipaddress.IPv4Network(r) if pool6 is None else ipaddress.ip_network(r))
        except (ValueError, TypeError) as exc:
            raise sec.error(key, f"{r!r}: {exc}" + ("" if pool6 is not None or ":" not in str(r)
                                                    else " (IPv6 routes need pool6)")) from None
    return out


def load_server_config(path: str | Path) -> ServerConfig:
    p, data, sec = _main_table(path, "server", {"clients"})
    listen = _endpoints(sec, "listen")
    for host, _ in listen:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise sec.error("listen", f"{host!r} is not an IP address (the server binds to addresses)") from None
    addr_raw = sec.get("address", str, what='an inner address with prefix, like "100.64.0.1/24"')
    try:
        address = ipaddress.IPv4Interface(addr_raw)
    except ValueError as exc:
        raise sec.error("address", str(exc)) from None
    if address.network.prefixlen > 30:
        raise sec.error("address", f"{address.network} has no room for clients")
    first = last = None
    pool = sec.get("pool", str, None)
    if pool is not None:
        try:
            lo, _, hi = pool.partition("-")
            first, last = ipaddress.IPv4Address(lo.strip()), ipaddress.IPv4Address(hi.strip())
        except ValueError:
            raise sec.error("pool", f'expected "FIRST-LAST" addresses, got {pool!r}') from None
        if first not in address.network or last not in address.network or first > last:
            raise sec.error("pool", f"{pool} is not a range inside {address.network}")
    mtu = sec.get("mtu", int, None)
    if mtu is not None and not 576 <= mtu <= 65535:
        raise sec.error("mtu", f"{mtu} is out of range (576 to 65535)")
    pool6 = None
    raw6 = sec.get("pool6", str, None, what='an IPv6 prefix, like "fd00:6d70::/64"')
    if raw6 is not None:
        try:
            pool6 = ipaddress.IPv6Network(raw6)
        except ValueError as exc:
            raise sec.error("pool6", f"{raw6!r}: {exc}") from None
        if pool6.prefixlen > 126:
            raise sec.error("pool6", f"{pool6} has no room for clients (at most /126)")
        if mtu is not None and mtu < 1280:
            raise sec.error("mtu", f"{mtu} is below 1280, the smallest MTU IPv6 allows (pool6 is set)")
    routes = _prefixes(sec, "routes", pool6)
    allow = sec.get("allow_unlisted_clients", bool, True)
    mode = sec.choice("mode", ServerSettings.mode, ("client",) + MODES)
    linger = sec.seconds("linger", LINGER)
    client_to_client = sec.get("client_to_client", bool, ServerSettings.client_to_client)
    unknown_destination = sec.choice("unknown_destination", ServerSettings.unknown_destination, ("drop", "icmp"))
    limits = Limits(
        max_tunnels=sec.integer("max_tunnels", MAX_TUNNELS, 1, 1_000_000),
        max_paths=sec.integer("max_paths", MAX_PATHS, 1, 64),
        handshake_rate=float(sec.get("handshake_rate", (int, float), HANDSHAKE_RATE, what="handshakes per second")),
        max_handshakes=sec.integer("max_handshakes", MAX_HANDSHAKES, 1, 1_000_000),
        pending_queue=sec.integer("pending_queue", PENDING_QUEUE, 0, 1024),
        pending_expiry=sec.seconds("pending_expiry", PENDING_EXPIRY),
    )
    if not 0 < limits.handshake_rate <= 100_000:
        raise sec.error("handshake_rate", f"{limits.handshake_rate} is out of range (more than 0, at most 100000)")
    crl, deny, crl_expired = _revocation_keys(sec)
    common = _common(sec)
    sec.finish()

    clients: dict[str, Optional[ipaddress.IPv4Address]] = {}
    client_routes: dict[str, list] = {}
    static6: dict[str, ipaddress.IPv6Address] = {}
    ctable = data.get("clients", {})
    if not isinstance(ctable, dict):
        raise ConfigError(f"{p}: [clients] must be a table of [clients.NAME] tables")
    for name, entry in ctable.items():
        csec = _Section(p, f"clients.{name}", entry)
        raw = csec.get("address", str, None)
        clients[name] = None
        if own_routes := _prefixes(csec, "routes", pool6):
            client_routes[name] = own_routes
        raw6 = csec.get("address6", str, None, what="an IPv6 address")
        if raw6 is not None:
            if pool6 is None:
                raise csec.error("address6", "needs pool6 in [server]")
            try:
                a6 = ipaddress.IPv6Address(raw6)
            except ValueError as exc:
                raise csec.error("address6", str(exc)) from None
            if a6 not in pool6 or a6 in (pool6.network_address, pool6.network_address + 1):
                raise csec.error("address6", f"{a6} is not a free address of pool6 {pool6}"
                                             f" ({pool6.network_address + 1} is the server's)")
            if a6 in static6.values():
                raise csec.error("address6", f"{a6} is given to another client too")
            static6[name] = a6
        if raw is not None:
            try:
                a = ipaddress.IPv4Address(raw)
            except ValueError as exc:
                raise csec.error("address", str(exc)) from None
            if (
                a not in address.network
                or a == address.ip
                or a in (address.network.network_address, address.network.broadcast_address)
            ):
                raise csec.error("address", f"{a} is not a free host address of {address.network}")
            if a in clients.values():
                raise csec.error("address", f"{a} is given to another client too")
            clients[name] = a
        _check_client_routes(csec, name, client_routes.get(name, []), client_routes, address.network, pool6)
        csec.finish()
    return ServerConfig(
        path=p,
        listen=listen,
        address=address,
        pool_first=first,
        pool_last=last,
        mtu=mtu,
        routes=routes,
        allow_unlisted_clients=allow,
        mode=mode,
        linger=linger,
        clients=clients,
        client_routes=client_routes,
        crl=crl,
        crl_expired=crl_expired,
        deny=deny,
        pool6=pool6,
        static_addresses6=static6,
        client_to_client=client_to_client,
        unknown_destination=unknown_destination,
        limits=limits,
        **common,
    )


EXCLUDE_LIST_MAX = 32  # a route around the tunnel subnet: list the prefixes in the error up to this many


def _check_client_routes(csec: _Section, name: str, routes: list, all_routes: dict[str, list],
                         subnet: ipaddress.IPv4Network, pool6: Optional[ipaddress.IPv6Network]) -> None:
    """A client's ``routes`` are the networks behind it: the server takes any source address in
    them from that client (and routes them to it).  So they must not overlap the addresses the
    server hands out or owns (the tunnel subnet, pool6: a client could send as the server or as
    another client) nor another client's routes (each could send as the other; ``all_routes``
    holds the clients read so far)."""
    for r in routes:
        own = subnet if r.version == 4 else pool6
        if own is not None and r.overlaps(own):
            what = "the tunnel subnet" if r.version == 4 else "pool6"
            if r.prefixlen < own.prefixlen:
                rest = sorted(r.address_exclude(own))
                quoted = ", ".join(f'"{x}"' for x in rest)
                listed = (f"routes = [{quoted}]" if len(rest) <= EXCLUDE_LIST_MAX
                          else f"{len(rest)} prefixes, {rest[0]} to {rest[-1]}")
                raise csec.error("routes", f"{r} overlaps {what} {own} (a client cannot own the addresses the "
                                           f"server gives out); to route {r} via this client, list the "
                                           f"prefixes around {own} instead: {listed}")
            raise csec.error("routes", f"{r} overlaps {what} {own} (the server gives these addresses to "
                                       f"clients itself; routes are the networks behind a client)")
        for other, theirs in all_routes.items():
            if other == name:
                continue
            for t in theirs:
                if r.version == t.version and r.overlaps(t):
                    raise csec.error("routes", f"{r} overlaps {t} of [clients.{other}] (each could send "
                                               f"with the other's addresses)")


def _revocation_keys(sec: _Section) -> tuple[Optional[Path], list[str], str]:
    from tunnel.core.revocation import CRL_EXPIRED

    crl = sec.file("crl") if "crl" in sec.table else None
    deny = sec.get("deny", list, [], what="a list of client names")
    for name in deny:
        if not isinstance(name, str) or not name:
            raise sec.error("deny", f"{name!r} is not a client name")
    crl_expired = sec.choice("crl_expired", CRL_EXPIRED[0], CRL_EXPIRED)
    if crl_expired != CRL_EXPIRED[0] and crl is None:
        raise sec.error("crl_expired", f'"{crl_expired}" needs a crl (without one there is nothing to expire)')
    return crl, deny, crl_expired


def load_revocation_keys(path: str | Path) -> tuple[Optional[Path], list[str], str]:
    """Only ``crl``, ``deny`` and ``crl_expired`` of a server config (SIGHUP: the daemon may
    no longer be able to read the key files the full config check opens)."""
    p, data = _load(path)
    if not isinstance(data.get("server"), dict):
        raise ConfigError(f"{p}: missing [server] table")
    return _revocation_keys(_Section(p, "server", data["server"]))


def load_client_config(path: str | Path) -> ClientConfig:
    p, data, sec = _main_table(path, "client", set())
    servers = _endpoints(sec, "server")
    name = sec.get("server_name", str, what="the name in the server certificate")
    if not name:
        raise sec.error("server_name", "empty")
    interfaces = sec.get("interfaces", list, [])
    for ifname in interfaces:
        if not isinstance(ifname, str) or not 0 < len(ifname) <= 15:
            raise sec.error("interfaces", f"{ifname!r} is not an interface name")
    mode = sec.choice("mode", ClientSettings.mode, MODES)
    redundancy = sec.integer("redundancy", ClientSettings.redundancy, 1, 16)
    pin_flows = sec.get("pin_flows", bool, ClientSettings.pin_flows)
    common = _common(sec)
    sec.finish()
    return ClientConfig(path=p, servers=servers, server_name=name, interfaces=interfaces, mode=mode,
                        redundancy=redundancy, pin_flows=pin_flows, **common)
