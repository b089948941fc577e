"""`mptun server`: config -> DTLS context, TUN, sockets, ServerCore, shell."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Optional

from tunnel.core import events

from tunnel.wire import mtu as mtu_math

from tunnel.io import netlink

from tunnel.app import privs
from tunnel.app.daemon import (
    drop_target_and_key_check,
    equip_shell,
    fmt_addr,
    load_policy_or_none,
    reloader,
    setup_logging,
    udp_socket,
)
from tunnel.app.certs import CertError, crl_next_update, load_crl
from tunnel.app.config import ConfigError, ServerConfig, load_revocation_keys
from tunnel.wire.dtls import make_context
from tunnel.core.pool import AddressPool, AddressPool6
from tunnel.core.revocation import Revocation
from tunnel.core.server import ServerCore
from tunnel.io.shell import ServerShell
from tunnel.io.tun import TunDevice

log = logging.getLogger("mptun")
DEFAULT_UNDERLAY_MTU = 1500


def log_event(ev) -> None:
    if isinstance(ev, events.PathUp):
        log.info("path %s up: client '%s', %s", fmt_addr(ev.addr), ev.peer, ev.cipher)
    elif isinstance(ev, events.Refused):
        log.warning("refused %s: %s%s", fmt_addr(ev.addr), ev.reason,
                    f" ({ev.unlogged} more refusals counted, not logged, since the last line)" if ev.unlogged else "")
    elif isinstance(ev, events.ClientConnected):
        log.info(
            "client '%s' connected from %s, inner address %s%s",
            ev.name, fmt_addr(ev.addr), ev.address, " (replaces its previous tunnel)" if ev.replaced else "",
        )
        if ev.note:
            log.warning("client '%s': %s", ev.name, ev.note)
    elif isinstance(ev, events.ClientGone):
        log.info("client '%s' (%s) gone: %s", ev.name, ev.address, ev.reason)
    elif isinstance(ev, events.PathDown):
        log.info("path %s down: %s", fmt_addr(ev.addr), ev.reason)
    elif isinstance(ev, events.PathJoined):
        log.info("path %s joined the tunnel of '%s'", fmt_addr(ev.key), ev.name)
    elif isinstance(ev, events.PathState):
        log.info("path %s of '%s' is %s", fmt_addr(ev.key), ev.name, ev.state)
    elif isinstance(ev, events.LimitHit):
        log.warning("limit %s: %s (from %s; counted in mptun status)", ev.kind, ev.reason, fmt_addr(ev.addr))


def underlay_mtu(cfg: ServerConfig) -> int:
    mtus = [netlink.address_mtu(host) for host, _ in cfg.listen]
    known = [m for m in mtus if m]
    return min(known) if known else DEFAULT_UNDERLAY_MTU


def load_serials(cfg: ServerConfig, crl) -> tuple[frozenset[int], Optional[float]]:
    """The serials the CRL at ``crl`` revokes (checked against the CA) and its nextUpdate
    (Unix time, None if it gives none); CertError if it is bad."""
    if crl is None:
        return frozenset(), None
    serials = load_crl(crl, cfg.ca)
    try:
        next_update = crl_next_update(crl)
    except (OSError, ValueError):
        next_update = None
    if next_update is not None and next_update.timestamp() < time.time():
        if cfg.crl_expired == "refuse":
            log.error("CRL %s is past its nextUpdate (%s UTC): every new handshake is refused "
                      "(crl_expired = \"refuse\") until it is re-signed (`mptun certs revoke`) and reloaded (SIGHUP)",
                      crl, f"{next_update:%Y-%m-%d %H:%M}")
        else:
            log.warning("CRL %s is past its nextUpdate (%s UTC); still used. `mptun certs revoke` re-signs it",
                        crl, f"{next_update:%Y-%m-%d %H:%M}")
    return serials, None if next_update is None else next_update.timestamp()


def make_revocation(cfg: ServerConfig, serials: frozenset[int], next_update: Optional[float]) -> Revocation:
    return Revocation(serials, frozenset(cfg.deny), crl=str(cfg.crl) if cfg.crl else None,
                      next_update=next_update, crl_expired=cfg.crl_expired, clock=time.time)


def revocation_reloader(cfg: ServerConfig, core: ServerCore, clock):
    """SIGHUP: read ``crl`` and ``deny`` again; close the tunnels of clients now refused.
    A bad config file keeps everything; a bad CRL keeps the old serials (and says why)."""

    def reload() -> None:
        try:
            crl, deny, crl_expired = load_revocation_keys(cfg.path)
        except ConfigError as exc:
            log.error("SIGHUP: revocation not reloaded, keeping the old one: %s", exc)
            return
        serials, next_update = core.revocation.serials, core.revocation.next_update
        cfg.crl_expired = crl_expired
        try:
            serials, next_update = load_serials(cfg, crl)
        except CertError as exc:
            log.error("SIGHUP: CRL not reloaded, keeping the old one (%d serials): %s", len(serials), exc)
        else:
            cfg.crl = crl
        cfg.deny = deny
        closed = core.set_revocation(make_revocation(cfg, serials, next_update), clock())
        log.info("SIGHUP: revocation reloaded: %d revoked serials%s, %d denied names",
                 len(serials), f" ({cfg.crl})" if cfg.crl else "", len(deny))
        for reason in closed:
            log.warning("SIGHUP: %s: disconnected", reason)

    return reload


def build(cfg: ServerConfig):
    """Everything that can fail on bad input happens here, before any device exists."""
    ctx = make_context("server", cfg.certificate, cfg.key, cfg.ca)
    family = 6 if any(ipaddress.ip_address(h).version == 6 for h, _ in cfg.listen) else 4
    link_mtu = underlay_mtu(cfg)
    inner = cfg.mtu or mtu_math.inner_mtu(link_mtu, family)
    if inner > mtu_math.inner_mtu(link_mtu, family):
        log.warning("mtu %d is larger than the underlay allows (%d): packets will fragment", inner, mtu_math.inner_mtu(link_mtu, family))
    pool = AddressPool(cfg.address, cfg.static_addresses, cfg.pool_first, cfg.pool_last)
    pool6 = AddressPool6(cfg.pool6, cfg.static_addresses6) if cfg.pool6 is not None else None
    try:
        serials, next_update = load_serials(cfg, cfg.crl)
    except CertError as exc:
        raise ConfigError(f"{cfg.path}: [server] crl: {exc}") from None
    core = ServerCore(
        ctx, cfg.settings(mtu_math.datagram_mtu(link_mtu, family), inner), pool, pool6,
        policy=load_policy_or_none(cfg.policy), revocation=make_revocation(cfg, serials, next_update),
    )
    return core, inner


def run(cfg: ServerConfig) -> int:
    setup_logging("server", cfg.log_level, cfg.log_format)
    core, inner = build(cfg)
    target = drop_target_and_key_check(cfg, log)
    sockets = []
    for host, port in cfg.listen:
        fam = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        s = udp_socket(fam)
        s.bind((host, port))
        sockets.append(s)
    tun = TunDevice(cfg.tun)
    try:
        client_prefixes = [p for prefixes in cfg.client_routes.values() for p in prefixes]
        own = [cfg.address] + ([core.pool6.server] if core.pool6 is not None else [])
        netlink.configure_interface(tun.name, own, inner, client_prefixes)
        log.info(
            "listening on %s, tun %s %s mtu %d",
            ", ".join(f"{h}:{p}" for h, p in cfg.listen), tun.name, ", ".join(map(str, own)), inner,
        )
        reload_policy = reloader(cfg.policy, core.set_policy, log)
        reload_revocation = revocation_reloader(cfg, core, lambda: shell.loop.time())

        def on_reload() -> None:
            reload_policy()
            reload_revocation()

        shell = ServerShell(core, tun.fd, sockets, log_event, on_reload=on_reload)
        equip_shell(shell, cfg, "server", tun.name, target, privs.SERVER_KEEP)
        shell.run()
        log.info("stopped")
    finally:
        tun.close()
    return 0
