"""Tests for tunnel.wire.frames: encoding, parsing and rejection of every frame type."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.wire import frames
from tunnel.wire.frames import (
    CLOSE,
    CONFIG,
    DATA,
    DATA_OVERHEAD,
    HELLO,
    MAX_REASON,
    MAX_ROUTES,
    NEW_TUNNEL,
    PING,
    PONG,
    PROTOCOL_VERSION,
    Close,
    Config,
    Data,
    FrameError,
    Hello,
    Ping,
    Pong,
)

TID = bytes(range(1, 17))


def v(value: int) -> bytes:
    """QUIC varint (RFC 9000 section 16), written out independently of aioquic."""
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    assert value < 1 << 62
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def a4(text: str) -> bytes:
    iface = ipaddress.IPv4Interface(text)
    return bytes([4]) + iface.ip.packed + bytes([iface.network.prefixlen])


def a6(text: str) -> bytes:
    iface = ipaddress.IPv6Interface(text)
    return bytes([6]) + iface.ip.packed + bytes([iface.network.prefixlen])


FULL_CONFIG = Config(
    tunnel_id=TID,
    addresses=[ipaddress.ip_interface("100.64.0.2/24"), ipaddress.ip_interface("fd00:1::2/64")],
    mtu=1426,
    keepalive_ms=1000,
    timeout_ms=5000,
    routes=[
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("::/0"),
    ],
)

CONTROL_FRAMES = [
    Hello(),
    Hello(PROTOCOL_VERSION, TID),
    Hello(PROTOCOL_VERSION, TID, 3, 2, 1),
    Hello(2**62 - 1, b"\xff" * 16, 2**62 - 1, 2**62 - 1, 2**62 - 1),
    FULL_CONFIG,
    Config(NEW_TUNNEL, [], 576, 0, 0, []),
    Config(TID, [ipaddress.ip_interface("100.64.0.2/24")], 65535, 2**62 - 1, 2**30, []),
    Ping(0),
    Ping(2**64 - 1),
    frames.FeedbackWanted(0),
    frames.FeedbackWanted(25),
    frames.Feedback(0, 0, 0),
    frames.Feedback(77, 123_456, 5, 900),
    frames.Feedback(2**62 - 1, 2**62 - 1, frames.FEEDBACK_CLOCK - 1, 2**62 - 1),
    Pong(0x0123456789ABCDEF),
    Pong(7, 90, 123_456),
    Pong(2**64 - 1, 2**62 - 1, 2**62 - 1),
    Close(),
    Close(frames.CLOSE_REFUSED, "client 'x' is not listed"),
    Close(2**62 - 1, "r" * MAX_REASON),
    Close(frames.CLOSE_VERSION, "protocol version 7 — nicht unterstützt"),
]


# -- round trips ----------------------------------------------------------
@pytest.mark.parametrize("frame", CONTROL_FRAMES, ids=lambda f: type(f).__name__)
def test_control_round_trip(frame) -> None:
    assert frames.parse(frames.encode(frame)) == frame


def test_hello_wire_format() -> None:
    # type, version, tunnel id, then mode, redundancy, priority (varints)
    assert frames.encode(Hello()) == b"\x01\x01" + bytes(16) + b"\x00\x00\x00"
    assert frames.encode(Hello(1, TID)) == b"\x01\x01" + TID + b"\x00\x00\x00"
    assert frames.encode(Hello(1, TID, 1, 2, 3)) == b"\x01\x01" + TID + b"\x01\x02\x03"
    assert frames.encode(Hello(1, NEW_TUNNEL, 5, 16, 300)) == b"\x01\x01" + bytes(16) + v(5) + v(16) + v(300)
    assert frames.parse(b"\x01\x01" + bytes(16) + b"\x00\x00\x00") == Hello(1, NEW_TUNNEL)
    assert frames.parse(b"\x01\x01" + TID + b"\x04\x03\x02") == Hello(1, TID, 4, 3, 2)
    h = Hello()
    assert h.tunnel_id == NEW_TUNNEL == bytes(16)
    assert (h.version, h.mode, h.redundancy, h.priority) == (PROTOCOL_VERSION, 0, 0, 0)


def test_hello_without_the_multipath_fields_is_truncated() -> None:
    """The version-1 HELLO of the single-path code (18 bytes) is no longer a valid HELLO."""
    for tail in (b"", b"\x00", b"\x00\x00"):
        with pytest.raises(FrameError, match="truncated"):
            frames.parse(b"\x01\x01" + bytes(16) + tail)


def test_config_wire_format() -> None:
    expected = (
        v(CONFIG)
        + TID
        + v(2)
        + a4("100.64.0.2/24")
        + a6("fd00:1::2/64")
        + v(1426)
        + v(1000)
        + v(5000)
        + v(5)
        + a4("10.0.0.0/8")
        + a4("0.0.0.0/0")
        + a4("192.0.2.7/32")
        + a6("2001:db8::/32")
        + a6("::/0")
    )
    assert frames.encode(FULL_CONFIG) == expected
    parsed = frames.parse(expected)
    assert parsed == FULL_CONFIG
    assert [type(a) for a in parsed.addresses] == [ipaddress.IPv4Interface, ipaddress.IPv6Interface]
    assert [type(r) for r in parsed.routes[:2]] == [ipaddress.IPv4Network] * 2
    assert type(parsed.routes[3]) is ipaddress.IPv6Network


def test_ping_pong_close_wire_format() -> None:
    assert frames.encode(Ping(1)) == b"\x04" + (1).to_bytes(8, "big")
    # PONG: token (64), then the answering side's receive counters for the path (varints)
    assert frames.encode(Pong(2**64 - 1)) == b"\x05" + b"\xff" * 8 + b"\x00\x00"
    assert frames.encode(Pong(1, 90, 123_456)) == b"\x05" + (1).to_bytes(8, "big") + v(90) + v(123_456)
    assert frames.parse(b"\x05" + (9).to_bytes(8, "big") + v(100) + v(2**40)) == Pong(9, 100, 2**40)
    assert Pong(3) == Pong(3, 0, 0)
    assert frames.encode(Close(3, "bye")) == b"\x06\x03\x03bye"
    assert frames.encode(Close()) == b"\x06\x00\x00"


def test_frame_type_numbers() -> None:
    assert (HELLO, CONFIG, DATA, PING, PONG, CLOSE) == (1, 2, 3, 4, 5, 6)
    assert (
        frames.CLOSE_NORMAL,
        frames.CLOSE_REFUSED,
        frames.CLOSE_PROTOCOL,
        frames.CLOSE_REPLACED,
        frames.CLOSE_VERSION,
        frames.CLOSE_UNKNOWN_TUNNEL,
    ) == (0, 1, 2, 3, 4, 5)


SEQ_BOUNDARIES = [0, 1, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**62 - 1]


def v8(value: int) -> bytes:
    """The 8-byte QUIC varint form (two top bits 11), which mptun's encode_data always uses."""
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


