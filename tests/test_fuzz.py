"""Property tests (hypothesis) for everything that reads untrusted input.

Each property: any input gives a value or the module's own error type (FrameError,
PolicyError, ConfigError, None), never another exception; the cores take any datagram
or TUN packet without raising and count what they drop.  The number of examples is
bounded so this file stays fast; ``scripts/fuzz`` runs the same properties for longer
(MPTUN_FUZZ_EXAMPLES, deadline off).
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tunnel.wire import frames
from tunnel.core.client import C_UP
from tunnel.app.config import ConfigError, load_client_config, load_server_config
from tunnel.wire.dtls import client_hello_cookie
from tunnel.wire.ecn import CE, decapsulate, ipv4_checksum
from tunnel.wire.icmp import unreachable
from tunnel.lab.attack import client_hello, dtls_context
from tunnel.app.config import load_policy
from tunnel.core.policy import MATCH_KEYS, Policy, PolicyError, TrafficClass, parse_policy
from tunnel.core.routes import RouteTable

from tests.corelab import one_path

EXAMPLES = int(os.environ.get("MPTUN_FUZZ_EXAMPLES", "0")) or None
ROOT = Path(__file__).resolve().parent.parent
HELLO = client_hello(dtls_context())[1]  # a real DTLS ClientHello, to mutate


def fuzz(n: int):
    """Settings for one property: ``n`` examples here, MPTUN_FUZZ_EXAMPLES under scripts/fuzz."""
    return settings(
        max_examples=EXAMPLES or n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
        derandomize=EXAMPLES is None and os.environ.get("MPTUN_FUZZ_RANDOM") is None,
    )


# -- frames --------------------------------------------------------------------------------------
tunnel_ids = st.binary(min_size=16, max_size=16)
varints = st.integers(0, 2**62 - 1)
ifaces = st.one_of(
    st.builds(lambda a, p: ipaddress.ip_interface(f"{ipaddress.IPv4Address(a)}/{p}"), st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda a, p: ipaddress.ip_interface(f"{ipaddress.IPv6Address(a)}/{p}"), st.integers(0, 2**128 - 1), st.integers(0, 128)),
)
valid_frames = st.one_of(
    st.builds(frames.Hello, varints, tunnel_ids, varints, varints, varints),
    st.builds(
        frames.Config, tunnel_ids, st.lists(ifaces, max_size=4), st.integers(576, 65535), varints, varints,
        st.lists(ifaces.map(lambda i: i.network), max_size=4),
    ),
    st.builds(frames.Data, varints, st.binary(min_size=1, max_size=64)),
    st.builds(frames.DataOrdered, varints, st.integers(0, 255), st.integers(0, 2**16 - 1),
              st.integers(0, 255).map(lambda u: u * frames.HOLD_UNIT_MS), st.binary(min_size=1, max_size=64)),
    st.builds(frames.Ping, st.integers(0, 2**64 - 1)),
    st.builds(frames.Pong, st.integers(0, 2**64 - 1), varints, varints),
    st.builds(frames.Close, varints, st.text(max_size=40)),
)
# one mutation: (kind, position, byte)
mutations = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete", "set"]), st.integers(0, 2000), st.integers(0, 255)), max_size=4)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, byte in ops:
        i = pos % (len(b) + 1)
        if kind == "cut":
            del b[i:]
        elif kind == "insert":
            b.insert(i, byte)
        elif b and i < len(b):
            if kind == "flip":
                b[i] ^= 1 << (byte % 8)
            elif kind == "delete":
                del b[i]
            else:
                b[i] = byte
    return bytes(b)


def parse_or_error(data: bytes):
    try:
        f = frames.parse(data)
    except frames.FrameError:
        return None
    assert isinstance(f, (frames.Hello, frames.Config, frames.Data, frames.DataOrdered, frames.Ping, frames.Pong,
                          frames.Feedback, frames.FeedbackWanted, frames.Close))
    return f


@fuzz(600)
@given(st.binary(max_size=300))
def test_parse_any_bytes_is_a_frame_or_frame_error(data: bytes) -> None:
    parse_or_error(data)
    parse_or_error(bytes([frames.CONFIG]) + data)  # reach the deeper fields of each type
    parse_or_error(bytes([frames.HELLO]) + data)
    parse_or_error(bytes([frames.CLOSE]) + data)


@fuzz(300)
@given(st.binary(max_size=40))
def test_parse_data_fast_path_agrees_with_parse(data: bytes) -> None:
    rec = bytes([frames.DATA]) + data
    try:
        seq, payload = frames.parse_data(rec)
    except frames.FrameError:
        assert parse_or_error(rec) is None
        return
    assert 0 <= seq < 2**62 and payload
    f = parse_or_error(rec)
    assert f is not None and (f.seq, f.payload) == (seq, payload)


@fuzz(300)
@given(st.binary(max_size=40))
def test_parse_data_ordered_fast_path_agrees_with_parse(data: bytes) -> None:
    rec = bytes([frames.DATA_ORDERED]) + data
    try:
        seq, queue, qseq, hold_ms, payload = frames.parse_data_ordered(rec)
    except frames.FrameError:
        assert parse_or_error(rec) is None
        return
    assert 0 <= seq < 2**62 and 0 <= queue < 256 and 0 <= qseq < 2**16 and 0 <= hold_ms <= 1020 and payload
    f = parse_or_error(rec)
    assert f == frames.DataOrdered(seq, queue, qseq, hold_ms, payload)


@fuzz(400)
@given(valid_frames, mutations)
def test_valid_frames_round_trip_and_mutations_never_escape(frame, ops) -> None:
    wire = frames.encode(frame)
    back = frames.parse(wire)
    if isinstance(frame, frames.Close):
        frame.reason = frame.reason.encode()[: frames.MAX_REASON].decode("utf-8", "replace")
    assert back == frame
    parse_or_error(mutate(wire, ops))


# -- policy --------------------------------------------------------------------------------------
scalars = st.one_of(
    st.integers(-(2**70), 2**70), st.booleans(), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["EF", "af41", "CS3", "udp", "TCP", "icmp", "1-2", "10000-20000", "65536", "-1", "5-3", " 1",
                     "10.0.0.0/8", "::/0", "300.1.1.1", "1.2.3.4/33", "inherit", "duplicate", "balance",
                     "redundant", "lowest-rtt", "backup", "٣", "1_000", "0x10", "1e3"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
class_keys = st.sampled_from(sorted({"name", "match", "mode", "redundancy", "outer_dscp", "reorder", "reorder_ms", "bogus"}))
match_tables = st.dictionaries(st.sampled_from(sorted(MATCH_KEYS | {"nope"})), values, max_size=3)
class_tables = st.one_of(
    st.dictionaries(class_keys, values, max_size=5),
    st.fixed_dictionaries({"name": st.text(max_size=5), "match": match_tables}, optional={"mode": values, "outer_dscp": values}),
    values,
)
policy_dicts = st.one_of(
    st.fixed_dictionaries({"class": st.lists(class_tables, max_size=4)}),
    st.dictionaries(st.text(max_size=6), values, max_size=3),
)


@fuzz(250)
@given(policy_dicts)
def test_policy_from_any_table_is_a_policy_or_policy_error(data) -> None:
    try:
        p = parse_policy(data, "fuzz.toml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.toml: ")
        return
    assert isinstance(p, Policy) and p.classes[-1].matches_all


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)  # a TOML basic string (surrogate escapes make invalid TOML: also fine)


def toml_doc(tables: dict) -> str:
    out = []
    for name, body in tables.items():
        if isinstance(body, list):
            for t in body:
                out.append(f"[[{name}]]")
                out += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in (t.items() if isinstance(t, dict) else [])]
        elif isinstance(body, dict):
            out.append(f"[{json.dumps(name)}]")
            out += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
        else:
            out.insert(0, f"{json.dumps(name)} = {toml_value(body)}")
    return "\n".join(out) + "\n"


@fuzz(150)
@given(st.one_of(policy_dicts.map(lambda d: toml_doc(d).encode()), st.binary(max_size=200)))
def test_policy_file_with_any_content_loads_or_names_the_file(config_dir, content: bytes) -> None:
    path = config_dir / "policy-fuzz.toml"
    path.write_bytes(content)
    try:
        p = load_policy(path)
    except PolicyError as exc:
        assert str(exc).startswith(f"{path}: ")
        return
    assert isinstance(p, Policy)


RICH_POLICY = parse_policy(
    {"class": [
        {"name": "media", "match": {"dscp": ["EF", "AF41"]}, "mode": "duplicate", "outer_dscp": "EF"},
        {"name": "ports", "match": {"protocol": ["udp", "tcp", "sctp"], "ports": ["3478", "10000-20000"]}, "mode": "duplicate"},
        {"name": "src", "match": {"src_ports": [53], "dst": ["10.0.0.0/8", "2001:db8::/32"]}, "outer_dscp": "inherit"},
        {"name": "cidrs", "match": {"cidrs": ["100.64.0.0/10", "::/0"], "dst_ports": ["1-1024"]}, "mode": "redundant"},
        {"name": "default", "mode": "balance"},
    ]},
    "rich",
)
WEBRTC = load_policy(ROOT / "policies" / "webrtc.toml")
# packets that look like IP: version 4 or 6 in the first nibble, then anything
ip_like = st.one_of(
    st.binary(max_size=80),
    st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x40, 0x60, 0x6B]), st.binary(max_size=80)).map(lambda t: bytes([t[0]]) + t[1]),
)


@fuzz(800)
@given(ip_like)
def test_classifier_takes_any_packet(pkt: bytes) -> None:
    for policy in (RICH_POLICY, WEBRTC, Policy.single("duplicate")):
        c = policy.classify(pkt)
        assert isinstance(c, TrafficClass) and c in policy.classes
        assert 0 <= policy.outer_tos(c, pkt) <= 255


# -- config loaders -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, pki) -> Path:  # noqa: F811
    return pki


SERVER_BASE = {"listen": "198.18.0.1:4433", "address": "100.64.0.1/24", "certificate": "srv.crt", "key": "srv.key", "ca": "ca.crt"}
CLIENT_BASE = {"server": "198.18.0.1:4433", "server_name": "srv", "certificate": "alice.crt", "key": "alice.key", "ca": "ca.crt"}
SERVER_KEYS = sorted(set(SERVER_BASE) | {
    "pool", "routes", "mode", "linger", "allow_unlisted_clients", "client_to_client", "unknown_destination", "max_tunnels",
    "max_paths", "handshake_rate", "max_handshakes", "pending_queue", "pending_expiry", "tun", "control", "probe_interval",
    "dead_interval", "timeout", "dedup_window", "policy", "metrics", "log_format", "log_level", "bogus",
})
CLIENT_KEYS = sorted(set(CLIENT_BASE) | {"interfaces", "mode", "redundancy", "pin_flows", "tun", "probe_interval", "metrics", "bogus"})
config_values = st.one_of(values, st.sampled_from(["a\x00b", "x" * 5000, "/", "ca.crt", "1.2.3.4:0", "[::1]:80", "h:99999",
                                                   "100.64.0.1/31", "100.64.0.2-100.64.0.9", "127.0.0.1:9100", "::1"]))


def _check_config(load, d: Path, text: str) -> None:
    path = d / "fuzz.toml"
    path.write_text(text)
    try:
        load(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)


@fuzz(300)
@given(st.dictionaries(st.sampled_from(SERVER_KEYS), config_values, max_size=4),
       st.dictionaries(st.text(max_size=8), st.dictionaries(st.sampled_from(["address", "routes", "x"]), config_values, max_size=2), max_size=2))
def test_server_config_with_any_values_loads_or_names_file_and_key(config_dir, overrides, clients) -> None:
    _check_config(load_server_config, config_dir, toml_doc({"server": {**SERVER_BASE, **overrides}, "clients": clients}))


@fuzz(200)
@given(st.dictionaries(st.sampled_from(CLIENT_KEYS), config_values, max_size=4))
def test_client_config_with_any_values_loads_or_names_file_and_key(config_dir, overrides) -> None:
    _check_config(load_client_config, config_dir, toml_doc({"client": {**CLIENT_BASE, **overrides}}))


@fuzz(200)
@given(st.one_of(st.binary(max_size=200), policy_dicts.map(lambda d: toml_doc(d).encode())))
def test_config_file_with_any_bytes_is_a_config_error(config_dir, content: bytes) -> None:
    path = config_dir / "junk.toml"
    path.write_bytes(content)
    for load in (load_server_config, load_client_config):
        with pytest.raises(ConfigError) as info:
            load(path)
        assert str(info.value).startswith(f"{path}: ")


# -- inner IP header readers -----------------------------------------------------------------------
def with_checksum(hdr: bytes) -> bytes:
    h = bytearray(hdr)
    h[10:12] = b"\0\0"
    h[10:12] = ipv4_checksum(bytes(h[:20])).to_bytes(2, "big")
    return bytes(h)


@fuzz(600)
@given(st.integers(0, 255), ip_like)
def test_ecn_decapsulation_takes_any_packet(tos: int, pkt: bytes) -> None:
    out = decapsulate(tos, pkt)
    assert out is None or len(out) == len(pkt)
    if pkt[:1] == b"\x45" and len(pkt) >= 20:  # a real IPv4 header: the checksum stays right
        good = with_checksum(pkt)
        out = decapsulate(tos, good)
        if out is not None:
            assert ipv4_checksum(out[:20]) == 0
            assert tos & 3 != CE or out[1] & 3 == CE


@fuzz(600)
@given(st.binary(min_size=4, max_size=4), ip_like)
def test_icmp_unreachable_takes_any_packet(src: bytes, pkt: bytes) -> None:
    out = unreachable(src, pkt)
    if out is None:
        return
    assert out[0] == 0x45 and ipv4_checksum(out[:20]) == 0 and int.from_bytes(out[2:4], "big") == len(out)
    assert out[12:16] == src and out[16:20] == pkt[12:16] and out[20] == 3
    assert len(out) <= 20 + 8 + 60 + 8


@fuzz(300)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=6), st.lists(st.binary(min_size=4, max_size=4), max_size=8))
def test_route_lookup_is_longest_prefix_match(routes, dsts) -> None:
    table: RouteTable[str] = RouteTable()
    nets = [ipaddress.IPv4Network((a, p), strict=False) for a, p in routes]
    for n in nets:
        table.add(n, str(n))
    for dst in dsts:
        ip = ipaddress.IPv4Address(dst)
        matching = [n for n in nets if ip in n]
        got = table.lookup(dst)
        if not matching:
            assert got is None
        else:
            assert got is not None and ipaddress.IPv4Network(got).prefixlen == max(n.prefixlen for n in matching)


@fuzz(400)
@given(st.binary(max_size=120), st.integers(0, 2000), mutations)
def test_client_hello_reader_takes_any_datagram(data: bytes, cut: int, ops) -> None:
    for d in (data, bytes([22]) + data, mutate(HELLO, ops), HELLO[:cut]):
        got = client_hello_cookie(d)
        assert got is None or (len(got[0]) <= 255 and len(got[1]) == 8)


# -- the cores -----------------------------------------------------------------------------------
CLIENT_INNER = ipaddress.IPv4Address("100.64.0.2").packed
datagrams = st.one_of(
    st.binary(max_size=120),
    st.tuples(st.sampled_from([20, 21, 22, 23, 24, 0x80]), st.sampled_from([b"\xfe\xfd", b"\xfe\xff", b"\x01\x00"]), st.binary(max_size=120))
    .map(lambda t: bytes([t[0]]) + t[1] + t[2]),
)


@pytest.fixture(scope="module")
def live(pki):  # noqa: F811
    """One in-memory server + client with path "a" up (shared by the core properties)."""
    return one_path(pki)


@fuzz(300)
@given(datagrams, st.integers(0, 255))
def test_server_takes_any_datagram_from_an_unknown_address(live, data: bytes, tos: int) -> None:
    net, _ = live
    server = net.server
    before = dict(server.counters)
    n_paths = len(server.paths)
    server.receive_datagram(("203.0.113.7", 9999), data, net.now, tos)
    delta = {k: v - before[k] for k, v in server.counters.items() if v != before[k]}
    # one datagram, one count: junk, or a cookie sent (a well-formed ClientHello); no state kept
    assert delta in ({"junk": 1}, {"cookies_sent": 1}), delta
    assert len(server.paths) == n_paths
    server.datagrams_to_send()
    while server.next_event() is not None:
        pass


@fuzz(300)
@given(datagrams, st.integers(0, 255))
def test_cores_take_any_datagram_on_a_live_path(live, data: bytes, tos: int) -> None:
    net, c = live
    server, spath, cpath = net.server, net.spath(c, "a"), c.path("a")
    before = (spath.dtls.records_dropped, cpath.dtls.records_dropped)
    server.receive_datagram(c.addr("a"), data, net.now, tos)
    c.core.receive_datagram("a", data, net.now, tos)
    c.core.receive_datagram("no such path", data, net.now, tos)
    assert c.core.state == C_UP and spath.alive and server.paths[c.addr("a")] is spath and c.path("a") is cpath
    assert server.to_tun == [] and c.core.to_tun == []
    if data and not 20 <= data[0] <= 22:  # application data or no DTLS record at all: counted as a drop
        assert (spath.dtls.records_dropped, cpath.dtls.records_dropped) == (before[0] + 1, before[1] + 1)


@fuzz(300)
@given(st.one_of(ip_like, st.binary(min_size=16, max_size=60).map(lambda b: b"\x45" + b[:11] + CLIENT_INNER + b[11:])), st.integers(0, 255))
def test_server_delivers_only_packets_from_the_client_address(live, payload: bytes, tos: int) -> None:
    """DATA with any payload over a live path: delivered only if it is IPv4 from the client's
    inner address (anti-spoofing), else counted; never an exception."""
    net, c = live
    server, tunnel, dtls = net.server, net.tunnel(), c.path("a").dtls
    before = (tunnel.spoofed, tunnel.ecn_dropped, tunnel.malformed)
    c.core.engine.seq += 1
    dgram = dtls.send(frames.encode_data(c.core.engine.seq, payload))
    server.receive_datagram(c.addr("a"), dgram, net.now, tos)
    got, server.to_tun = server.to_tun, []
    legit = len(payload) >= 20 and payload[0] >> 4 == 4 and payload[12:16] == CLIENT_INNER
    if not payload:
        assert got == [] and tunnel.malformed == before[2] + 1  # DATA without a packet
    elif not legit:
        assert got == [] and tunnel.spoofed == before[0] + 1
    elif tos & 3 == 3 and payload[1] & 3 == 0:
        assert got == [] and tunnel.ecn_dropped == before[1] + 1
    else:
        assert len(got) == 1 and len(got[0]) == len(payload)


@fuzz(300)
@given(st.binary(min_size=1, max_size=80))
def test_server_takes_any_record_inside_a_live_session(live, rec: bytes) -> None:
    net, c = live
    assume(parse_or_error(rec) is None)  # a valid frame may legitimately end the path (CLOSE, foreign HELLO)
    server, tunnel, spath = net.server, net.tunnel(), net.spath(c, "a")
    before = spath.malformed + tunnel.malformed + tunnel.spoofed
    server.receive_datagram(c.addr("a"), c.path("a").dtls.send(rec), net.now)
    assert server.to_tun == [] and spath.alive
    assert spath.malformed + tunnel.malformed + tunnel.spoofed == before + 1


@fuzz(300)
@given(ip_like)
def test_cores_take_any_packet_from_the_tun(live, pkt: bytes) -> None:
    net, c = live
    c.core.send_packet(pkt, net.now)
    net.server.send_packet(pkt, net.now)
    net.pump()
    net.server.to_tun.clear()
    c.core.to_tun.clear()
    assert c.core.state == C_UP
