"""`mptun client`: config -> DTLS context, ClientCore, shell; TUN made on first CONFIG."""

from __future__ import annotations

import logging
import socket

from tunnel import events, mtu as mtu_math, netlink
from tunnel.app import fmt_addr, setup_logging, udp_socket
from tunnel.client_core import ClientCore
from tunnel.config import ClientConfig, ConfigError
from tunnel.control import default_path
from tunnel.dtls import make_context
from tunnel.shell import ClientShell
from tunnel.tun import TunDevice

log = logging.getLogger("mptun")
DEFAULT_UNDERLAY_MTU = 1500


def resolve(cfg: ClientConfig) -> tuple[int, tuple]:
    host, port = cfg.server
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"{cfg.path}: [client] server: cannot resolve {host}: {exc.strerror}") from None
    return info[0], info[4][:2]


def run(cfg: ClientConfig) -> int:
    setup_logging("client", cfg.log_level)
    ctx = make_context("client", cfg.certificate, cfg.key, cfg.ca, server_name=cfg.server_name)
    family, server = resolve(cfg)
    fam = 6 if family == socket.AF_INET6 else 4
    link_mtu = netlink.route_mtu(server[0]) or DEFAULT_UNDERLAY_MTU
    own_inner = mtu_math.inner_mtu(link_mtu, fam)
    core = ClientCore(ctx, server, mtu_math.datagram_mtu(link_mtu, fam), cfg.keepalive, cfg.timeout)
    tun_holder: list[TunDevice] = []

    def make_tun() -> int:
        tun = TunDevice(cfg.tun)
        tun_holder.append(tun)
        return tun.fd

    def make_socket() -> socket.socket:
        s = udp_socket(family)
        s.connect(server)
        return s

    def on_event(ev) -> None:
        if isinstance(ev, events.TunnelUp):
            c = ev.config
            shell.ensure_tun()
            mtu = min(c.mtu, own_inner)
            netlink.configure_interface(tun_holder[0].name, c.addresses, mtu, c.routes)
            log.info(
                "tunnel up: %s address %s mtu %d%s",
                tun_holder[0].name, ", ".join(map(str, c.addresses)), mtu,
                (" routes " + ", ".join(map(str, c.routes))) if c.routes else "",
            )
        elif isinstance(ev, events.TunnelDown):
            log.warning("tunnel down: %s; reconnecting", ev.reason)
        elif isinstance(ev, events.PathUp):
            log.info("connected to %s: server '%s', %s", fmt_addr(ev.addr), ev.peer, ev.cipher)
        elif isinstance(ev, events.PathDown):
            log.warning("path to %s down: %s", fmt_addr(ev.addr), ev.reason)
        elif isinstance(ev, events.Connecting):
            log.debug("connecting to %s (attempt %d)", fmt_addr(ev.addr), ev.attempt)

    shell = ClientShell(core, make_tun, make_socket, on_event, cfg.control or default_path("client", cfg.tun))
    try:
        shell.run()
    finally:
        for tun in tun_holder:
            tun.close()
        log.info("stopped")
    return 0