@pytest.mark.parametrize("seq", SEQ_BOUNDARIES)
def test_data_round_trip_at_varint_boundaries(seq: int) -> None:
    packet = b"\x45" + bytes(range(40))
    wire = frames.encode_data(seq, packet)
    assert wire == b"\x03" + v8(seq) + packet  # constant 9-byte header
    assert len(wire) == 9 + len(packet) <= DATA_OVERHEAD + len(packet)
    assert frames.encode(Data(seq, packet)) == wire
    assert frames.parse(wire) == Data(seq, packet)
    assert frames.parse_data(wire) == (seq, packet)


@pytest.mark.parametrize("seq", SEQ_BOUNDARIES)
def test_data_minimal_varint_also_accepted(seq: int) -> None:
    """Receivers accept every varint length (RFC 9000 section 16), not only the 8-byte form."""
    packet = b"\x45" * 20
    wire = b"\x03" + v(seq) + packet
    assert frames.parse(wire) == Data(seq, packet)
    assert frames.parse_data(wire) == (seq, packet)
    for n in (1, 2, 4):  # every longer form of a small number too
        if seq < 1 << (8 * n - 2):
            longer = (seq | {1: 0, 2: 0x4000, 4: 0x8000_0000}[n]).to_bytes(n, "big")
            assert frames.parse_data(b"\x03" + longer + packet) == (seq, packet)


