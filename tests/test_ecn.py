"""Tests for tunnel/wire/ecn.py (RFC 6040 decapsulation) and for ECN/DSCP in the cores.

The first half is pure: the RFC 6040 table for IPv4 and IPv6, the incremental
IPv4 checksum update (property-tested against a full recomputation).  The
second half drives ClientCore/ServerCore with the in-memory lab of
tests/corelab.py, handing datagrams over by hand so that their outer TOS
byte (which that lab ignores) can be set or read.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tests.corelab import Net, one_path, two_paths
from tunnel.wire.ecn import CE, ECT0, ECT1, NOT_ECT, decapsulate, ipv4_checksum
from tunnel.app.config import load_policy
from tunnel.core.policy import Policy

WEBRTC = Path(__file__).resolve().parent.parent / "policies" / "webrtc.toml"
ECNS = {"Not-ECT": NOT_ECT, "ECT(1)": ECT1, "ECT(0)": ECT0, "CE": CE}
EF = 46


def v4(tos: int, src: str = "192.0.2.1", dst: str = "198.51.100.2", proto: int = 17, payload: bytes = b"\x9c\x40\x9c\x41data",
       ttl: int = 64, ident: int = 0x1234) -> bytes:
    hdr = bytearray(
        bytes([0x45, tos]) + (20 + len(payload)).to_bytes(2, "big") + ident.to_bytes(2, "big") + b"\x40\x00"
        + bytes([ttl, proto, 0, 0]) + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    )
    hdr[10:12] = ipv4_checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + payload


def v6(tc: int, flow: int = 0x5A5A5, payload: bytes = b"\x9c\x40\x9c\x41data") -> bytes:
    first = (6 << 28) | (tc << 20) | flow
    return (
        first.to_bytes(4, "big") + len(payload).to_bytes(2, "big") + bytes([17, 64])
        + ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("2001:db8::2").packed + payload
    )


def ecn6(pkt: bytes) -> int:
    return (pkt[1] >> 4) & 3


def header_ok(pkt: bytes) -> bool:
    """The IPv4 header checksum verifies: summing the header with its checksum gives 0xFFFF."""
    ihl = (pkt[0] & 0x0F) * 4
    return ipv4_checksum(pkt[:ihl]) == 0


def recomputed(pkt: bytes) -> int:
    ihl = (pkt[0] & 0x0F) * 4
    return ipv4_checksum(pkt[:10] + b"\0\0" + pkt[12:ihl])


# -- the RFC 6040 table (section 4.2, normal mode) ---------------------------------------------------------
@pytest.mark.parametrize("outer", ["Not-ECT", "ECT(1)", "ECT(0)"])
@pytest.mark.parametrize("inner", list(ECNS))
@pytest.mark.parametrize("dscp", [0, 10, EF, 63])
def test_outer_without_ce_never_changes_the_inner_packet(outer: str, inner: str, dscp: int) -> None:
    for outer_dscp in (0, EF, 63):  # the outer DSCP plays no part
        outer_tos = (outer_dscp << 2) | ECNS[outer]
        pkt = v4((dscp << 2) | ECNS[inner])
        assert decapsulate(outer_tos, pkt) == pkt
        pkt6 = v6((dscp << 2) | ECNS[inner])
        assert decapsulate(outer_tos, pkt6) == pkt6


@pytest.mark.parametrize("inner", ["ECT(0)", "ECT(1)"])
@pytest.mark.parametrize("dscp", [0, 10, EF, 63])
def test_outer_ce_marks_an_ect_inner_packet_ce(inner: str, dscp: int) -> None:
    pkt = v4((dscp << 2) | ECNS[inner])
    assert header_ok(pkt)
    out = decapsulate(CE, pkt)
    assert out is not None and out[1] == (dscp << 2) | CE  # DSCP kept, ECN now CE
    assert header_ok(out)
    assert int.from_bytes(out[10:12], "big") == recomputed(out)
    assert out[:1] + out[2:10] + out[12:] == pkt[:1] + pkt[2:10] + pkt[12:]  # nothing else touched
    assert decapsulate((EF << 2) | CE, pkt) == out  # any outer DSCP


@pytest.mark.parametrize("inner", ["ECT(0)", "ECT(1)"])
def test_outer_ce_marks_an_ect_inner_ipv6_packet_ce(inner: str) -> None:
    for dscp in range(64):
        for flow in (0, 0xFFFFF, 0x5A5A5):
            pkt = v6((dscp << 2) | ECNS[inner], flow)
            out = decapsulate(CE, pkt)
            assert out == v6((dscp << 2) | CE, flow)  # DSCP and flow label (byte 1's low nibble) kept
            assert ecn6(out) == CE


def test_outer_ce_and_inner_ce_unchanged() -> None:
    for dscp in (0, EF):
        pkt = v4((dscp << 2) | CE)
        assert decapsulate(CE, pkt) == pkt
        pkt6 = v6((dscp << 2) | CE)
        assert decapsulate(CE, pkt6) == pkt6


def test_outer_ce_and_inner_not_ect_is_dropped() -> None:
    for dscp in (0, EF):
        assert decapsulate(CE, v4(dscp << 2)) is None
        assert decapsulate((EF << 2) | CE, v4(dscp << 2)) is None
        assert decapsulate(CE, v6(dscp << 2)) is None


def test_non_ip_inner_packet() -> None:
    junk = b"\x00\x02" + bytes(30)
    assert decapsulate(ECT0, junk) == junk  # without CE nothing is looked at
    assert decapsulate(CE, junk) is None  # with CE it cannot be marked: dropped


def test_checksum_update_across_a_carry() -> None:
    """Headers whose checksum is near 0x0000 or 0xFFFF, where an incremental update is easy to get wrong."""
    found = 0
    for ident in range(0, 0x10000, 7):
        pkt = v4(ECT0, ident=ident)
        cs = int.from_bytes(pkt[10:12], "big")
        if cs < 4 or cs > 0xFFFB:
            found += 1
            out = decapsulate(CE, pkt)
            assert header_ok(out) and int.from_bytes(out[10:12], "big") == recomputed(out), hex(cs)
    assert found  # the sweep did reach the edge cases


@pytest.mark.parametrize("pkt", [b"", b"\x45", b"\x45\x02", b"\x45\x02" + bytes(8)])
def test_outer_ce_on_a_truncated_inner_packet_does_not_raise(pkt: bytes) -> None:
    decapsulate(CE, pkt)


# -- property: random valid IPv4 headers -------------------------------------------------------------------
@st.composite
def ipv4_packets(draw) -> bytes:
    n_opts = draw(st.integers(0, 10))
    options = draw(st.binary(min_size=4 * n_opts, max_size=4 * n_opts))
    payload = draw(st.binary(max_size=16))
    hdr = bytearray(
        bytes([0x40 | (5 + n_opts), draw(st.integers(0, 255))])
        + (20 + len(options) + len(payload)).to_bytes(2, "big")
        + draw(st.binary(min_size=4, max_size=4))  # identification, flags, fragment offset
        + bytes([draw(st.integers(0, 255)), draw(st.integers(0, 255)), 0, 0])  # TTL, protocol
        + draw(st.binary(min_size=8, max_size=8))  # addresses
        + options
    )
    hdr[10:12] = ipv4_checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + payload


@settings(max_examples=500, deadline=None)
@given(pkt=ipv4_packets(), outer_tos=st.integers(0, 255))
def test_decap_keeps_the_ipv4_checksum_valid(pkt: bytes, outer_tos: int) -> None:
    assert header_ok(pkt)
    inner = pkt[1] & 3
    out = decapsulate(outer_tos, pkt)
    if outer_tos & 3 != CE or inner == CE:
        assert out == pkt
    elif inner == NOT_ECT:
        assert out is None
    else:
        assert out[1] == (pkt[1] & 0xFC) | CE
        assert header_ok(out)
        assert int.from_bytes(out[10:12], "big") == recomputed(out)
        assert out[:1] + out[2:10] + out[12:] == pkt[:1] + pkt[2:10] + pkt[12:]


# -- the cores: ECN at decapsulation ---------------------------------------------------------------------
UP_SRC, UP_DST = "100.64.0.2", "100.64.0.1"  # the client's tunnel address (the server checks it), the server's


def down_to_client(net: Net, c, tos_of) -> None:
    """Hand every datagram the server has queued to the client, with outer TOS ``tos_of(key, tos)``."""
    for addr, d, tos in net.server.datagrams_to_send():
        key = net.owner[addr][1]
        c.core.receive_datagram(key, d, net.now, tos=tos_of(key, tos))


def up_to_server(net: Net, c, tos_of) -> None:
    for key, d, tos in c.core.datagrams_to_send():
        net.server.receive_datagram(c.addr(key), d, net.now, tos=tos_of(key, tos))


def test_client_marks_ce_on_an_ect_packet_that_came_with_outer_ce(pki: Path) -> None:
    net, c = one_path(pki)
    pkt = v4((EF << 2) | ECT0, UP_DST, UP_SRC)
    net.server.send_packet(pkt, net.now)
    down_to_client(net, c, lambda key, tos: 3)
    assert c.core.to_tun == [v4((EF << 2) | CE, UP_DST, UP_SRC)]
    assert header_ok(c.core.to_tun[0])
    assert c.core.engine.ecn_dropped == 0 and c.core.stats()["ecn_dropped"] == 0


def test_client_drops_and_counts_a_not_ect_packet_with_outer_ce(pki: Path) -> None:
    net, c = one_path(pki)
    net.server.send_packet(v4(0, UP_DST, UP_SRC), net.now)
    net.server.send_packet(v4(ECT1, UP_DST, UP_SRC), net.now)
    down_to_client(net, c, lambda key, tos: (EF << 2) | CE)
    assert c.core.to_tun == [v4(CE, UP_DST, UP_SRC)]
    assert c.core.engine.ecn_dropped == 1 and c.core.stats()["ecn_dropped"] == 1
    assert c.core.stats()["delivered"] == 2  # dedup accepted both; ECN dropped one after it


def test_client_without_outer_ce_delivers_unchanged(pki: Path) -> None:
    net, c = one_path(pki)
    pkts = [v4(tos, UP_DST, UP_SRC) for tos in (0, ECT1, ECT0, CE, (EF << 2) | ECT0)]
    for p in pkts:
        net.server.send_packet(p, net.now)
    down_to_client(net, c, lambda key, tos: ECT0)
    assert c.core.to_tun == pkts and c.core.engine.ecn_dropped == 0


def test_server_marks_ce_and_drops_not_ect(pki: Path) -> None:
    net, c = one_path(pki)
    ect, not_ect, ce = v4(ECT0, UP_SRC, UP_DST), v4(NOT_ECT, UP_SRC, UP_DST), v4(CE, UP_SRC, UP_DST)
    for p in (ect, not_ect, ce):
        c.core.send_packet(p, net.now)
    up_to_server(net, c, lambda key, tos: CE)
    t = net.tunnel()
    assert net.server.to_tun == [v4(CE, UP_SRC, UP_DST), ce]
    assert header_ok(net.server.to_tun[0])
    assert t.ecn_dropped == 1 and t.stats()["ecn_dropped"] == 1


@pytest.mark.parametrize("first_ce", [False, True])
def test_duplicate_mode_first_copy_decides_ce(pki: Path, first_ce: bool) -> None:
    """Two copies of an ECT(0) packet, one with outer CE: whichever arrives first is delivered as is."""
    net, c = two_paths(pki)  # duplicate mode
    pkt = v4(ECT0, UP_DST, UP_SRC)
    net.server.send_packet(pkt, net.now)
    out = net.server.datagrams_to_send()
    data = [(net.owner[a][1], d) for a, d, _ in out]
    assert sorted(k for k, _ in data) == ["a", "b"]
    marked = "a" if first_ce else "b"
    for key, d in data:  # a's copy first
        c.core.receive_datagram(key, d, net.now, tos=CE if key == marked else ECT0)
    want = v4(CE, UP_DST, UP_SRC) if first_ce else pkt
    assert c.core.to_tun == [want]
    st = c.core.stats()
    assert (st["delivered"], st["duplicates"], st["ecn_dropped"]) == (1, 1, 0)


@pytest.mark.parametrize("first_ce", [False, True])
def test_duplicate_mode_not_ect_first_copy_decides_drop(pki: Path, first_ce: bool) -> None:
    """A Not-ECT packet: a CE-marked later copy does not drop it; a CE-marked first copy drops it,
    and the clean later copy is then a duplicate (the sequence number was already accepted)."""
    net, c = two_paths(pki)
    pkt = v4(NOT_ECT, UP_DST, UP_SRC)
    net.server.send_packet(pkt, net.now)
    data = [(net.owner[a][1], d) for a, d, _ in net.server.datagrams_to_send()]
    marked = "a" if first_ce else "b"
    for key, d in data:
        c.core.receive_datagram(key, d, net.now, tos=CE if key == marked else NOT_ECT)
    st = c.core.stats()
    if first_ce:
        assert c.core.to_tun == [] and st["ecn_dropped"] == 1
    else:
        assert c.core.to_tun == [pkt] and st["ecn_dropped"] == 0
    assert st["duplicates"] == 1


def test_server_duplicate_mode_first_copy_decides_ce(pki: Path) -> None:
    net, c = two_paths(pki)
    pkt = v4(ECT1, UP_SRC, UP_DST)
    c.core.send_packet(pkt, net.now)
    up_to_server(net, c, lambda key, tos: ECT1 if key == "a" else CE)  # a's copy is first and clean
    c.core.send_packet(pkt, net.now)
    up_to_server(net, c, lambda key, tos: CE if key == "a" else ECT1)  # now the first copy is CE
    t = net.tunnel()
    assert net.server.to_tun == [pkt, v4(CE, UP_SRC, UP_DST)]
    assert (t.dedup.delivered, t.dedup.duplicates, t.ecn_dropped) == (2, 2, 0)


# -- the cores: outer TOS on send ---------------------------------------------------------------------------
def data_tos(outbox_slice) -> list[tuple]:
    return [(key, tos) for key, _d, tos in outbox_slice]


def test_client_outer_tos_per_class_with_the_webrtc_policy(pki: Path) -> None:
    net, c = two_paths(pki)
    policy = load_policy(WEBRTC)
    c.core.set_policy(policy)
    names = [cl.name for cl in policy.classes]
    media, default = names.index("media"), names.index("default")

    c.core.datagrams_to_send()
    for ecn in [NOT_ECT, ECT1, ECT0, CE, ECT0]:
        before = len(c.core.outbox)
        c.core.send_packet(v4((EF << 2) | ecn, UP_SRC, UP_DST), net.now)
        assert sorted(data_tos(c.core.outbox[before:])) == [("a", 0xB8 | ecn), ("b", 0xB8 | ecn)]
    bulk_keys = []
    for ecn in [NOT_ECT, ECT1, ECT0, CE, ECT0, ECT1]:
        before = len(c.core.outbox)
        c.core.send_packet(v4(ecn, UP_SRC, UP_DST, proto=6), net.now)  # plain TCP: the balance class
        ((key, tos),) = data_tos(c.core.outbox[before:])
        assert tos == ecn  # DSCP 0 outside: only ECN
        bulk_keys.append(key)
    assert sorted(bulk_keys) == ["a"] * 3 + ["b"] * 3

    assert c.core.engine.class_packets[media] == 5 and c.core.engine.class_copies[media] == 10
    assert c.core.engine.class_packets[default] == 6 and c.core.engine.class_copies[default] == 6
    stats = {s["name"]: s for s in c.core.stats()["classes"]}
    assert (stats["media"]["packets"], stats["media"]["copies"]) == (5, 10)
    assert (stats["default"]["packets"], stats["default"]["copies"]) == (6, 6)
    assert (stats["signalling"]["packets"], stats["media-unmarked"]["packets"]) == (0, 0)
    assert c.core.stats()["policy"] == str(WEBRTC)

    net.pump()  # and they all arrive, once each
    assert len(net.server.to_tun) == 11 and net.tunnel().dedup.duplicates == 5


def test_client_without_policy_leaks_no_dscp(pki: Path) -> None:
    net, c = two_paths(pki)  # duplicate mode, no policy file
    assert c.core.policy.source == "(built in)"
    c.core.datagrams_to_send()
    for ecn in range(4):
        before = len(c.core.outbox)
        c.core.send_packet(v4((EF << 2) | ecn, UP_SRC, UP_DST), net.now)
        assert sorted(data_tos(c.core.outbox[before:])) == [("a", ecn), ("b", ecn)]
    assert (c.core.engine.class_packets, c.core.engine.class_copies) == ([4], [8])


def test_control_datagrams_go_out_unmarked(pki: Path) -> None:
    """Only DATA carries the class's outer TOS; probes and other control datagrams go out with 0."""
    net, c = two_paths(pki)
    c.core.set_policy(load_policy(WEBRTC))
    net.advance(0.25)
    c.core.send_packet(v4(EF << 2, UP_SRC, UP_DST), net.now)
    net.now += 0.125  # a probe interval: both sides have PINGs due
    c.core.handle_timer(net.now)
    net.server.handle_timer(net.now)
    tos_up = sorted(tos for _, _, tos in c.core.datagrams_to_send())
    tos_down = [tos for _, _, tos in net.server.datagrams_to_send()]
    assert tos_up.count(0xB8) == 2 and tos_up.count(0) >= 2 and len(tos_up) == tos_up.count(0) + 2
    assert tos_down and set(tos_down) == {0}


