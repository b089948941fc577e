"""Tests for tunnel/core/policy.py: policy files -> a compiled packet classifier.

Pure: packets are built here byte by byte (IPv4 with a correct header
checksum, IPv6 with the traffic class split across bytes 0 and 1).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tunnel.app.daemon import reloader
from tunnel.wire.ecn import ipv4_checksum
from tunnel.core.policy import (
    DSCP_NAMES,
    INHERIT,
    Policy,
    SSRC_FLOWS,
    STUN_COOKIE,
    PayloadKind,
    PolicyError,
    TrafficClass,
    inner_dscp,
    parse_policy,
)
from tunnel.app.config import load_policy
from tunnel.core.scheduler import MODES

WEBRTC = Path(__file__).resolve().parent.parent / "policies" / "webrtc.toml"
TCP, UDP, ICMP, SCTP, GRE, ICMPV6 = 6, 17, 1, 132, 47, 58
EF, AF41, CS3 = 46, 34, 24


# -- packets -----------------------------------------------------------------------------------------
def v4(dscp: int = 0, ecn: int = 0, proto: int = UDP, src: str = "192.0.2.1", dst: str = "198.51.100.2",
       sport: int = 40000, dport: int = 40001, payload: bytes = b"payload!") -> bytes:
    """An IPv4 packet with a valid header checksum and a transport header with ports."""
    l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + payload
    hdr = bytearray(
        bytes([0x45, (dscp << 2) | ecn]) + (20 + len(l4)).to_bytes(2, "big") + bytes(4) + bytes([64, proto, 0, 0])
        + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    )
    hdr[10:12] = ipv4_checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + l4


def v6(dscp: int = 0, ecn: int = 0, nh: int = UDP, src: str = "2001:db8::1", dst: str = "2001:db8:1::2",
       sport: int = 40000, dport: int = 40001, flow: int = 0xABCDE, payload: bytes = b"payload!") -> bytes:
    """An IPv6 packet: version 6, traffic class (DSCP << 2 | ECN) in bits 4-11, flow label after it."""
    l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + payload
    first = (6 << 28) | (((dscp << 2) | ecn) << 20) | flow
    return (
        first.to_bytes(4, "big") + len(l4).to_bytes(2, "big") + bytes([nh, 64])
        + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + l4
    )


def policy_of(*classes: dict, source: str = "test.toml") -> Policy:
    return parse_policy({"class": list(classes)}, source)


def name_of(policy: Policy, pkt: bytes) -> str:
    return policy.classify(pkt).name


@pytest.fixture(scope="module")
def webrtc() -> Policy:
    return load_policy(WEBRTC)


# -- the shipped webrtc example ----------------------------------------------------------------------
def test_webrtc_example_loads(webrtc: Policy) -> None:
    assert webrtc.source == str(WEBRTC)
    got = [(c.name, c.index, c.mode, c.outer_dscp) for c in webrtc.classes]
    assert got == [
        ("media", 0, "duplicate", EF),
        ("media-unmarked", 1, "duplicate", EF),
        ("signalling", 2, "redundant", CS3),
        ("default", 3, "balance", 0),
    ]
    assert webrtc.classes[2].redundancy == 2
    assert webrtc.classes[-1].matches_all and not any(c.matches_all for c in webrtc.classes[:-1])


@pytest.mark.parametrize("dscp", ["EF", "AF41", "AF42", "AF43", "CS4", "CS5"])
@pytest.mark.parametrize("ecn", [0, 1, 2, 3])
@pytest.mark.parametrize("proto", [UDP, TCP])
def test_webrtc_marked_media(webrtc: Policy, dscp: str, ecn: int, proto: int) -> None:
    pkt = v4(DSCP_NAMES[dscp], ecn, proto)
    c = webrtc.classify(pkt)
    assert c.name == "media"
    assert webrtc.outer_tos(c, pkt) == 0xB8 | ecn  # EF, and the inner ECN field copied


def udp_payload(payload: bytes) -> bytes:
    """What follows the ports in v4()/v6(): the UDP length and checksum, then ``payload``."""
    return (8 + len(payload)).to_bytes(2, "big") + bytes(2) + payload


RTP = bytes([0x80, 111]) + (7).to_bytes(2, "big") + (160).to_bytes(4, "big") + b"\x0a\x0b\x0c\x0d" + bytes(60)
RTCP_SR = bytes([0x81, 200]) + (12).to_bytes(2, "big") + b"\x0a\x0b\x0c\x0d" + bytes(48)
STUN = bytes([0x00, 0x01, 0x00, 0x08]) + STUN_COOKIE + bytes(12) + bytes(8)
TURN_CHANNEL = bytes([0x40, 0x01]) + (len(RTP)).to_bytes(2, "big") + RTP
DTLS = bytes([22, 0xFE, 0xFD]) + bytes(8) + (40).to_bytes(2, "big") + bytes(40)


@pytest.mark.parametrize("ports", [(50123, 61987), (3478, 40000), (40000, 10000)])
@pytest.mark.parametrize("kind, payload", [("rtcp", RTCP_SR), ("stun", STUN), ("turn-channel", TURN_CHANNEL)])
def test_webrtc_unmarked_media_by_payload_on_any_port(webrtc: Policy, ports, kind: str, payload: bytes) -> None:
    pkt = v4(proto=UDP, ecn=2, sport=ports[0], dport=ports[1], payload=udp_payload(payload))
    c = webrtc.classify(pkt)
    assert c.name == "media-unmarked", kind
    assert webrtc.outer_tos(c, pkt) == 0xB8 | 2


def test_webrtc_unmarked_rtp_is_media_from_the_second_packet_of_a_stream(webrtc: Policy) -> None:
    pkt = v4(proto=UDP, sport=51001, dport=62002, payload=udp_payload(RTP))
    assert [webrtc.classify(pkt).name for _ in range(3)] == ["default", "media-unmarked", "media-unmarked"]
    other_flow = v4(proto=UDP, sport=51001, dport=62003, payload=udp_payload(RTP))
    assert webrtc.classify(other_flow).name == "default"  # an SSRC is remembered per flow


def test_webrtc_dtls_is_default(webrtc: Policy) -> None:
    """DTLS carries data channels after the handshake (maybe bulk): not duplicated."""
    assert webrtc.classify(v4(proto=UDP, payload=udp_payload(DTLS))).name == "default"


@pytest.mark.parametrize("pkt", [
    v4(proto=UDP, dport=9999), v4(proto=UDP, dport=20001), v4(proto=UDP, dport=3479),
    v4(proto=TCP, dport=12000, payload=udp_payload(STUN)),  # media-unmarked is UDP only
    v4(proto=TCP, dport=443), v4(proto=ICMP),
])
def test_webrtc_everything_else_is_default(webrtc: Policy, pkt: bytes) -> None:
    c = webrtc.classify(pkt)
    assert c.name == "default" and webrtc.outer_tos(c, pkt) == 0


@pytest.mark.parametrize("dscp", ["CS3", "AF31", "AF32", "AF33"])
def test_webrtc_signalling(webrtc: Policy, dscp: str) -> None:
    pkt = v4(DSCP_NAMES[dscp], 1, TCP, dport=443)
    c = webrtc.classify(pkt)
    assert c.name == "signalling"
    assert webrtc.outer_tos(c, pkt) == (CS3 << 2) | 1 == 0x61


def test_webrtc_plain_tcp_is_default_and_unmarked(webrtc: Policy) -> None:
    for dscp in (0, 8, 10, 18, 48):  # unmarked, CS1, AF11, AF21, CS6: no class of their own
        for ecn in range(4):
            pkt = v4(dscp, ecn, TCP, dport=443)
            c = webrtc.classify(pkt)
            assert c.name == "default"
            assert webrtc.outer_tos(c, pkt) == ecn  # DSCP 0: nothing of the inner mark leaks


def test_outer_ecn_is_the_inner_ecn_for_every_class_and_tos(webrtc: Policy) -> None:
    """RFC 6040 normal mode: Not-ECT, ECT(1), ECT(0) and CE are all copied to the outer header."""
    for tos in range(256):
        for pkt in (v4(tos >> 2, tos & 3, UDP), v4(tos >> 2, tos & 3, TCP, dport=12000)):
            c = webrtc.classify(pkt)
            outer = webrtc.outer_tos(c, pkt)
            assert outer & 3 == tos & 3
            assert outer >> 2 == c.outer_dscp


def test_inherit_copies_the_inner_dscp() -> None:
    p = policy_of({"name": "all", "outer_dscp": "inherit"})
    assert p.classes[0].outer_dscp == INHERIT
    for tos in range(256):
        pkt4 = v4(tos >> 2, tos & 3)
        assert p.outer_tos(p.classify(pkt4), pkt4) == tos
        pkt6 = v6(tos >> 2, tos & 3)
        assert p.outer_tos(p.classify(pkt6), pkt6) == tos


# -- IPv6 ----------------------------------------------------------------------------------------------
def test_ipv6_traffic_class_is_read_across_bytes_0_and_1() -> None:
    pkt = v6(EF, 2)
    # traffic class 0xBA = 1011 1010: low nibble of byte 0, high nibble of byte 1
    assert pkt[0] == 0x6B and pkt[1] >> 4 == 0xA and pkt[1] & 0xF == 0xA  # flow label 0xABCDE starts with A
    assert inner_dscp(pkt) == EF
    for dscp in range(64):
        assert inner_dscp(v6(dscp, 3, flow=0xFFFFF)) == dscp
        assert inner_dscp(v6(dscp, 0, flow=0)) == dscp


@pytest.mark.parametrize("ecn", [0, 1, 2, 3])
def test_ipv6_webrtc(webrtc: Policy, ecn: int) -> None:
    cases = [
        (v6(EF, ecn), "media", 0xB8),
        (v6(AF41, ecn, TCP), "media", 0xB8),
        (v6(0, ecn, UDP, dport=12000, payload=udp_payload(STUN)), "media-unmarked", 0xB8),
        (v6(0, ecn, UDP, sport=3478, payload=udp_payload(RTCP_SR)), "media-unmarked", 0xB8),
        (v6(0, ecn, UDP, dport=12000), "default", 0),
        (v6(CS3, ecn, TCP), "signalling", CS3 << 2),
        (v6(0, ecn, TCP, dport=12000), "default", 0),
        (v6(10, ecn, ICMPV6), "default", 0),
    ]
    for pkt, name, dscp_bits in cases:
        c = webrtc.classify(pkt)
        assert c.name == name
        assert webrtc.outer_tos(c, pkt) == dscp_bits | ecn


# -- matching ------------------------------------------------------------------------------------------
def test_ports_src_dst_either_and_ranges() -> None:
    p = policy_of(
        {"name": "src", "match": {"src_ports": [53, "5000-5010"]}},
        {"name": "dst", "match": {"dst_ports": "8000-8080"}},
        {"name": "either", "match": {"ports": 9000}},
        {"name": "default"},
    )
    cases = {
        (53, 1): "src", (5000, 1): "src", (5010, 1): "src", (5005, 8000): "src",  # first match wins
        (5011, 1): "default", (1, 53): "default", (1, 5005): "default",
        (1, 8000): "dst", (1, 8080): "dst", (1, 8081): "default", (8000, 1): "default",
        (9000, 1): "either", (1, 9000): "either", (8999, 9001): "default",
    }
    for proto in (UDP, TCP, SCTP):
        for (sport, dport), want in cases.items():
            assert name_of(p, v4(proto=proto, sport=sport, dport=dport)) == want, (proto, sport, dport)
            assert name_of(p, v6(nh=proto, sport=sport, dport=dport)) == want, (proto, sport, dport)
    # ports only exist for TCP, UDP and SCTP
    assert name_of(p, v4(proto=ICMP, sport=53, dport=9000)) == "default"
    assert name_of(p, v4(proto=GRE, sport=53, dport=9000)) == "default"


def test_port_ranges_at_the_limits() -> None:
    p = policy_of({"name": "all-ports", "match": {"ports": "0-65535", "protocol": "udp"}}, {"name": "d"})
    for port in (0, 1, 65535):
        assert name_of(p, v4(sport=port, dport=port)) == "all-ports"
    assert p.classes[0].checks  # not a match-all class: it still needs UDP
    assert name_of(p, v4(proto=TCP)) == "d"


def test_ports_of_a_packet_with_ip_options() -> None:
    """The transport header starts after IHL * 4 bytes, not always at 20."""
    p = policy_of({"name": "dns", "match": {"dst_ports": 53}}, {"name": "d"})
    base = v4(proto=UDP, dport=53)
    hdr = bytearray(base[:20])
    hdr[0] = 0x46  # IHL 6: one word of options
    hdr[2:4] = (len(base) + 4).to_bytes(2, "big")
    hdr[10:12] = b"\0\0"
    hdr += b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    hdr[10:12] = ipv4_checksum(bytes(hdr)).to_bytes(2, "big")
    pkt = bytes(hdr) + base[20:]
    assert name_of(p, pkt) == "dns"
    # options that look like destination port 53 are not mistaken for the ports (80 here)
    other = v4(proto=UDP, dport=80)
    assert name_of(p, bytes(hdr[:20]) + b"\x00\x00\x00\x35" + other[20:]) == "d"


def test_protocol_names_and_numbers() -> None:
    p = policy_of(
        {"name": "tcp", "match": {"protocol": "TCP"}},
        {"name": "udp-or-sctp", "match": {"protocol": ["udp", 132]}},
        {"name": "gre", "match": {"protocol": 47}},
        {"name": "icmp", "match": {"protocol": ["icmp", "icmpv6"]}},
        {"name": "default"},
    )
    assert name_of(p, v4(proto=TCP)) == "tcp"
    assert name_of(p, v4(proto=UDP)) == "udp-or-sctp"
    assert name_of(p, v4(proto=SCTP)) == "udp-or-sctp"
    assert name_of(p, v4(proto=GRE)) == "gre"
    assert name_of(p, v4(proto=ICMP)) == "icmp"
    assert name_of(p, v6(nh=ICMPV6)) == "icmp"
    assert name_of(p, v6(nh=TCP)) == "tcp"
    assert name_of(p, v4(proto=50)) == "default"  # ESP


def test_cidrs_src_dst_either_ipv4_and_ipv6() -> None:
    p = policy_of(
        {"name": "from-lan", "match": {"src": ["10.1.0.0/16", "2001:db8:a::/48"]}},
        {"name": "to-sfu", "match": {"dst": ["203.0.113.7", "2001:db8:5f::/64"]}},
        {"name": "either", "match": {"cidrs": ["198.18.0.0/15", "fd00::/8"]}},
        {"name": "default"},
    )
    cases4 = [
        ("10.1.2.3", "8.8.8.8", "from-lan"), ("10.2.0.1", "8.8.8.8", "default"),
        ("8.8.8.8", "10.1.2.3", "default"),  # src only
        ("8.8.8.8", "203.0.113.7", "to-sfu"), ("203.0.113.7", "8.8.8.8", "default"),  # dst only
        ("8.8.8.8", "203.0.113.8", "default"),  # a bare address is a /32
        ("198.19.255.255", "8.8.8.8", "either"), ("8.8.8.8", "198.18.0.1", "either"),
        ("10.1.0.1", "203.0.113.7", "from-lan"),  # first match wins
    ]
    for src, dst, want in cases4:
        assert name_of(p, v4(src=src, dst=dst)) == want, (src, dst)
    cases6 = [
        ("2001:db8:a:ffff::1", "2001:db8::9", "from-lan"), ("2001:db8:b::1", "2001:db8::9", "default"),
        ("2001:db8::9", "2001:db8:a::1", "default"),
        ("2001:db8::9", "2001:db8:5f::1234", "to-sfu"), ("2001:db8::9", "2001:db8:5f:1::1", "default"),
        ("fd12::1", "2001:db8::9", "either"), ("2001:db8::9", "fdff::1", "either"), ("fe80::1", "::1", "default"),
    ]
    for src, dst, want in cases6:
        assert name_of(p, v6(src=src, dst=dst)) == want, (src, dst)


def test_ipv4_prefixes_never_match_ipv6_packets_and_back() -> None:
    p = policy_of(
        {"name": "v4-any", "match": {"cidrs": "0.0.0.0/0"}},
        {"name": "v6-any", "match": {"cidrs": "::/0"}},
        {"name": "default"},
    )
    assert name_of(p, v4()) == "v4-any"
    assert name_of(p, v6()) == "v6-any"
    # an IPv6 packet whose first address bytes look like 10.0.0.0/8 in IPv4 positions
    q = policy_of({"name": "ten", "match": {"src": "10.0.0.0/8"}}, {"name": "default"})
    assert name_of(q, v6(src="0a00::1", dst="0a00::2")) == "default"
    assert name_of(q, v4(src="10.9.9.9")) == "ten"


def test_all_keys_of_a_class_must_match() -> None:
    p = policy_of(
        {"name": "rtp", "match": {"dscp": ["EF", 34], "protocol": "udp", "dst_ports": "10000-20000",
                                  "dst": "203.0.113.0/24"}},
        {"name": "default"},
    )
    good = dict(dscp=EF, proto=UDP, dport=15000, dst="203.0.113.9")
    assert name_of(p, v4(**good)) == "rtp"
    assert name_of(p, v4(**{**good, "dscp": AF41})) == "rtp"
    for change in ({"dscp": 0}, {"proto": TCP}, {"dport": 9999}, {"dst": "203.0.114.9"}):
        assert name_of(p, v4(**{**good, **change})) == "default", change


def test_first_match_wins() -> None:
    a = {"name": "a", "match": {"protocol": "udp"}, "mode": "duplicate"}
    b = {"name": "b", "match": {"dscp": "EF"}, "mode": "backup"}
    pkt = v4(EF, 0, UDP)
    assert name_of(policy_of(a, b, {"name": "d"}), pkt) == "a"
    assert name_of(policy_of(b, a, {"name": "d"}), pkt) == "b"
    # the DSCP table must not reorder classes: a port class before a DSCP class still wins
    c = {"name": "c", "match": {"ports": 40001}}
    assert name_of(policy_of(c, b, {"name": "d"}), pkt) == "c"
    assert name_of(policy_of(b, c, {"name": "d"}), pkt) == "b"


def test_dscp_names_numbers_and_case() -> None:
    p = policy_of({"name": "x", "match": {"dscp": ["ef", "Af41", 0, "cs0", "le", "VOICE-ADMIT", 63]}}, {"name": "d"})
    assert p.classes[0].dscp == frozenset({46, 34, 0, 1, 44, 63})
    q = policy_of({"name": "x", "match": {"dscp": "ef"}, "outer_dscp": "af41"}, {"name": "d", "outer_dscp": 10})
    assert (q.classes[0].outer_dscp, q.classes[1].outer_dscp) == (AF41, 10)


def test_dscp_names_table() -> None:
    # RFC 2474 class selectors, RFC 2597 AF, RFC 3246 EF, RFC 5865 VOICE-ADMIT, RFC 8622 LE
    for n in range(8):
        assert DSCP_NAMES[f"CS{n}"] == n << 3
    for x in range(1, 5):
        for y in range(1, 4):
            assert DSCP_NAMES[f"AF{x}{y}"] == (x << 3) | (y << 1)
    assert (DSCP_NAMES["EF"], DSCP_NAMES["VOICE-ADMIT"], DSCP_NAMES["LE"], DSCP_NAMES["DF"]) == (46, 44, 1, 0)


def test_class_defaults_and_reorder_on_balance() -> None:
    p = policy_of({"name": "bulk", "match": {"protocol": "tcp"}, "reorder": True, "reorder_ms": 20}, {"name": "d"})
    c, d = p.classes
    assert (c.mode, c.reorder, c.reorder_ms) == ("balance", True, 20)
    # balance reorders unless told not to (the hold follows the paths; reorder_ms until they have models)
    assert (d.name, d.mode, d.redundancy, d.outer_dscp, d.reorder, d.reorder_ms) == ("d", "balance", 2, 0, True, 50)
    assert not policy_of({"name": "x", "reorder": False}).classes[0].reorder
    assert not policy_of({"name": "x", "mode": "duplicate"}).classes[0].reorder
    unnamed = policy_of({"match": {"protocol": "tcp"}}, {})
    assert [x.name for x in unnamed.classes] == ["#1", "#2"]


# -- bad and odd packets -------------------------------------------------------------------------------
TRUNCATED = [
    v4(proto=UDP, dport=12000)[:19],  # IPv4 header cut short
    v4(proto=UDP, dport=12000)[:22],  # ports cut short
    v4(proto=UDP, dport=12000)[:23],
    v6(nh=UDP, dport=12000)[:39],
    v6(nh=UDP, dport=12000)[:42],
    v4(proto=UDP)[:2],
    b"\x45\x00",
    b"\x60\x00",
]
NON_IP = [b"\x00\x00" + bytes(40), b"\x50\x00" + bytes(40), b"\xf0\x00" + bytes(40), b"\x10\x00"]


@pytest.mark.parametrize("pkt", TRUNCATED + NON_IP)
def test_truncated_and_non_ip_packets_fall_to_the_default(webrtc: Policy, pkt: bytes) -> None:
    c = webrtc.classify(pkt)
    assert c is webrtc.classes[-1]
    assert webrtc.outer_tos(c, pkt) in range(256)


def test_ipv4_header_length_beyond_the_packet() -> None:
    p = policy_of({"name": "ports", "match": {"ports": "0-65535"}}, {"name": "d"})
    pkt = bytearray(v4())
    pkt[0] = 0x4F  # IHL 15: 60 bytes of header, but the packet has 32
    assert name_of(p, bytes(pkt)) == "d"


@pytest.mark.parametrize("pkt", [b"\x45", b"\x60", b"\x00", b"\xff"])
def test_one_byte_packets_fall_to_the_default(webrtc: Policy, pkt: bytes) -> None:
    c = webrtc.classify(pkt)
    assert c is webrtc.classes[-1]
    webrtc.outer_tos(c, pkt)


@pytest.mark.parametrize("pkt", [b"\x00\xb8" + bytes(40), b"\x50\xb8" + bytes(40), b"\x45\xb8" + bytes(10)])
def test_non_ip_packets_that_look_marked_fall_to_the_default(webrtc: Policy, pkt: bytes) -> None:
    assert webrtc.classify(pkt) is webrtc.classes[-1]


@settings(max_examples=400, deadline=None)
@given(pkt=st.binary(min_size=2, max_size=80))
def test_classify_never_raises_on_random_bytes(webrtc: Policy, pkt: bytes) -> None:
    c = webrtc.classify(pkt)
    assert c in webrtc.classes
    assert webrtc.outer_tos(c, pkt) in range(256)


@settings(max_examples=200, deadline=None)
@given(
    version=st.sampled_from([b"\x45", b"\x46", b"\x4f", b"\x60", b"\x6f"]),
    rest=st.binary(min_size=1, max_size=70),
)
def test_classify_never_raises_on_random_ip_looking_bytes(webrtc: Policy, version: bytes, rest: bytes) -> None:
    everything = policy_of(
        {"name": "a", "match": {"dscp": "EF", "protocol": "udp", "src_ports": "1-100"}},
        {"name": "b", "match": {"dst": ["10.0.0.0/8", "fd00::/8"], "dst_ports": 5}},
        {"name": "c", "match": {"cidrs": ["0.0.0.0/1", "::/1"], "ports": [1, "7-9"]}},
        {"name": "d", "match": {"protocol": ["tcp", "icmp"]}},
        {"name": "default"},
    )
    pkt = version + rest
    for pol in (webrtc, everything):
        c = pol.classify(pkt)
        assert c in pol.classes
        assert pol.outer_tos(c, pkt) in range(256)


# -- no policy file -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_single_policy_outer_dscp_zero_and_ecn_carried(mode: str) -> None:
    p = Policy.single(mode, 3)
    (c,) = p.classes
    assert (c.name, c.index, c.mode, c.redundancy, c.outer_dscp) == ("default", 0, mode, 3, 0)
    assert p.source == "(built in)"
    for tos in range(256):
        for pkt in (v4(tos >> 2, tos & 3), v6(tos >> 2, tos & 3)):
            assert p.classify(pkt) is c
            assert p.outer_tos(c, pkt) == tos & 3  # EF inside stays inside; only ECN goes out


def test_policy_needs_a_default_class() -> None:
    with pytest.raises(PolicyError, match="last class must match everything"):
        Policy([TrafficClass("x", 0, dscp=frozenset({46}))])
    with pytest.raises(PolicyError):
        Policy([])


# -- errors name the file, the class and the key ------------------------------------------------------
def write(tmp_path: Path, text: str, name: str = "pol.toml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def error_of(tmp_path: Path, text: str) -> tuple[Path, str]:
    f = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    return f, str(info.value)


DEFAULT = '\n[[class]]\nname = "default"\n'
BAD_CLASSES = [
    ('name = "m"\nmatch.dscp = ["EF", "XF99"]', "m", "match.dscp", "XF99"),
    ('name = "m"\nmatch.dscp = 64', "m", "match.dscp", "64"),
    ('name = "m"\nmatch.dscp = "EF"\nouter_dscp = "GOLD"', "m", "outer_dscp", "GOLD"),
    ('name = "m"\nmatch.dscp = "EF"\nouter_dscp = true', "m", "outer_dscp", "True"),
    ('name = "p"\nmatch.ports = "2000-1000"', "p", "match.ports", "2000-1000"),
    ('name = "p"\nmatch.ports = "abc"', "p", "match.ports", "abc"),
    ('name = "p"\nmatch.ports = 70000', "p", "match.ports", "70000"),
    ('name = "p"\nmatch.src_ports = ["1-2-3"]', "p", "match.src_ports", "1-2-3"),
    ('name = "p"\nmatch.dst_ports = "-5"', "p", "match.dst_ports", "-5"),
    ('name = "p"\nmatch.dst_ports = 1.5', "p", "match.dst_ports", "1.5"),
    ('name = "p"\nmatch.ports = -1', "p", "match.ports", "-1"),
    ('name = "k"\nmatch.port = 80', "k", "match.port", "unknown match key"),
    ('name = "k"\nmatch.dscp = "EF"\npriority = 1', "k", "priority", "unknown key"),
    ('name = "k"\nmatch.dscp = "EF"\nmode = "fastest"', "k", "mode", "fastest"),
    ('name = "r"\nmatch.dscp = "EF"\nmode = "redundant"\nredundancy = 0', "r", "redundancy", "0"),
    ('name = "r"\nmatch.dscp = "EF"\nmode = "redundant"\nredundancy = 17', "r", "redundancy", "17"),
    ('name = "r"\nmatch.dscp = "EF"\nmode = "redundant"\nredundancy = "2"', "r", "redundancy", "'2'"),
    ('name = "r"\nmatch.dscp = "EF"\nmode = "redundant"\nredundancy = true', "r", "redundancy", "True"),
    ('name = "o"\nmatch.dscp = "EF"\nmode = "duplicate"\nreorder = true', "o", "reorder", "only balance"),
    ('name = "o"\nmatch.dscp = "EF"\nreorder = "yes"', "o", "reorder", "yes"),
    ('name = "o"\nmatch.dscp = "EF"\nreorder = true\nreorder_ms = 0', "o", "reorder_ms", "0"),
    ('name = "o"\nmatch.dscp = "EF"\nreorder_ms = 5000', "o", "reorder_ms", "5000"),
    ('name = "x"\nmatch.protocol = "gre"', "x", "match.protocol", "gre"),
    ('name = "x"\nmatch.protocol = 256', "x", "match.protocol", "256"),
    ('name = "c"\nmatch.src = "10.0.0.0/33"', "c", "match.src", "10.0.0.0/33"),
    ('name = "c"\nmatch.cidrs = ["10.0.0.0/8", "lan"]', "c", "match.cidrs", "lan"),
    ('name = "c"\nmatch.dst = "2001:db8::/129"', "c", "match.dst", "2001:db8::/129"),
    ('name = "t"\nmatch = "EF"', "t", "match", "expected a table"),
]


@pytest.mark.parametrize(("body", "cls", "key", "detail"), BAD_CLASSES, ids=[b[0].split("\n")[-1] for b in BAD_CLASSES])
def test_errors_name_file_class_and_key(tmp_path: Path, body: str, cls: str, key: str, detail: str) -> None:
    f, msg = error_of(tmp_path, "[[class]]\n" + body + "\n" + DEFAULT)
    assert msg.startswith(f"{f}: class '{cls}': {key}: "), msg
    assert detail in msg


def test_unknown_dscp_name_lists_the_known_ones(tmp_path: Path) -> None:
    _, msg = error_of(tmp_path, '[[class]]\nname = "m"\nmatch.dscp = "EF2"\n' + DEFAULT)
    assert "unknown DSCP name 'EF2'" in msg and "AF41" in msg and "0 to 63" in msg


def test_missing_default_class(tmp_path: Path) -> None:
    f, msg = error_of(tmp_path, '[[class]]\nname = "media"\nmatch.dscp = "EF"\n[[class]]\nname = "tcp"\nmatch.protocol = "tcp"\n')
    assert msg.startswith(f"{f}: class 'tcp': match: ")
    assert "last class must match everything" in msg


def test_match_all_class_before_the_end(tmp_path: Path) -> None:
    f, msg = error_of(tmp_path, '[[class]]\nname = "all"\nmode = "duplicate"\n[[class]]\nname = "x"\nmatch.dscp = "EF"\n' + DEFAULT)
    assert msg.startswith(f"{f}: class 'all' ") and "matches everything" in msg
    f, msg = error_of(tmp_path, '[[class]]\nname = "empty"\nmatch = {}\n' + DEFAULT)
    assert msg.startswith(f"{f}: class 'empty' ") and "matches everything" in msg


def test_duplicate_class_names(tmp_path: Path) -> None:
    f, msg = error_of(tmp_path, '[[class]]\nname = "x"\nmatch.dscp = "EF"\n[[class]]\nname = "x"\nmatch.dscp = "CS3"\n' + DEFAULT)
    assert msg == f"{f}: class 'x': name: used twice"


def test_bad_class_name(tmp_path: Path) -> None:
    f, msg = error_of(tmp_path, "[[class]]\nname = 5\n" + DEFAULT)
    assert msg.startswith(f"{f}: class #1: name: ")
    f, msg = error_of(tmp_path, '[[class]]\nname = ""\n' + DEFAULT)
    assert msg.startswith(f"{f}: class #1: name: ")


def test_file_level_errors(tmp_path: Path) -> None:
    f, msg = error_of(tmp_path, '[[class]]\nname = "x\n')
    assert msg.startswith(f"{f}: not valid TOML: ")
    f, msg = error_of(tmp_path, "")
    assert msg == f"{f}: no [[class]] tables"
    f, msg = error_of(tmp_path, '[class]\nname = "x"\n')
    assert msg == f"{f}: no [[class]] tables"
    f, msg = error_of(tmp_path, 'version = 1\n[[class]]\nname = "d"\n')
    assert msg.startswith(f"{f}: unknown key 'version'")
    f, msg = error_of(tmp_path, "class = [1, 2]\n")
    assert msg.startswith(f"{f}: class #1 is not a table")
    missing = tmp_path / "nope.toml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    assert str(info.value) == f"{missing}: file not found"


def test_superscript_port_is_a_policy_error(tmp_path: Path) -> None:
    error_of(tmp_path, '[[class]]\nname = "p"\nmatch.ports = "²"\n' + DEFAULT)


def test_integer_address_is_a_policy_error(tmp_path: Path) -> None:
    error_of(tmp_path, '[[class]]\nname = "c"\nmatch.src = 5\n' + DEFAULT)


def test_non_utf8_file_is_a_policy_error(tmp_path: Path) -> None:
    f = tmp_path / "latin1.toml"
    f.write_bytes('# caf\xe9\n[[class]]\nname = "d"\n'.encode("latin-1"))
    with pytest.raises(PolicyError):
        load_policy(f)


def test_directory_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError):
        load_policy(tmp_path)


# -- SIGHUP reload (tunnel/app/daemon.py reloader) -----------------------------------------------------------
class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log() -> logging.Logger:
    logger = logging.getLogger("mptun.test_policy")
    logger.handlers[:] = [Recorder()]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


def logged(log: logging.Logger) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in log.handlers[0].records]


def test_reload_applies_a_good_file(tmp_path: Path, log: logging.Logger) -> None:
    f = write(tmp_path, WEBRTC.read_text())
    applied: list[Policy] = []
    reload = reloader(f, applied.append, log)
    reload()
    assert len(applied) == 1 and [c.name for c in applied[0].classes] == ["media", "media-unmarked", "signalling", "default"]
    f.write_text('[[class]]\nname = "everything"\nmode = "backup"\n')
    reload()
    assert len(applied) == 2 and [c.mode for c in applied[1].classes] == ["backup"]
    assert [lvl for lvl, _ in logged(log)] == [logging.INFO, logging.INFO]
    assert "(1 classes)" in logged(log)[1][1]


@pytest.mark.parametrize("text", ['[[class]]\nname = "x\n', '[[class]]\nname = "m"\nmatch.dscp = "XF"\n' + DEFAULT])
def test_reload_of_a_bad_file_keeps_the_old_policy_and_says_why(tmp_path: Path, log: logging.Logger, text: str) -> None:
    f = write(tmp_path, text)
    applied: list = []
    reloader(f, applied.append, log)()
    assert applied == []
    ((level, msg),) = logged(log)
    assert level == logging.ERROR and "keeping the old one" in msg and str(f) in msg


def test_reload_of_a_deleted_file_keeps_the_old_policy(tmp_path: Path, log: logging.Logger) -> None:
    applied: list = []
    reloader(tmp_path / "gone.toml", applied.append, log)()
    assert applied == [] and "file not found" in logged(log)[0][1]


def test_reload_without_a_policy_file_does_nothing(log: logging.Logger) -> None:
    applied: list = []
    reloader(None, applied.append, log)()
    assert applied == [] and logged(log)[0][0] == logging.INFO


def test_reload_of_a_non_utf8_file_keeps_the_old_policy(tmp_path: Path, log: logging.Logger) -> None:
    f = tmp_path / "p.toml"
    f.write_bytes(b"\xff\xfe[[class]]\n")
    applied: list = []
    reloader(f, applied.append, log)()
    assert applied == [] and logged(log)[0][0] == logging.ERROR


# -- cost ------------------------------------------------------------------------------------------------
def test_classification_cost(webrtc: Policy, capsys) -> None:
    """A guard against per-packet policy parsing, not a benchmark: 100k packets well under 5 s."""
    mix = [
        v4(EF, 2, UDP), v4(0, 0, UDP, dport=12000), v4(CS3, 0, TCP, dport=443), v4(0, 1, TCP, dport=443),
        v4(0, 0, UDP, dport=53), v6(AF41, 2), v6(0, 0, TCP), v4(10, 0, UDP, dport=40000),
    ]
    pkts = mix * (100_000 // len(mix))
    classify, outer_tos = webrtc.classify, webrtc.outer_tos
    t0 = time.perf_counter()
    for pkt in pkts:
        outer_tos(classify(pkt), pkt)
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nclassify + outer_tos: {1e6 * elapsed / len(pkts):.2f} us/packet ({len(pkts)} packets, {elapsed:.3f} s)")
    assert elapsed < 5.0


def test_policy_examples_in_the_docs_load() -> None:
    """Every [[class]] TOML block in docs/POLICY.md is a valid policy."""
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    doc = (Path(__file__).resolve().parent.parent / "docs" / "POLICY.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", doc, re.S) if "[[class]]" in b]
    assert len(blocks) >= 4
    for block in blocks:
        assert parse_policy(tomllib.loads(block), "docs/POLICY.md").classes[-1].matches_all


def test_target_loss_is_a_percentage_for_copying_modes() -> None:
    p = policy_of({"name": "media", "mode": "duplicate", "target_loss": 0.5, "match": {"dscp": "EF"}}, {"name": "d"})
    assert p.classes[0].target_loss == pytest.approx(0.005) and p.classes[1].target_loss is None
    for bad, why in ((0, "from 0.001 to 50"), (51, "from 0.001 to 50"), ("1", "from 0.001 to 50"),
                     (True, "from 0.001 to 50")):
        with pytest.raises(PolicyError, match=f"test.toml: class 'm': target_loss: .*{why}"):
            policy_of({"name": "m", "mode": "duplicate", "target_loss": bad})
    with pytest.raises(PolicyError, match="class 'm': target_loss: only duplicate and redundant"):
        policy_of({"name": "m", "mode": "balance", "target_loss": 1})


# -- match.payload: what the UDP payload is (RFC 7983) ----------------------------------------------
@pytest.mark.parametrize("payload, kind", [
    (RTCP_SR, "rtcp"), (STUN, "stun"), (TURN_CHANNEL, "turn-channel"), (DTLS, "dtls"),
    (bytes([0x81, 201]) + (1).to_bytes(2, "big") + bytes(4), "rtcp"),  # an RR with no report block
])
def test_payload_kinds(payload: bytes, kind: str) -> None:
    k = PayloadKind()
    assert k.of(v4(payload=udp_payload(payload))) == kind
    assert k.of(v6(payload=udp_payload(payload))) == kind


def test_rtp_needs_its_ssrc_seen_before_on_the_same_flow() -> None:
    k = PayloadKind()
    pkt = v4(payload=udp_payload(RTP))
    assert (k.of(pkt), k.of(pkt)) == (None, "rtp")
    video = RTP[:8] + b"\x01\x02\x03\x04" + RTP[12:]  # a second stream bundled on the flow
    assert [k.of(v4(payload=udp_payload(p))) for p in (video, RTP, video)] == [None, "rtp", "rtp"]
    v6pkt = v6(payload=udp_payload(RTP))
    assert (k.of(v6pkt), k.of(v6pkt)) == (None, "rtp")


def test_rtp_behind_ipv4_options() -> None:
    pkt = v4(payload=udp_payload(RTP))
    opts = bytearray(pkt[:20] + bytes(4) + pkt[20:])  # a 24-byte header: IHL 6
    opts[0] = 0x46
    k = PayloadKind()
    assert (k.of(bytes(opts)), k.of(bytes(opts))) == (None, "rtp")


@pytest.mark.parametrize("what, payload", [
    ("WireGuard data (type 4)", bytes([4, 0, 0, 0]) + bytes(28)),
    ("WireGuard handshake (type 1): no STUN cookie", bytes([1, 0, 0, 0]) + bytes(144)),
    ("QUIC short header", bytes([0x43]) + bytes(40)),
    ("QUIC long header", bytes([0xC3, 0, 0, 0, 1]) + bytes(40)),
    ("OpenVPN P_DATA_V2 (0x48): no TURN length", bytes([0x48, 0, 0, 1]) + bytes(60)),
    ("a TLS record (23, 0x03): not DTLS", bytes([23, 3, 3, 0, 20]) + bytes(20)),
    ("RTCP type with a length past the datagram", bytes([0x80, 200, 0, 200]) + bytes(20)),
    ("RTP version 1", bytes([0x40, 111]) + bytes(20)),
    ("RTP payload type 72 (the RTCP range)", bytes([0x80, 72]) + bytes(20)),
    ("too short", bytes([0x80, 111, 0])),
])
def test_what_is_not_media(what: str, payload: bytes) -> None:
    k = PayloadKind()
    pkt = v4(payload=udp_payload(payload))
    assert (k.of(pkt), k.of(pkt)) == (None, None), what


def test_a_later_ipv4_fragment_is_not_read_as_udp() -> None:
    """A later fragment has no UDP header: its bytes are the middle of some datagram."""
    pkt = bytearray(v4(payload=udp_payload(RTCP_SR)))
    k = PayloadKind()
    assert k.of(bytes(pkt)) == "rtcp"
    pkt[6], pkt[7] = 0x00, 0xB9  # fragment offset 185 (x 8 bytes)
    assert k.of(bytes(pkt)) is None
    pkt[6], pkt[7] = 0x20, 0x00  # more fragments, offset 0: the first fragment has the header
    assert k.of(bytes(pkt)) == "rtcp"


def test_payload_needs_udp() -> None:
    k = PayloadKind()
    tcp = v4(proto=TCP, payload=udp_payload(RTCP_SR))
    assert k.of(tcp) is None and k.of(v6(nh=TCP, payload=udp_payload(STUN))) is None


def test_the_ssrc_memory_is_bounded() -> None:
    k = PayloadKind()
    for port in range(SSRC_FLOWS + 10):
        k.of(v4(sport=port % 65536, dport=(port // 65536) + 1, payload=udp_payload(RTP)))
    assert len(k._ssrcs) <= SSRC_FLOWS


def test_payload_match_compiles_and_names_a_bad_kind() -> None:
    p = policy_of({"name": "m", "match": {"payload": ["rtcp", "stun"]}, "mode": "duplicate"}, {"name": "d"})
    assert name_of(p, v4(payload=udp_payload(STUN))) == "m" and name_of(p, v4()) == "d"
    with pytest.raises(PolicyError, match=r"test.toml: class 'm': match.payload: unknown payload 'srtp'"):
        policy_of({"name": "m", "match": {"payload": ["srtp"]}}, {"name": "d"})