def test_data_overhead_constant() -> None:
    """DATA_OVERHEAD is the larger of the two DATA headers (DATA_ORDERED's 13 bytes)."""
    assert DATA_OVERHEAD == 13
    assert all(len(frames.encode_data(s, b"x")) == 9 + 1 for s in SEQ_BOUNDARIES)
    assert all(len(frames.encode_data_ordered(s, 255, 65535, 255, b"x")) == DATA_OVERHEAD + 1 for s in SEQ_BOUNDARIES)


@pytest.mark.parametrize("seq", SEQ_BOUNDARIES)
def test_data_ordered_round_trip(seq: int) -> None:
    packet = b"\x45" + bytes(range(40))
    wire = frames.encode_data_ordered(seq, 7, 65535, 13, packet)
    assert wire == b"\x07" + v8(seq) + b"\x07\xff\xff\x0d" + packet
    frame = frames.parse(wire)
    assert frame == frames.DataOrdered(seq, 7, 65535, 52, packet)
    assert frames.encode(frame) == wire
    assert frames.parse_data_ordered(wire) == (seq, 7, 65535, 52, packet)
    # minimal varint form of the sequence number is accepted too
    assert frames.parse_data_ordered(b"\x07" + v(seq) + b"\x07\xff\xff\x0d" + packet) == (seq, 7, 65535, 52, packet)


def test_data_ordered_errors() -> None:
    wire = frames.encode_data_ordered(5, 1, 2, 3, b"\x45" * 20)
    for cut in range(1, 14):  # truncated inside the header, or no packet at all
        with pytest.raises(frames.FrameError):
            frames.parse_data_ordered(wire[:cut])
    with pytest.raises(frames.FrameError):
        frames.parse_data_ordered(frames.encode_data(5, b"\x45" * 20))  # plain DATA is not DATA_ORDERED
    with pytest.raises(ValueError):
        frames.encode(frames.DataOrdered(1, 0, 0, 3, b"x"))  # hold not a multiple of 4 ms
    with pytest.raises(ValueError):
        frames.encode(frames.DataOrdered(1, 0, 0, 1024, b"x"))  # hold beyond 1020 ms


def test_data_seq_beyond_varint_range_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        frames.encode_data(2**62, b"x")


def test_data_payload_is_everything_after_seq() -> None:
    # a payload that itself looks like frames is not interpreted
    payload = frames.encode(Close(1, "x")) + b"\x00\x00"
    assert frames.parse(frames.encode_data(7, payload)) == Data(7, payload)
    assert frames.parse_data(frames.encode_data(7, payload)) == (7, payload)


def test_data_one_byte_payload_accepted() -> None:
    assert frames.parse(b"\x03\x00\x00") == Data(0, b"\x00")
    assert frames.parse_data(b"\x03\x00\x00") == (0, b"\x00")
    assert frames.parse_data(b"\x03" + v8(5) + b"\x00") == (5, b"\x00")


# -- rejection --------------------------------------------------------------
@pytest.mark.parametrize("frame", CONTROL_FRAMES, ids=lambda f: type(f).__name__)
def test_every_truncation_raises_frame_error(frame) -> None:
    wire = frames.encode(frame)
    for n in range(len(wire)):
        with pytest.raises(FrameError):
            frames.parse(wire[:n])


@pytest.mark.parametrize("frame", CONTROL_FRAMES, ids=lambda f: type(f).__name__)
def test_trailing_bytes_rejected(frame) -> None:
    wire = frames.encode(frame)
    for extra in (b"\x00", b"\x01", b"junk" * 10):
        with pytest.raises(FrameError, match="trailing"):
            frames.parse(wire + extra)


