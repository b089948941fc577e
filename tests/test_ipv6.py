"""IPv6 inside the tunnel: config (pool6, address6), the cores (CONFIG, anti-spoofing,
routing, client-to-client, routed prefixes, ECN), ICMPv6 unreachable.

The cores run on the in-memory lab of tests/corelab.py (real DTLS, manual clock).
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest

from tests.corelab import INNER_MTU, SERVER_INNER, Net, ipv4, server_core
from tunnel.wire import frames
from tunnel.core.client import C_UP
from tunnel.app.config import ConfigError, load_server_config
from tunnel.wire.dtls import make_context
from tunnel.wire.ecn import ipv4_checksum
from tunnel.wire.icmp import unreachable6
from tunnel.core.pool import AddressPool, AddressPool6
from tunnel.core.server import ServerCore

POOL6 = ipaddress.IPv6Network("fd00:6d70::/64")
SERVER6 = "fd00:6d70::1"
ALICE6 = "fd00:6d70::2"
BOB_LAN6 = ipaddress.IPv6Network("fd00:b0b::/48")


def ipv6(src: str, dst: str, payload: bytes = b"payload", nh: int = 17, tc: int = 0) -> bytes:
    return (struct.pack(">IHBB", (6 << 28) | (tc << 20), len(payload), nh, 64)
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload)


def csum_ok(pkt6: bytes) -> bool:
    """ICMPv6 checksum over the pseudo-header (RFC 4443 2.3) sums to zero."""
    body = pkt6[40:]
    pseudo = pkt6[8:40] + struct.pack(">IxxxB", len(body), 58)
    data = pseudo + body + (b"\x00" if len(body) % 2 else b"")
    return ipv4_checksum(data) == 0


class Net6(Net):
    """The in-memory lab with a server that has pool6 (and optional extras)."""

    def __init__(self, pki: Path, static6=None, **server):
        self._extra = dict(server)
        self._static6 = static6 or {}
        super().__init__(pki)

    def make_server(self) -> ServerCore:
        pki = self.pki
        return server_core(
            make_context("server", pki / "srv.crt", pki / "srv.key", pki / "ca.crt"),
            AddressPool(SERVER_INNER), random_bytes=lambda n: next(self._ids).to_bytes(n, "big"),
            pool6=AddressPool6(POOL6, self._static6), **self._extra,
        )

    def by_name(self, name: str):
        return self.server.by_name[name]


def up(net: Net6, name: str = "alice", key: str = "a"):
    c = net.client(name)
    c.add(key)
    assert c.core.state == C_UP, c.events
    return c


# -- config ------------------------------------------------------------------------------
def _server_toml(tmp_path: Path, server_extra: str = "", clients: str = "") -> Path:
    for name in ("ca.crt", "srv.crt", "srv.key"):
        (tmp_path / name).write_text("dummy\n")
    p = tmp_path / "server.toml"
    p.write_text('[server]\nlisten = "198.18.0.1:4433"\ncertificate = "srv.crt"\nkey = "srv.key"\n'
                 f'ca = "ca.crt"\naddress = "100.64.0.1/24"\n{server_extra}\n{clients}')
    return p


def test_config_pool6_static_address6_and_ipv6_routes(tmp_path: Path) -> None:
    cfg = load_server_config(_server_toml(
        tmp_path, 'pool6 = "fd00:6d70::/64"\nroutes = ["10.9.0.0/16", "fd00:99::/48"]',
        '[clients.alice]\naddress6 = "fd00:6d70::a"\nroutes = ["fd00:b0b::/48", "10.1.0.0/24"]\n'))
    assert cfg.pool6 == POOL6
    assert cfg.static_addresses6 == {"alice": ipaddress.IPv6Address("fd00:6d70::a")}
    assert cfg.routes == [ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("fd00:99::/48")]
    assert cfg.client_routes["alice"] == [BOB_LAN6, ipaddress.ip_network("10.1.0.0/24")]
    assert load_server_config(_server_toml(tmp_path)).pool6 is None


@pytest.mark.parametrize("server_extra, clients, fragment", [
    ('pool6 = "fd00:6d70::/129"', "", "[server] pool6: 'fd00:6d70::/129'"),
    ('pool6 = "100.64.0.0/24"', "", "[server] pool6: "),
    ('pool6 = "fd00:6d70::/127"', "", "[server] pool6: fd00:6d70::/127 has no room"),
    ("pool6 = 6", "", "[server] pool6: expected an IPv6 prefix"),
    ('pool6 = "fd00:6d70::/64"\nmtu = 1200', "", "[server] mtu: 1200 is below 1280"),
    ("", '[clients.alice]\naddress6 = "fd00:6d70::5"', "[clients.alice] address6: needs pool6"),
    ('pool6 = "fd00:6d70::/64"', '[clients.alice]\naddress6 = "fd00:1::5"', "[clients.alice] address6: fd00:1::5 is not"),
    ('pool6 = "fd00:6d70::/64"', '[clients.alice]\naddress6 = "fd00:6d70::1"', "[clients.alice] address6: "),
    ('pool6 = "fd00:6d70::/64"', '[clients.alice]\naddress6 = "nope"', "[clients.alice] address6: "),
    ('pool6 = "fd00:6d70::/64"', '[clients.alice]\naddress6 = "fd00:6d70::5"\n[clients.bob]\naddress6 = "fd00:6d70::5"',
     "[clients.bob] address6: fd00:6d70::5 is given to another client too"),
    ("", '[clients.alice]\nroutes = ["fd00:b0b::/48"]', "[clients.alice] routes: 'fd00:b0b::/48': "),
    ('routes = ["fd00:99::/48"]', "", "(IPv6 routes need pool6)"),
])
def test_config_ipv6_errors_name_file_and_key(tmp_path: Path, server_extra: str, clients: str, fragment: str) -> None:
    p = _server_toml(tmp_path, server_extra, clients)
    with pytest.raises(ConfigError) as e:
        load_server_config(p)
    assert str(e.value).startswith(f"{p}: ") and fragment in str(e.value), str(e.value)


# -- cores -------------------------------------------------------------------------------
def test_config_frame_carries_the_ipv6_address_and_both_sides_show_it(pki: Path) -> None:
    net = Net6(pki)
    c = up(net)
    assert c.core.config.addresses == [ipaddress.ip_interface("100.64.0.2/24"), ipaddress.ip_interface(f"{ALICE6}/64")]
    assert c.core.ipv6 and c.core.stats()["address6"] == f"{ALICE6}/64"
    assert net.tunnel().stats()["address6"] == f"{ALICE6}/64"
    assert net.server.pool6.server == ipaddress.ip_interface(f"{SERVER6}/64")


def test_ipv6_both_ways_and_forged_source_dropped(pki: Path) -> None:
    net = Net6(pki)
    c = up(net)
    good = [ipv6(ALICE6, SERVER6, b"u%d" % i) for i in range(3)]
    for p in good:
        assert c.send_up(p) == ["a"]
    forged = [ipv6("fd00:6d70::99", SERVER6), ipv6("2001:db8::1", SERVER6), ipv6(SERVER6, ALICE6)]
    for i, p in enumerate(forged):  # a client that does not filter: frames built by hand
        path = c.path("a")
        net.server.receive_datagram(c.addr("a"), path.encrypt(frames.encode_data(100 + i, p), net.now), net.now)
    net.pump()
    assert net.server.to_tun == good
    assert net.tunnel().spoofed == 3
    down = [ipv6(SERVER6, ALICE6, b"d%d" % i) for i in range(3)] + [ipv6("fd00:99::1", ALICE6, b"x" * (INNER_MTU - 40))]
    for p in down:
        assert net.send_down(p) == ["a"]
    net.pump()
    assert c.core.to_tun == down
    # IPv4 still works beside it
    v4 = ipv4("100.64.0.2", "100.64.0.1")
    c.send_up(v4)
    net.pump()
    assert net.server.to_tun[-1] == v4


def test_client_keeps_link_local_and_multicast_ipv6_to_itself(pki: Path) -> None:
    net = Net6(pki)
    c = up(net)
    assert c.send_up(ipv6("fe80::1", "fe80::2")) == []  # from a link-local address
    assert c.send_up(ipv6("::", "ff02::1:ff00:2", nh=58)) == []  # DAD / MLD to multicast
    assert c.send_up(ipv6(ALICE6, "ff02::16", nh=0)) == []
    assert c.core.counters["local6"] == 3 and c.core.stats()["local6"] == 3


def test_without_pool6_ipv6_is_not_carried(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    c.add("a")
    assert not c.core.ipv6 and c.core.stats()["address6"] is None
    assert c.send_up(ipv6("fd00::2", "fd00::1")) == [] and c.core.counters["not_ipv4"] == 1
    net.server.send_packet(ipv6("fd00::1", "fd00::2"), net.now)
    assert net.server.counters["not_ipv4"] == 1 and net.server.counters["no_route"] == 0


def test_server_keeps_multicast_and_link_local_ipv6_to_itself(pki: Path) -> None:
    net = Net6(pki)
    up(net)
    assert net.send_down(ipv6(SERVER6, "ff02::16", bytes(8))) == []  # the TUN's own MLD report
    assert net.send_down(ipv6("fe80::1", "fd00:6d70::2")) == []  # from a link-local address
    assert net.server.counters["local6"] == 2 and net.server.counters["no_route"] == 0
    assert net.server.to_tun == []  # and no ICMPv6 error about them


def test_unknown_ipv6_destination_dropped_or_icmpv6(pki: Path) -> None:
    net = Net6(pki)
    up(net)
    assert net.send_down(ipv6(SERVER6, "fd00:6d70::77")) == []
    assert net.server.counters["no_route"] == 1 and net.server.to_tun == []

    net = Net6(pki, unknown_destination="icmp")
    up(net)
    lost = ipv6("fd00:6d70::2", "fd00:6d70::77", b"\x9c\x40\x13\x88" + bytes(4) + b"hello")
    assert net.send_down(lost) == []
    (reply,) = net.server.to_tun
    assert reply[0] >> 4 == 6 and reply[6] == 58  # ICMPv6
    assert reply[8:24] == ipaddress.IPv6Address(SERVER6).packed and reply[24:40] == lost[8:24]
    assert reply[40:42] == bytes([1, 3])  # destination unreachable, address unreachable
    assert reply[48:] == lost and csum_ok(reply)
    assert net.server.counters["icmp_sent"] == 1


def test_icmpv6_rules_no_error_about_errors_multicast_or_later_fragments() -> None:
    src = ipaddress.IPv6Address(SERVER6).packed
    assert csum_ok(unreachable6(src, ipv6(ALICE6, "fd00::9", b"x")))  # odd length is padded for the sum
    assert unreachable6(src, ipv6(ALICE6, "fd00::9", bytes([1, 3, 0, 0]) + bytes(4), nh=58)) is None  # an error
    assert unreachable6(src, ipv6(ALICE6, "fd00::9", bytes([128, 0, 0, 0]) + bytes(4), nh=58)) is not None  # echo
    assert unreachable6(src, ipv6(ALICE6, "ff0e::1")) is None  # multicast destination
    assert unreachable6(src, ipv6("::", "fd00::9")) is None  # unspecified source
    hop = bytes([58, 0]) + bytes(6)  # hop-by-hop header, then an ICMPv6 error
    assert unreachable6(src, ipv6(ALICE6, "fd00::9", hop + bytes([1, 0, 0, 0]) + bytes(4), nh=0)) is None
    frag_later = bytes([17, 0]) + (8 << 3).to_bytes(2, "big") + bytes(4)
    frag_first = bytes([17, 0, 0, 1]) + bytes(4)
    assert unreachable6(src, ipv6(ALICE6, "fd00::9", frag_later + bytes(8), nh=44)) is None
    assert unreachable6(src, ipv6(ALICE6, "fd00::9", frag_first + bytes(8), nh=44)) is not None
    big = unreachable6(src, ipv6(ALICE6, "fd00::9", bytes(3000)))
    assert len(big) == 1280 and csum_ok(big)  # quote cut to the IPv6 minimum MTU
    assert unreachable6(src, ipv4("100.64.0.2", "100.64.0.9")) is None and unreachable6(src, b"\x60" * 39) is None


def test_ipv6_client_to_client_and_routed_prefix(pki: Path) -> None:
    net = Net6(pki, client_routes={"bob": [BOB_LAN6]}, client_to_client=True)
    alice = up(net, "alice", "a")
    bob = up(net, "bob", "b")
    bob6 = str(net.by_name("bob").address6.ip)
    to_bob = ipv6(ALICE6, bob6, b"hi bob")
    to_lan = ipv6(ALICE6, "fd00:b0b:0:1::5", b"hi lan")
    alice.send_up(to_bob)
    alice.send_up(to_lan)
    net.pump()
    assert bob.core.to_tun == [to_bob, to_lan] and net.server.to_tun == []
    from_lan = ipv6("fd00:b0b:0:1::5", ALICE6, b"from the lan")  # bob may send from its routed prefix
    bob.send_up(from_lan)
    bob.send_up(ipv6("fd00:b0c::5", ALICE6))  # outside it: spoofed
    net.pump()
    assert alice.core.to_tun == [from_lan] and net.by_name("bob").spoofed == 1
    assert net.send_down(ipv6(SERVER6, "fd00:b0b:0:2::1")) == ["b"]  # the server routes the prefix to bob

    net = Net6(pki)  # client_to_client off: blocked and counted
    alice = up(net, "alice", "a")
    bob = up(net, "bob", "b")
    alice.send_up(ipv6(ALICE6, str(net.by_name("bob").address6.ip)))
    net.pump()
    assert bob.core.to_tun == [] and net.server.counters["client_to_client_blocked"] == 1


def test_static_address6_and_same_address_after_reconnect(pki: Path) -> None:
    net = Net6(pki, static6={"bob": ipaddress.IPv6Address("fd00:6d70::b0b")})
    bob = up(net, "bob", "b")
    assert net.by_name("bob").address6 == ipaddress.ip_interface("fd00:6d70::b0b/64")
    alice = up(net, "alice", "a")
    before = net.by_name("alice").address6
    alice.core.close(net.now)  # CLOSE: the server forgets the tunnel, the lease stays
    net.pump()
    assert "alice" not in net.server.by_name
    again = up(net, "alice", "a2")
    assert net.by_name("alice").address6 == before and again.core.stats()["address6"] == str(before)
    assert bob.core.stats()["address6"] == "fd00:6d70::b0b/64"


def test_outer_ce_marks_an_ect_ipv6_packet_at_the_server(pki: Path) -> None:
    net = Net6(pki)
    c = up(net)
    ect0 = ipv6(ALICE6, SERVER6, b"ecn", tc=0b10)
    not_ect = ipv6(ALICE6, SERVER6, b"not", tc=0)
    path = c.path("a")
    for i, p in enumerate((ect0, not_ect), start=50):
        net.server.receive_datagram(c.addr("a"), path.encrypt(frames.encode_data(i, p), net.now), net.now, tos=3)
    (got,) = net.server.to_tun
    assert (got[1] >> 4) & 3 == 3 and got[2:] == ect0[2:]  # CE in the traffic class, the rest unchanged
    assert net.tunnel().ecn_dropped == 1


def test_protocol_doc_config_example_with_ipv6() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    marker = "With an IPv6 address too (tunnel id 1"
    block = doc.split(marker, 1)[1].split("```", 2)[1]
    wire = bytes.fromhex("".join(line.split("  ")[0] for line in block.strip().splitlines()))
    example = frames.Config((1).to_bytes(16, "big"),
                            [ipaddress.ip_interface("100.64.0.2/24"), ipaddress.ip_interface("fd00:6d70::2/64")],
                            1422, 100, 3000, [])
    assert wire == frames.encode(example)
    assert f"{len(wire)} bytes" in doc.split(marker, 1)[1].split("```")[0]
