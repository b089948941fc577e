"""`mptun client`: config -> DTLS context, ClientCore, shell; one path per usable
interface and server address; TUN made on the first CONFIG."""

from __future__ import annotations

import logging
import socket

from tunnel.core import events

from tunnel.wire import mtu as mtu_math

from tunnel.io import netlink

from tunnel.app import privs
from tunnel.app.daemon import (
    drop_target_and_key_check,
    equip_shell,
    load_policy_or_none,
    reloader,
    setup_logging,
    udp_socket,
)
from tunnel.core.client import ClientCore
from tunnel.app.config import ClientConfig, ConfigError
from tunnel.wire.dtls import common_name, make_context
from tunnel.io.shell import ClientShell
from tunnel.io.tun import TunClone, TunDevice

log = logging.getLogger("mptun")


def resolve(cfg: ClientConfig) -> list[tuple[int, tuple]]:
    """(address family, (ip, port)) of each configured server address."""
    out = []
    for host, port in cfg.servers:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as exc:
            raise ConfigError(f"{cfg.path}: [client] server: cannot resolve {host}: {exc.strerror}") from None
        out.append((info[0], info[4][:2]))
    return out


def path_label(key) -> str:
    if isinstance(key, events.SpareKey):
        return path_label(key.base) + " (spare)"
    ifname, local, server = key
    return f"{ifname} {local} -> {server[0]}:{server[1]}"


class PathFinder:
    """Which paths the client should run now: interface x server address pairs
    where the interface is up, has an IPv4 address and a route to the server."""

    def __init__(self, cfg: ClientConfig, servers: list[tuple[int, tuple]]):
        self.cfg = cfg
        self.servers = [addr for family, addr in servers if family == socket.AF_INET]
        self.inner_mtu: dict = {}

    def __call__(self) -> dict:
        found = netlink.usable_interfaces(exclude=[self.cfg.tun])
        if self.cfg.interfaces:
            order = {name: i for i, name in enumerate(self.cfg.interfaces)}
            found = sorted((f for f in found if f[0] in order), key=lambda f: order[f[0]])
        wanted = {}
        for priority, (name, index, addr, link_mtu) in enumerate(found):
            for server in self.servers:
                if netlink.reachable_via(server[0], index):
                    key = (name, addr, server)
                    wanted[key] = (server, name, priority, mtu_math.datagram_mtu(link_mtu))
                    self.inner_mtu[key] = mtu_math.inner_mtu(link_mtu)
        return wanted


def client_name(cfg: ClientConfig) -> str:
    """The client's identity: the common name of its certificate."""
    from cryptography import x509

    return common_name(x509.load_pem_x509_certificate(cfg.certificate.read_bytes()))


def make_socket(key) -> socket.socket:
    """A UDP socket bound to the path's interface and address, connected to the server."""
    ifname, local, server = key
    s = udp_socket(socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    s.bind((local, 0))
    s.connect(server)
    return s


def check(cfg: ClientConfig) -> None:
    """`--check-config`: what the client refuses at start for bad input (server names that do
    not resolve, the policy, the certificates and key), without making anything."""
    resolve(cfg)
    load_policy_or_none(cfg.policy)
    make_context("client", cfg.certificate, cfg.key, cfg.ca, server_name=cfg.server_name)


def run(cfg: ClientConfig) -> int:
    setup_logging("client", cfg.log_level, cfg.log_format)
    ctx = make_context("client", cfg.certificate, cfg.key, cfg.ca, server_name=cfg.server_name)
    target = drop_target_and_key_check(cfg, log)
    finder = PathFinder(cfg, resolve(cfg))
    if not finder.servers:
        raise ConfigError(f"{cfg.path}: [client] server: no IPv4 server address (IPv6 underlay is not supported yet)")
    core = ClientCore(ctx, cfg.settings(), load_policy_or_none(cfg.policy))
    tun_holder: list[TunDevice] = []
    state = {"mtu": None}
    # the TUN is made on the first CONFIG, maybe after the privilege drop: /dev/net/tun
    # is opened now, while it still can be (mode 0600 on many hosts; tunnel/io/tun.py)
    clone = TunClone()

    def make_tun() -> int:
        tun = TunDevice(cfg.tun, clone)
        tun_holder.append(tun)
        return tun.fd

    def tun_mtu(config_mtu: int) -> int:
        own = [m for k, m in finder.inner_mtu.items() if k in core.slots]
        return min([config_mtu] + own)

    def on_event(ev) -> None:
        if isinstance(ev, events.TunnelUp):
            c = ev.config
            shell.ensure_tun()
            state["mtu"] = mtu = tun_mtu(c.mtu)
            try:
                netlink.configure_interface(tun_holder[0].name, c.addresses, mtu, c.routes)
            except netlink.NetlinkErrorMsg as exc:  # the tunnel stays up; what failed is said
                log.error("tunnel up, but %s", exc)
            log.info(
                "tunnel up: %s address %s mtu %d mode %s%s",
                tun_holder[0].name, ", ".join(map(str, c.addresses)), mtu, cfg.mode,
                (" routes " + ", ".join(map(str, c.routes))) if c.routes else "",
            )
        elif isinstance(ev, events.PathJoined):
            log.info("path %s joined the tunnel", path_label(ev.key))
            if state["mtu"] is not None and core.config is not None and tun_mtu(core.config.mtu) < state["mtu"]:
                state["mtu"] = tun_mtu(core.config.mtu)
                try:
                    netlink.configure_interface(tun_holder[0].name, core.config.addresses, state["mtu"], core.config.routes)
                except netlink.NetlinkErrorMsg as exc:
                    log.error("%s", exc)
                log.info("tunnel mtu lowered to %d for the new path", state["mtu"])
        elif isinstance(ev, events.Rebound):
            log.info("path %s: a new session from a new source port replaced the silent one", path_label(ev.key))
        elif isinstance(ev, events.TunnelDown):
            log.warning("tunnel down: %s; reconnecting", ev.reason)
        elif isinstance(ev, events.PathUp):
            log.info("path %s: connected to server '%s', %s", path_label(ev.addr), ev.peer, ev.cipher)
        elif isinstance(ev, events.PathState):
            log.info("path %s is %s", path_label(ev.key), ev.state)
        elif isinstance(ev, events.PathDown):
            log.warning("path %s down: %s", path_label(ev.addr), ev.reason)
        elif isinstance(ev, events.Connecting):
            log.debug("path %s: connecting (attempt %d)", path_label(ev.key), ev.attempt)

    shell = ClientShell(
        core,
        make_tun,
        make_socket,
        finder,
        on_event,
        watcher=netlink.LinkWatcher(),
        on_reload=reloader(cfg.policy, core.set_policy, log),
    )
    equip_shell(shell, cfg, "client", cfg.tun, target, privs.CLIENT_KEEP, name=client_name(cfg) if cfg.metrics else "")
    try:
        shell.run()
    finally:
        for tun in tun_holder:
            tun.close()
        clone.close()
        log.info("stopped")
    return 0