def test_feedback_wanted_wire_format() -> None:
    assert frames.encode(frames.FeedbackWanted(20)) == b"\x09\x14"
    assert frames.parse(b"\x09" + v(300)) == frames.FeedbackWanted(300)


def test_feedback_wire_format() -> None:
    # type, highest sequence number, bytes received, receive time (us mod 2**30), ack delay (us)
    wire = frames.encode(frames.Feedback(77, 123_456, 5, 900))
    assert wire == b"\x08" + v(77) + v(123_456) + v(5) + v(900)
    with pytest.raises(FrameError, match="receive time"):
        frames.parse(b"\x08" + v(1) + v(1) + v(frames.FEEDBACK_CLOCK) + v(0))
    with pytest.raises(ValueError):
        frames.encode(frames.Feedback(1, 1, frames.FEEDBACK_CLOCK))


def test_empty_record_rejected() -> None:
    with pytest.raises(FrameError):
        frames.parse(b"")


@pytest.mark.parametrize("seq", [0, 64, 16384, 2**30, 2**62 - 1])
def test_data_without_payload_rejected(seq: int) -> None:
    for wire in (b"\x03" + v(seq), b"\x03" + v8(seq)):
        with pytest.raises(FrameError, match="without a packet"):
            frames.parse(wire)
        with pytest.raises(FrameError, match="without a packet"):
            frames.parse_data(wire)


@pytest.mark.parametrize("seq", [64, 16384, 2**30])
def test_data_truncated_seq_rejected(seq: int) -> None:
    for wire in (b"\x03" + v(seq), b"\x03" + v8(seq)):
        for n in range(1, len(wire)):
            with pytest.raises(FrameError):
                frames.parse(wire[:n])
            with pytest.raises(FrameError):
                frames.parse_data(wire[:n])


@pytest.mark.parametrize(
    "wire",
    [b"\x00", b"\x0a", b"\x3f", b"\x00" + bytes(20), b"\x0a\x01\x02", b"\x41\x00", v(2**62 - 1) + b"x", v(0x1234)],
)
def test_unknown_type_rejected(wire: bytes) -> None:
    with pytest.raises(FrameError, match="unknown frame type"):
        frames.parse(wire)


def _config_wire(addresses: bytes, n_addr: bytes, tail: bytes = v(1400) + v(1000) + v(5000)) -> bytes:
    return v(CONFIG) + TID + n_addr + addresses + tail


@pytest.mark.parametrize("count", [MAX_ROUTES + 1, 10**6, 2**62 - 1])
def test_config_absurd_address_count_rejected(count: int) -> None:
    with pytest.raises(FrameError, match="too long"):
        frames.parse(_config_wire(b"", v(count), b""))


@pytest.mark.parametrize("count", [MAX_ROUTES + 1, 2**62 - 1])
def test_config_absurd_route_count_rejected(count: int) -> None:
    with pytest.raises(FrameError, match="too long"):
        frames.parse(_config_wire(a4("100.64.0.2/24"), v(1), v(1400) + v(1000) + v(5000) + v(count)))


def test_config_max_route_count_accepted() -> None:
    routes = [ipaddress.ip_network(f"10.{i}.0.0/16") for i in range(MAX_ROUTES)]
    cfg = Config(TID, [ipaddress.ip_interface("100.64.0.2/24")], 1400, 1000, 5000, routes)
    assert frames.parse(frames.encode(cfg)) == cfg


def test_config_count_larger_than_data_is_truncation() -> None:
    with pytest.raises(FrameError, match="truncated"):
        frames.parse(_config_wire(a4("100.64.0.2/24"), v(MAX_ROUTES), b""))


@pytest.mark.parametrize("family", [0, 1, 5, 41, 255])
def test_config_bad_family_rejected(family: int) -> None:
    bad = bytes([family]) + bytes(4) + b"\x18"
    with pytest.raises(FrameError, match="family"):
        frames.parse(_config_wire(bad, v(1)) + v(0))
    # and as a route
    with pytest.raises(FrameError, match="family"):
        frames.parse(_config_wire(b"", v(0)) + v(1) + bad)