def test_server_outer_tos_per_class_with_the_webrtc_policy(pki: Path) -> None:
    net, c = two_paths(pki)
    policy = load_policy(WEBRTC)
    net.server.set_policy(policy)
    t = net.tunnel()
    assert t.policy is policy and t.stats()["policy"] == str(WEBRTC)
    net.server.datagrams_to_send()

    def sent(pkt: bytes) -> list[tuple]:
        before = len(net.server.outbox)
        net.server.send_packet(pkt, net.now)
        return sorted((net.owner[a][1], tos) for a, _, tos in net.server.outbox[before:])

    assert sent(v4((EF << 2) | ECT0, UP_DST, UP_SRC)) == [("a", 0xBA), ("b", 0xBA)]
    stun = b"\x0b\xb8\x2e\xe0" + b"\x00\x1c\x00\x00" + b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)  # 3000 -> 12000
    assert sent(v4(ECT1, UP_DST, UP_SRC, proto=17, payload=stun)) == [("a", 0xB9), ("b", 0xB9)]  # unmarked STUN
    assert sent(v4((24 << 2) | CE, UP_DST, UP_SRC, proto=6)) == [("a", 0x63), ("b", 0x63)]  # CS3: redundant over 2
    (bulk,) = sent(v4(ECT0, UP_DST, UP_SRC, proto=6))
    assert bulk[1] == ECT0
    stats = {s["name"]: (s["packets"], s["copies"]) for s in t.stats()["classes"]}
    assert stats == {"media": (1, 2), "media-unmarked": (1, 2), "signalling": (1, 2), "default": (1, 1)}
    # back to no policy: one class in the client's mode, outer DSCP 0
    net.server.set_policy(None)
    assert sent(v4((EF << 2) | ECT0, UP_DST, UP_SRC)) == [("a", ECT0), ("b", ECT0)]
    assert [cl.name for cl in net.tunnel().policy.classes] == ["default"]


def test_set_policy_resets_class_counters_and_keeps_the_tunnel(pki: Path) -> None:
    net, c = two_paths(pki)
    c.core.set_policy(load_policy(WEBRTC))
    c.core.send_packet(v4(EF << 2, UP_SRC, UP_DST), net.now)
    assert c.core.engine.class_packets == [1, 0, 0, 0]
    c.core.set_policy(Policy.single("backup"))
    assert c.core.engine.class_packets == [0] and c.core.state == "up"
    before = len(c.core.outbox)
    c.core.send_packet(v4((EF << 2) | ECT1, UP_SRC, UP_DST), net.now)
    assert data_tos(c.core.outbox[before:]) == [("a", ECT1)]  # backup: priority 0 path only, DSCP 0
