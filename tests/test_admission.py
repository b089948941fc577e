"""Admission at the server (issue 16, security findings 1-4): half-open handshakes cannot keep
real clients out, rates and refusal log lines count per source prefix, established paths must
HELLO or JOIN, and a tunnel belongs to its certificate's key, not only to its CN.

Unit tests of tunnel/core/admission.py and of the server core with a manual clock, over real DTLS
handshakes (pyOpenSSL memory BIOs); the netns test with real daemons is in test_hostile.py.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel.core import events

from tunnel.wire import frames
from tunnel.core.admission import (
    HALF_OPEN_TIMEOUT, HELLO_DEADLINE, REFUSAL_LOG_BURST, REFUSAL_LOG_INTERVAL, HalfOpenTable, LogLimiter,
    PrefixRateLimiter, source_prefix,
)
from tunnel.app.certs import issue_client
from tunnel.wire.dtls import ESTABLISHED, DtlsSession, make_context
from tunnel.core.path import TICK
from tunnel.core.server import ServerCore

from tests.corelab import DGRAM_MTU, T0, server_core
from test_hostile import _verified_hello


# -- tunnel/core/admission.py ---------------------------------------------------------------------------------
def test_source_prefix_groups_ipv4_by_24_and_ipv6_by_64() -> None:
    assert source_prefix("198.51.100.7") == source_prefix("198.51.100.200") == "198.51.100.0/24"
    assert source_prefix("198.51.101.7") != source_prefix("198.51.100.7")
    assert source_prefix("2001:db8:1:2::1") == source_prefix("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert source_prefix("2001:db8:1:3::1") != source_prefix("2001:db8:1:2::1")
    assert source_prefix("::ffff:198.51.100.9") == "198.51.100.0/24"  # a v4-mapped source is that IPv4 source
    assert source_prefix("fe80::1%eth0") == "fe80::/64"
    assert source_prefix("not an address") == "not an address"  # never raises


def test_rate_limiter_counts_a_prefix_not_an_address() -> None:
    limiter = PrefixRateLimiter(10.0)
    allowed = sum(limiter.allow(source_prefix(f"2001:db8::{i:x}"), T0) for i in range(200))
    assert allowed == 20  # the burst of one /64, however many addresses it rotates through
    assert limiter.allow(source_prefix("2001:db8:0:1::1"), T0)  # the next /64 has its own bucket
    assert sum(limiter.allow(source_prefix("2001:db8::1"), T0 + 1.0) for _ in range(20)) == 10  # refills at the rate


def test_half_open_table_takes_the_oldest_slot_of_the_busiest_prefix() -> None:
    t = HalfOpenTable(4)
    for i, ip in enumerate(["10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.0.3"]):
        t.add((ip, 1000 + i), source_prefix(ip))
    assert t.count("10.0.0.0/24") == 3 and len(t) == 4
    assert t.victim("10.0.9.0/24") == ("10.0.0.1", 1000)  # a newcomer: the busiest prefix's oldest makes room
    assert t.victim("10.0.1.0/24") == ("10.0.0.1", 1000)  # holds 1 < 3
    assert t.victim("10.0.0.0/24") is None  # the busiest prefix itself is refused
    t.discard(("10.0.0.1", 1000))
    t.discard(("10.0.0.1", 1000))  # twice: no harm
    assert t.count("10.0.0.0/24") == 2 and len(t) == 3
    flat = HalfOpenTable(3)
    for ip in ["10.0.1.1", "10.0.2.1", "10.0.3.1"]:  # one slot each: ties go to the oldest
        flat.add((ip, 1), source_prefix(ip))
    assert flat.victim("10.0.4.0/24") == ("10.0.1.1", 1) and flat.victim("10.0.2.0/24") is None


def test_log_limiter_one_line_per_prefix_per_interval_and_a_burst_in_all() -> None:
    lim = LogLimiter()
    assert lim.allow("a", T0) and not lim.allow("a", T0 + 1) and not lim.allow("a", T0 + 2)
    assert lim.take_suppressed() == 2 and lim.take_suppressed() == 0
    assert lim.allow("a", T0 + REFUSAL_LOG_INTERVAL)
    many = [lim.allow(f"p{i}", T0 + REFUSAL_LOG_INTERVAL + 0.1) for i in range(100)]
    assert sum(many) == REFUSAL_LOG_BURST - 1  # "a" had one line in this window already
    assert lim.total_suppressed == 2 + 100 - (REFUSAL_LOG_BURST - 1)


# -- the server core ------------------------------------------------------------------------------------
def server(pki: Path, **kw) -> ServerCore:  # noqa: F811
    kw.setdefault("handshake_rate", 1000.0)
    return server_core(make_context("server", pki / "srv.crt", pki / "srv.key", pki / "ca.crt"), **kw)


def client_ctx(pki: Path, name: str = "alice", where: str = ""):  # noqa: F811
    d = pki / where if where else pki
    return make_context("client", d / f"{name}.crt", d / f"{name}.key", pki / "ca.crt", "srv")


def exchange(core: ServerCore, s: DtlsSession, addr, now: float, rounds: int = 8) -> list:
    """Move datagrams between a client session and the core (no loss, no delay) until quiet;
    the frames the client received."""
    got = []
    for _ in range(rounds):
        out = s.datagrams_to_send()
        if not out:
            break
        for d in out:
            core.receive_datagram(addr, d, now)
        for to, d, _ in core.datagrams_to_send():
            if to == addr:
                got += [frames.parse(r) for r in s.receive_datagram(d, now)]
    return got


def verified_silent_hello(core: ServerCore, ctx, addr, now: float) -> bool:
    """An attacker's ClientHello with a valid cookie, then silence; True if the server answered
    it with its flight (it took a half-open slot)."""
    return _verified_hello(core, ctx, addr, now) > 0


def connect(core: ServerCore, ctx, addr, now: float, hello=None) -> tuple[DtlsSession, list]:
    """A real client: handshake, then HELLO (a new tunnel unless ``hello`` says otherwise)."""
    s = DtlsSession.client(ctx, DGRAM_MTU, now)
    got = exchange(core, s, addr, now)
    if s.state == ESTABLISHED:
        s.out.append(s.send(frames.encode(hello or frames.Hello(1, frames.NEW_TUNNEL))))
        got += exchange(core, s, addr, now)
    return s, got


def configs(got: list) -> list:
    return [f for f in got if isinstance(f, frames.Config)]


def refusals(core: ServerCore) -> list:
    out = []
    while (ev := core.next_event()) is not None:
        if isinstance(ev, events.Refused):
            out.append(ev)
    return out


@pytest.mark.parametrize("prefixes", [16, 64])
def test_silent_half_open_handshakes_cannot_keep_a_real_client_out(pki, prefixes) -> None:  # noqa: F811
    """Finding 1: the half-open table full of silent handshakes from many prefixes (each within
    its rate) and a real client from elsewhere still gets its tunnel at once, on its first try."""
    core = server(pki, max_handshakes=256)
    attacker = client_ctx(pki, "bob")
    took = sum(verified_silent_hello(core, attacker, (f"198.19.{i % prefixes}.{1 + i // prefixes}", 5000 + i), T0)
               for i in range(300))
    # full: each flooding prefix holds an equal share, so the surplus (from prefixes that hold the
    # most slots already) is refused without a key exchange
    assert took == 256 and core.stats()["handshaking"] == 256
    assert core.counters["handshakes_refused"] == 44 and core.counters["handshakes_evicted"] == 0
    s, got = connect(core, client_ctx(pki), ("198.18.5.9", 4433), T0 + 0.01)
    assert s.state == ESTABLISHED and len(configs(got)) == 1 and "alice" in core.by_name
    assert core.counters["handshakes_evicted"] == 1  # the flood's oldest slot made room for her
    # a flood from one prefix cannot take the slots of the others either
    core2 = server(pki, max_handshakes=8)
    for i in range(4):
        verified_silent_hello(core2, attacker, (f"198.19.{i}.1", 1), T0)
    took = sum(verified_silent_hello(core2, attacker, ("198.19.99.1", 100 + i), T0) for i in range(20))
    assert took == 4  # the free slots; then it is the busiest prefix and evicts nobody
    assert all(core2._half_open.count(f"198.19.{i}.0/24") == 1 for i in range(4))


def test_half_open_handshakes_time_out_after_half_open_timeout(pki) -> None:  # noqa: F811
    core = server(pki)
    assert verified_silent_hello(core, client_ctx(pki, "bob"), ("198.19.0.1", 1), T0)
    core.handle_timer(T0 + HALF_OPEN_TIMEOUT - 0.01)
    assert core.stats()["handshaking"] == 1
    assert core.handle_timer(T0 + HALF_OPEN_TIMEOUT - 0.01) <= T0 + HALF_OPEN_TIMEOUT - 0.01 + TICK
    assert core.stats()["handshaking"] == 1
    core.handle_timer(T0 + HALF_OPEN_TIMEOUT)
    assert core.stats()["handshaking"] == 0 and core.paths == {}


def test_handshake_rate_counts_a_prefix_and_refusal_lines_are_rate_limited(pki) -> None:  # noqa: F811
    """Finding 2: bad-certificate handshakes from one /64 (a new address each) are rate limited
    as one sender, and their refusals are logged once per interval and counted."""
    core = server(pki, handshake_rate=10.0)
    mallory = make_context("client", pki / "other" / "mallory.crt", pki / "other" / "mallory.key",
                           pki / "ca.crt", "srv")
    for i in range(60):
        connect(core, mallory, (f"2001:db8:77:1::{i + 1:x}", 40000, 0, 0), T0 + i * 0.001)
    assert core.counters["handshakes_rate_limited"] == 40  # 20 (the burst) got a key exchange, not 60
    assert core.counters["handshakes_failed"] == 20
    lines = refusals(core)
    assert len(lines) == 1 and "certificate" in lines[0].reason  # one line per /64 per interval ...
    assert core.counters["refusals_unlogged"] == 19  # ... the rest counted
    connect(core, mallory, ("2001:db8:77:1::999", 40000, 0, 0), T0 + REFUSAL_LOG_INTERVAL + 1)
    (line,) = refusals(core)
    assert line.unlogged == 19  # the next line says how many were not logged


def test_established_paths_must_hello_and_are_capped_per_name(pki) -> None:  # noqa: F811
    """Finding 3: paths of one certificate that never send HELLO are capped at max_paths and
    closed after HELLO_DEADLINE; a real HELLO in time is unaffected."""
    core = server(pki, max_paths=2)
    ctx = client_ctx(pki)
    sessions = []
    for i in range(6):
        s = DtlsSession.client(ctx, DGRAM_MTU, T0)
        got = exchange(core, s, ("198.18.9.1", 6000 + i), T0)
        sessions.append((s, got))
    kept = [s for s, got in sessions if not any(isinstance(f, frames.Close) for f in got)]
    assert len(kept) == 2 and core.counters["unjoined_refused"] == 4
    assert len(core.paths) == 2
    # a HELLO in time: that path joins and no longer counts as unjoined
    s0 = kept[0]
    s0.out.append(s0.send(frames.encode(frames.Hello(1, frames.NEW_TUNNEL))))
    assert configs(exchange(core, s0, ("198.18.9.1", 6000), T0 + 1.0))
    assert core.handle_timer(T0 + 1.0) <= T0 + HELLO_DEADLINE
    core.handle_timer(T0 + HELLO_DEADLINE)
    assert core.counters["hello_timeouts"] == 1 and len(core.paths) == 1  # the silent one is closed
    assert list(core.paths) == [("198.18.9.1", 6000)] and "alice" in core.by_name


def test_an_unlisted_client_is_refused_when_its_handshake_completes(pki) -> None:  # noqa: F811
    core = server(pki, allowed_clients={"bob"})
    s = DtlsSession.client(client_ctx(pki), DGRAM_MTU, T0)
    got = exchange(core, s, ("198.18.9.2", 1), T0)
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_REFUSED)]
    assert core.paths == {}  # not kept until it sends HELLO


@pytest.fixture(scope="module")
def twins(pki) -> Path:  # noqa: F811
    """A second certificate named 'alice' from the same CA, with another key; and one without a CN."""
    d = pki / "twin"
    issue_client(d, "alice", ca_dir=pki)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "nocn.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "nocn.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return d


def test_a_tunnel_belongs_to_its_certificates_key_not_only_its_name(pki, twins) -> None:  # noqa: F811
    """Finding 4: another certificate with CN 'alice' (another key) can neither JOIN alice's tunnel
    nor replace it while it is live, and the peer is not told whose tunnel it is."""
    core = server(pki)
    _, got = connect(core, client_ctx(pki), ("198.18.9.3", 1), T0)
    (config,) = configs(got)
    tunnel = core.by_name["alice"]
    refusals(core)
    twin = client_ctx(pki, "alice", "twin")
    _, got = connect(core, twin, ("198.18.9.4", 2), T0 + 0.1, hello=frames.Hello(1, config.tunnel_id))
    assert [(type(f), f.code, f.reason) for f in got] == [(frames.Close, frames.CLOSE_REFUSED, "refused")]
    (line,) = refusals(core)
    assert "another key" in line.reason and [p.addr for p in tunnel.paths] == [("198.18.9.3", 1)]
    _, got = connect(core, twin, ("198.18.9.5", 3), T0 + 0.2)  # HELLO for a new tunnel: would replace hers
    assert [(type(f), f.reason) for f in got] == [(frames.Close, "refused")]
    assert core.by_name["alice"] is tunnel and core.tunnels == {tunnel.id: tunnel}
    assert core.counters["identity_refused"] == 2
    # once her tunnel has no live path (she is gone), a re-issued certificate may take the name over
    tunnel.paths[0].state = "down"
    _, got = connect(core, twin, ("198.18.9.6", 4), T0 + 0.3)
    assert len(configs(got)) == 1 and core.by_name["alice"] is not tunnel
    notes = []
    while (ev := core.next_event()) is not None:
        if isinstance(ev, events.ClientConnected):
            notes.append(ev.note)
    assert notes and "another key" in notes[-1]


def test_a_certificate_without_a_common_name_is_refused(pki, twins) -> None:  # noqa: F811
    core = server(pki)
    s = DtlsSession.client(client_ctx(pki, "nocn", "twin"), DGRAM_MTU, T0)
    got = exchange(core, s, ("198.18.9.7", 1), T0)
    assert [(type(f), f.code) for f in got] == [(frames.Close, frames.CLOSE_REFUSED)]
    assert "common name" in refusals(core)[0].reason and core.paths == {}


def test_peer_strings_are_escaped_before_they_reach_a_log_line() -> None:
    assert frames.printable("bye") == "bye"
    forged = frames.printable("bye\nmptun[1]: client 'root' connected\x1b[2J")
    assert "\n" not in forged and "\x1b" not in forged and forged.startswith("bye\\nmptun")