@pytest.mark.parametrize("plen", [33, 64, 255])
def test_config_ipv4_prefix_over_32_rejected(plen: int) -> None:
    bad = b"\x04" + bytes([100, 64, 0, 2]) + bytes([plen])
    with pytest.raises(FrameError, match="prefix length"):
        frames.parse(_config_wire(bad, v(1)) + v(0))
    with pytest.raises(FrameError, match="prefix length"):
        frames.parse(_config_wire(b"", v(0)) + v(1) + bad)


def test_config_ipv6_prefix_limits() -> None:
    ok = b"\x06" + bytes(15) + b"\x01" + bytes([128])
    assert frames.parse(_config_wire(ok, v(1)) + v(0)).addresses == [ipaddress.ip_interface("::1/128")]
    bad = b"\x06" + bytes(16) + bytes([129])
    with pytest.raises(FrameError, match="prefix length"):
        frames.parse(_config_wire(bad, v(1)) + v(0))


def test_config_route_host_bits_are_masked() -> None:
    # a route is sent as family, address, prefix: host bits cannot make parse fail
    wire = _config_wire(b"", v(0)) + v(1) + a4("10.1.2.3/8")
    assert frames.parse(wire).routes == [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize("mtu,ok", [(575, False), (576, True), (65535, True), (65536, False), (0, False)])
def test_config_mtu_range(mtu: int, ok: bool) -> None:
    wire = _config_wire(b"", v(0), v(mtu) + v(1000) + v(5000)) + v(0)
    if ok:
        assert frames.parse(wire).mtu == mtu
    else:
        with pytest.raises(FrameError, match="mtu"):
            frames.parse(wire)


def test_close_reason_limits() -> None:
    assert frames.parse(b"\x06\x00" + v(MAX_REASON) + b"r" * MAX_REASON).reason == "r" * MAX_REASON
    with pytest.raises(FrameError, match="too long"):
        frames.parse(b"\x06\x00" + v(MAX_REASON + 1) + b"r" * (MAX_REASON + 1))
    with pytest.raises(FrameError):
        frames.parse(b"\x06\x00" + v(2**62 - 1))


def test_close_reason_truncated_on_encode_and_bad_utf8_tolerated() -> None:
    assert frames.parse(frames.encode(Close(0, "x" * 500))).reason == "x" * MAX_REASON
    assert frames.parse(b"\x06\x01\x02\xff\xfe") == Close(1, "\ufffd\ufffd")


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        frames.encode(Hello(1, b"short"))
    with pytest.raises(ValueError):
        frames.encode(Config(b"x" * 17, [], 1400, 0, 0))
    with pytest.raises(TypeError):
        frames.encode("not a frame")  # type: ignore[arg-type]


def test_frame_error_is_value_error() -> None:
    assert issubclass(FrameError, ValueError)


# -- properties ---------------------------------------------------------------
def _parse_or_frame_error(data: bytes):
    try:
        frame = frames.parse(data)
    except FrameError:
        return None
    assert isinstance(frame, (Hello, Config, Data, frames.DataOrdered, Ping, Pong, frames.Feedback, frames.FeedbackWanted, Close))
    return frame


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_parse_random_bytes(data: bytes) -> None:
    _parse_or_frame_error(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40))
def test_parse_data_agrees_with_parse(body: bytes) -> None:
    data = b"\x03" + body
    try:
        expected = frames.parse(data)
    except FrameError:
        with pytest.raises(FrameError):
            frames.parse_data(data)
    else:
        assert frames.parse_data(data) == (expected.seq, expected.payload)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([HELLO, CONFIG, DATA, PING, PONG, CLOSE]), st.binary(max_size=120))
def test_parse_random_bytes_after_valid_type(ftype: int, body: bytes) -> None:
    frame = _parse_or_frame_error(bytes([ftype]) + body)
    if frame is not None:
        # whatever parses re-encodes to something that parses to the same frame
        assert frames.parse(frames.encode(frame)) == frame


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CONTROL_FRAMES), st.data())
def test_parse_mutated_valid_frames(frame, data) -> None:
    wire = bytearray(frames.encode(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    _parse_or_frame_error(bytes(wire))


_tid = st.binary(min_size=16, max_size=16)
_varint = st.integers(0, 2**62 - 1)
_v4 = st.builds(
    lambda a, p: ipaddress.IPv4Interface((a, p)), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
_v6 = st.builds(
    lambda a, p: ipaddress.IPv6Interface((a, p)), st.integers(0, 2**128 - 1), st.integers(0, 128)
)
_frames = st.one_of(
    st.builds(Hello, _varint, _tid, _varint, _varint, _varint),
    st.builds(
        Config,
        _tid,
        st.lists(st.one_of(_v4, _v6), max_size=6),
        st.integers(576, 65535),
        _varint,
        _varint,
        st.lists(st.one_of(_v4, _v6).map(lambda i: i.network), max_size=6),
    ),
    st.builds(Data, _varint, st.binary(min_size=1, max_size=64)),
    st.builds(Ping, st.integers(0, 2**64 - 1)),
    st.builds(Pong, st.integers(0, 2**64 - 1), _varint, _varint),
    st.builds(Close, _varint, st.text(max_size=50))  # <= 200 UTF-8 bytes,
)


@settings(max_examples=250, deadline=None)
@given(_frames)
def test_round_trip_property(frame) -> None:
    assert frames.parse(frames.encode(frame)) == frame


# -- docs/PROTOCOL.md examples match the code -------------------------------------
def _doc() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()


def test_protocol_doc_config_example() -> None:
    doc = _doc()
    block = doc.split("Example (tunnel id 1", 1)[1].split("```", 2)[1]
    hex_bytes = "".join(line.split("  ")[0] for line in block.strip().splitlines())
    example = Config(
        (1).to_bytes(16, "big"),
        [ipaddress.ip_interface("100.64.0.2/24")],
        1422,
        100,
        3000,
        [ipaddress.ip_network("10.9.0.0/16")],
    )
    assert bytes.fromhex(hex_bytes) == frames.encode(example)
    assert f"{len(frames.encode(example))} bytes" in doc.split("Example (tunnel id 1", 1)[1].split("```")[0]


def _doc_hex_block(doc: str, marker: str) -> bytes:
    block = doc.split(marker, 1)[1].split("```", 2)[1]
    return bytes.fromhex("".join(line.split("  ")[0] for line in block.strip().splitlines()))


def test_protocol_doc_hello_and_pong_examples() -> None:
    doc = _doc()
    assert _doc_hex_block(doc, "Example (JOIN") == frames.encode(Hello(1, (1).to_bytes(16, "big"), 1, 2, 0))
    assert _doc_hex_block(doc, "Example (PONG") == frames.encode(Pong(3, 90, 9000))


def test_protocol_doc_small_examples() -> None:
    doc = _doc()
    assert frames.encode_data(1, b"\x45").hex(" ") + " ..." in doc
    assert "With version 1 a HELLO is 21 bytes" in doc and len(frames.encode(Hello())) == 21
    codes = (
        (0, "CLOSE_NORMAL"),
        (1, "CLOSE_REFUSED"),
        (2, "CLOSE_PROTOCOL"),
        (3, "CLOSE_REPLACED"),
        (4, "CLOSE_VERSION"),
        (5, "CLOSE_UNKNOWN_TUNNEL"),
    )
    for code, name in codes:
        assert getattr(frames, name) == code and f"| {code}    | `{name}`" in doc


def test_protocol_doc_mode_numbers() -> None:
    from tunnel.core.scheduler import MODES

    doc = _doc()
    for i, mode in enumerate(MODES, start=1):
        assert f"| {i}    | `{mode}`" in doc
    assert "not yet accepted" not in doc.lower()
