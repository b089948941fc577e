"""Hostile datagrams and floods at a real server (issue #8 parts 2 and 4).

An attacker namespace ("atk") hangs off the server on its own link and can send
from any address of ATTACK_SOURCES (a local route for the whole /24, so it binds
them all; the server routes the /24 back to it).  Everything it sends goes to the
lab's own server.  The attacks run while a legitimate client streams media through
the tunnel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from OpenSSL import SSL

from tunnel.wire.dtls import DtlsListener, DtlsSession, _ConnState, client_hello_cookie, make_context
from tunnel.lab import starve
from tunnel.lab.attack import client_hello, dtls_context
from tunnel.lab.netns import Host, Lab
from tunnel.lab.servermem import rss_kib
from tunnel.lab.stack import PORT, SERVER_INNER
from tunnel.lab.stream import run_stream
from tunnel.core.pool import AddressPool

from conftest import STREAM_PORT
from tests.corelab import DGRAM_MTU, SERVER_INNER as CORE_INNER, T0, server_core

ATTACK_LINK = "198.18.20.0/30"  # server .1, attacker .2
ATTACK_SOURCES = "198.18.21.0/24"


def add_attacker(lab: Lab, server: Host) -> Host:
    """The attacker sends from ATTACK_SOURCES (one /24) and from starve.FLOOD_SOURCES (a /16: one
    source per /24 with ``--spread 24``, as many senders as the server's per-prefix limits see)."""
    atk = starve.add_attacker(lab, server, ATTACK_LINK, ATTACK_SOURCES)
    atk.run(["ip", "route", "add", "local", starve.FLOOD_SOURCES, "dev", "lo"])
    server.run(["ip", "route", "add", starve.FLOOD_SOURCES, "via", ATTACK_LINK.rsplit(".", 1)[0] + ".2"])
    return atk


def attack_argv(*args) -> list[str]:
    return [sys.executable, "-m", "tunnel.lab.attack", *map(str, args)]


def attack(host: Host, *args, timeout: float = 60) -> dict:
    res = host.run(attack_argv(*args), timeout=timeout)
    return json.loads(res.stdout.splitlines()[-1])


def raw_send(host: Host, workdir: Path, src: str, to: str, payloads: list[bytes], gap: float = 0.0) -> int:
    f = workdir / f"payloads-{time.monotonic_ns()}.json"
    f.write_text(json.dumps([p.hex() for p in payloads]))
    return attack(host, "raw", "--to", to, "--src", src, "--payloads", f, "--gap", gap)["sent"]


def capture_records(host: Host, iface: str, seconds: float, workdir: Path) -> list[list]:
    out = workdir / f"capture-{time.monotonic_ns()}.json"
    host.run([sys.executable, "-m", "tunnel.lab.capture", iface, PORT, seconds, out, "payloads"], timeout=seconds + 30)
    return json.loads(out.read_text())


def counters(stack) -> dict:
    return stack.server_status()["counters"]


# -- max_handshakes in the core (unit) -------------------------------------------------------------------
def _verified_hello(core, ctx, addr, now) -> int:
    """A real client's ClientHello, HelloVerifyRequest, ClientHello with the cookie; the number
    of datagrams the server answers that with (its first flight, or nothing)."""
    s = DtlsSession.client(ctx, DGRAM_MTU, now)
    for d in s.datagrams_to_send():
        core.receive_datagram(addr, d, now)
    for _, d, _ in core.datagrams_to_send():
        s.receive_datagram(d, now)
    for d in s.datagrams_to_send():
        core.receive_datagram(addr, d, now)
    return len(core.datagrams_to_send())


def test_max_handshakes_caps_verified_handshakes_in_progress(pki) -> None:  # noqa: F811
    core = server_core(make_context("server", pki / "srv.crt", pki / "srv.key", pki / "ca.crt"),
                       AddressPool(CORE_INNER), max_handshakes=3, handshake_rate=1000)
    ctx = make_context("client", pki / "alice.crt", pki / "alice.key", pki / "ca.crt", "srv")
    flights = [_verified_hello(core, ctx, ("198.18.21.1", 1000 + port), T0) for port in range(5)]
    assert core.stats()["handshaking"] == 3  # the cookie was valid for all five: two were refused
    assert core.counters["handshakes_refused"] == 2 and core.counters["cookies_sent"] == 5
    assert core.counters["junk"] == 0
    # the refused ones got no answer: the server did no key exchange or signature for them
    assert all(flights[:3]) and flights[3:] == [0, 0]
    kinds = []
    while (ev := core.next_event()) is not None:
        kinds.append(getattr(ev, "kind", None))
    assert kinds.count("max_handshakes") == 1  # reported once, counted every time
    core.handle_timer(T0 + 11)  # half-open handshakes time out (HANDSHAKE_TIMEOUT): room again
    assert core.stats()["handshaking"] == 0
    _verified_hello(core, ctx, ("198.18.21.1", 2000), T0 + 11)
    assert core.stats()["handshaking"] == 1 and core.counters["handshakes_refused"] == 2


@pytest.mark.parametrize("value, ok", [(1, True), (256, True), (0, False), (-5, False), ("many", False), (1.5, False)])
def test_max_handshakes_config_key(pki, value, ok) -> None:  # noqa: F811
    from tunnel.app.config import ConfigError, load_server_config
    from tunnel.lab.stack import write_toml

    path = write_toml(pki / "limits.toml", {"server": {
        "listen": "198.18.0.1:4433", "address": "100.64.0.1/24", "certificate": "srv.crt", "key": "srv.key",
        "ca": "ca.crt", "max_handshakes": value}})
    if ok:
        assert load_server_config(path).limits.max_handshakes == value
    else:
        with pytest.raises(ConfigError, match=r"limits.toml: \[server\] max_handshakes: "):
            load_server_config(path)


def _openssl_listen_reply(ctx, listener: DtlsListener, data: bytes, addr) -> bytes:
    """What OpenSSL's own DTLSv1_listen answers (the path the hand-made reply replaces)."""
    conn = SSL.Connection(ctx, None)
    conn.set_app_data(_ConnState(addr))
    conn.set_accept_state()
    conn.bio_write(data)
    with pytest.raises(SSL.WantReadError):
        conn.DTLSv1_listen()
    return conn.bio_read(65536)


def test_hand_made_hello_verify_request_is_byte_for_byte_openssls(pki) -> None:  # noqa: F811
    ctx = make_context("server", pki / "srv.crt", pki / "srv.key", pki / "ca.crt")
    listener = DtlsListener(ctx, DGRAM_MTU)
    cctx = make_context("client", pki / "alice.crt", pki / "alice.key", pki / "ca.crt", "srv")
    hellos = [DtlsSession.client(cctx, DGRAM_MTU, T0).datagrams_to_send()[0] for _ in range(3)]
    hellos += [client_hello(dtls_context())[1] for _ in range(3)]  # another stack's options (DTLS 1.0 record)
    for i, ch in enumerate(hellos):
        addr = ("198.18.21.3", 5000 + i)
        session, replies = listener.accept(ch, addr, T0)
        assert session is None and replies == [_openssl_listen_reply(ctx, listener, ch, addr)]
        assert client_hello_cookie(ch)[0] == b""
    # a ClientHello carrying the cookie of one address, replayed from another address or port: a new
    # HelloVerifyRequest, no session; from its own address it starts the handshake (in OpenSSL)
    s = DtlsSession.client(cctx, DGRAM_MTU, T0)
    a = ("198.18.21.4", 7000)
    _, (hvr,) = listener.accept(s.datagrams_to_send()[0], a, T0)
    s.receive_datagram(hvr, T0)
    (ch2,) = s.datagrams_to_send()
    assert client_hello_cookie(ch2)[0] == listener.cookies.make(a)
    for other in (("198.18.21.5", 7000), ("198.18.21.4", 7001)):
        session, replies = listener.accept(ch2, other, T0)
        assert session is None and len(replies) == 1 and client_hello_cookie(ch2)[0] not in replies[0]
    session, replies = listener.accept(ch2, a, T0)
    assert session is not None and replies  # ServerHello ... ServerHelloDone
    # every truncation of a ClientHello is refused without an answer
    for n in range(len(hellos[0])):
        assert client_hello_cookie(hellos[0][:n]) is None
        assert listener.accept(hellos[0][:n], ("198.18.21.3", 6000), T0) == (None, [])


# -- hostile datagrams while a stream runs ------------------------------------------------------------------
@pytest.mark.netns
def test_hostile_datagrams_are_counted_and_dropped_while_the_tunnel_carries_media(lab, multipath, tmp_path) -> None:
    mp = multipath(2)
    atk = add_attacker(lab, mp.server)
    mp.start()
    stack, work = mp.stack, tmp_path
    srv0, srv1 = mp.links[0].a_addr, mp.links[1].a_addr
    # client->server application-data records of path 0 (probes), captured where they arrive
    captured = capture_records(mp.server, mp.links[0].a_ifname, 1.5, work)
    records = [bytes.fromhex(p) for src, sp, dst, dp, p in captured if dp == PORT and p[:2] == "17"]
    assert len(records) >= 10, captured
    cport0 = next(sp for src, sp, dst, dp, p in captured if dp == PORT)
    paths = {p["addr"].split(":")[0]: p["addr"] for p in mp.server_paths()}
    path1_client = paths[mp.links[1].b_addr]
    hello_bytes = client_hello(dtls_context())[1]
    truncated_hellos = [hello_bytes[:n] for n in range(13, len(hello_bytes), 7)]
    truncated_records = [r[: len(r) // 2] for r in records[:10]] + [r[:13] for r in records[:10]]

    def dropped() -> list[int]:
        by_addr = {p["addr"].split(":")[0]: p["dtls_dropped"] for p in mp.server_paths()}
        return [by_addr[mp.links[0].b_addr], by_addr[mp.links[1].b_addr]]

    before, drop0 = counters(stack), dropped()
    sent: dict[str, int] = {}
    handshaking: list[int] = []

    def attacks() -> None:
        time.sleep(0.5)
        # 1. random bytes from 254 addresses
        sent["junk"] = attack(atk, "junk", "--to", f"{srv0}:{PORT}", "--rate", 2000, "--seconds", 1,
                              "--sources", ATTACK_SOURCES)["sent"]
        handshaking.append(stack.server_status()["handshaking"])
        # 2. truncated DTLS records: ClientHellos from the attacker, application data on the live path
        sent["trunc_hello"] = raw_send(atk, work, "198.18.21.7:4000", f"{srv0}:{PORT}", truncated_hellos)
        sent["trunc_path"] = raw_send(mp.client, work, f"{mp.links[0].b_addr}:{cport0}", f"{srv0}:{PORT}",
                                      truncated_records)
        # 3. a ClientHello replayed from 254 addresses (no cookie: each gets a HelloVerifyRequest, nothing kept)
        sent["hello"] = attack(atk, "hello", "--to", f"{srv1}:{PORT}", "--rate", 500, "--seconds", 1,
                               "--sources", ATTACK_SOURCES)["hellos"]
        handshaking.append(stack.server_status()["handshaking"])
        # 4. valid records seconds after they were sent: on their own path, then on the other path
        sent["replay_same"] = raw_send(mp.client, work, f"{mp.links[0].b_addr}:{cport0}", f"{srv0}:{PORT}",
                                       records, gap=0.002)
        sent["replay_other"] = raw_send(mp.client, work, path1_client, f"{srv1}:{PORT}", records, gap=0.002)
        # 5. the same records from an address that has no session
        sent["no_session"] = raw_send(atk, work, "198.18.21.9:4433", f"{srv0}:{PORT}", records)
        handshaking.append(stack.server_status()["handshaking"])

    result = mp.stream(50, 500, during=attacks)
    after = counters(stack)
    delta = {k: after[k] - before[k] for k in after}
    drop_delta = [a - b for a, b in zip(dropped(), drop0)]
    # the media stream lost nothing while all that went on
    assert result.lost == 0 and result.sent == 500, result
    # every kind was counted: junk, truncated hellos and records without a session as junk ...
    junk_expected = sent["junk"] + sent["trunc_hello"] + sent["no_session"]
    assert 0.98 * junk_expected <= delta["junk"] <= junk_expected, (delta, sent)
    # ... the cookie-less ClientHellos each got a HelloVerifyRequest and nothing else ...
    assert 0.98 * sent["hello"] <= delta["cookies_sent"] <= sent["hello"], (delta, sent)
    assert delta["handshakes_rate_limited"] == delta["handshakes_failed"] == 0
    # ... replays and truncated records on the paths were dropped by DTLS (replay window, bad MAC)
    assert drop_delta[0] == sent["trunc_path"] + sent["replay_same"], (drop_delta, sent)
    assert drop_delta[1] == sent["replay_other"], (drop_delta, sent)
    # no state for any unverified source, during or after: still the one tunnel with its two paths
    status = stack.server_status()
    assert handshaking == [0, 0, 0] and status["handshaking"] == 0
    assert len(status["tunnels"]) == 1 and len(mp.server_paths()) == 2
    log = stack.server_log.read_text()
    assert "Traceback" not in log and log.count("connected from") == 1 and " gone: " not in log


# -- flood -------------------------------------------------------------------------------------------------
FLOOD_SECONDS = 10
JUNK_RATE = 20_000
HELLO_RATE = 800  # cookie-less ClientHellos/s, plus ANSWER x ANSWER_RATE real cookie exchanges/s = 1000 attempts/s
ANSWER, ANSWER_RATE = 4, 50
MAX_HANDSHAKES = 64


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _udp_rcvbuf_errors(host: Host) -> int:
    lines = [l.split() for l in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines() if l.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


@pytest.mark.netns
def test_flood_of_junk_and_handshakes_leaves_the_media_stream_alone(tunnel_stack, tmp_path) -> None:
    hosts = tunnel_stack.hosts
    atk = add_attacker(hosts.lab, hosts.server)
    tunnel_stack.server_overrides["max_handshakes"] = MAX_HANDSHAKES
    tunnel_stack.start()
    stack = tunnel_stack
    pid = stack.server_proc.pid
    time.sleep(1.0)  # settle (first status requests, log setup) before the baseline
    rss_before, before, cpu_before = rss_kib(pid), counters(stack), _cpu_seconds(pid)
    rcvbuf_before = _udp_rcvbuf_errors(hosts.server)
    target = f"{hosts.server_addr}:{PORT}"
    procs: list[subprocess.Popen] = []
    samples: list[tuple[int, int]] = []  # (rss KiB, handshakes in progress) every 0.5 s
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            try:
                samples.append((rss_kib(pid), stack.server_status()["handshaking"]))
            except Exception:  # a slow status reply under the flood: skip that sample
                pass

    def flood() -> None:
        procs.append(atk.popen(attack_argv("junk", "--to", target, "--rate", JUNK_RATE, "--seconds", FLOOD_SECONDS,
                                           "--sources", ATTACK_SOURCES), stdout=subprocess.PIPE, text=True))
        procs.append(atk.popen(attack_argv("hello", "--to", target, "--rate", HELLO_RATE, "--seconds", FLOOD_SECONDS,
                                           "--sources", starve.FLOOD_SOURCES, "--spread", 24, "--answer", ANSWER,
                                           "--answer-rate", ANSWER_RATE), stdout=subprocess.PIPE, text=True))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # 50 packets/s for 14 s: starts before the flood, outlasts it
        result = run_stream(hosts.client, hosts.server, SERVER_INNER, STREAM_PORT, 50, 200, 700, stack.workdir,
                            during=flood)
        reports = [json.loads(p.communicate(timeout=60)[0].splitlines()[-1]) for p in procs]
    finally:
        stop.set()
        sampler.join(5)
    junk, hello = reports
    after = counters(stack)
    delta = {k: after[k] - before[k] for k in after}
    rss_after = rss_kib(pid)
    peak_rss = max([rss_after] + [r for r, _ in samples])
    rcvbuf_drops = _udp_rcvbuf_errors(hosts.server) - rcvbuf_before
    cpu = _cpu_seconds(pid) - cpu_before
    summary = {k: v for k, v in result.to_json().items() if k not in ("arrivals", "sender")}
    print(f"flood: junk {junk['rate']}/s ({junk['sent']}), hellos {hello['rate']}/s, cookie exchanges "
          f"{hello['verified']}, server flights {hello['server_flights']}; counters {delta}; rss before "
          f"{rss_before} KiB, peak {peak_rss} KiB, after {rss_after} KiB; max handshaking "
          f"{max((h for _, h in samples), default=None)}; rcvbuf drops {rcvbuf_drops}; server cpu {cpu:.1f} s; stream {summary}")
    # the flood happened at the rates asked for (measured by the senders)
    assert junk["rate"] >= 0.9 * JUNK_RATE and junk["seconds"] >= FLOOD_SECONDS - 0.1, junk
    attempts = (hello["hellos"] + hello["attempts"]) / hello["seconds"]
    assert attempts >= 0.9 * (HELLO_RATE + ANSWER * ANSWER_RATE), hello
    # the server saw it and counted it (a few may be lost in the socket buffer; those are counted too)
    assert delta["junk"] + rcvbuf_drops >= 0.98 * junk["sent"] and delta["junk"] >= 0.8 * junk["sent"], delta
    assert delta["cookies_sent"] >= 0.8 * hello["hellos"], delta
    # real cookie exchanges got past the cookie, and the handshake limits bit and were counted; a refused
    # ClientHello gets no answer (no key exchange or signature is spent on it)
    refused = delta["handshakes_rate_limited"] + delta["handshakes_refused"]
    assert 0 < hello["server_flights"] <= hello["verified"] - 0.9 * refused, (hello, delta)
    assert delta["handshakes_rate_limited"] > 0 and delta["handshakes_refused"] > 0, delta
    assert max((h for _, h in samples), default=0) <= MAX_HANDSHAKES
    log = stack.server_log.read_text()
    assert "limit handshake_rate" in log and "limit max_handshakes" in log
    # memory stays bounded: the state the flood can create is capped (MAX_HANDSHAKES half-open handshakes)
    assert peak_rss - rss_before < 40 * 1024, (rss_before, peak_rss)
    # the legitimate tunnel kept its stream, same tunnel throughout.  Nothing lost is what we measure here
    # (the server needs ~40 % of a core for this flood); on an overloaded machine the kernel may drop a few
    # datagrams at the server's socket when the server gets no CPU: then every lost packet must be one of
    # those drops (counted by the kernel), and few.
    assert result.sent == 700 and result.end_seen, summary
    assert result.lost == 0 or (result.lost <= rcvbuf_drops and result.loss_ratio <= 0.01), (summary, rcvbuf_drops)
    assert "Traceback" not in log and log.count("connected from") == 1 and " gone: " not in log
    assert len(stack.server_status()["tunnels"]) == 1


# -- silent half-open handshakes (issue 16, finding 1) ---------------------------------------------------
STARVE_RATE, STARVE_SOURCES = 80, 16  # silent half-open handshakes/s, from this many addresses (own /24 each)


@pytest.mark.netns
def test_a_real_client_gets_its_tunnel_within_a_second_while_silent_handshakes_fill_the_server(tunnel_stack) -> None:
    """Senders that answer the cookie, take the server's flight and go silent, at 80/s from 16
    addresses: before, they held all of max_handshakes (256) and a new client was refused for up
    to 10 s; now the newcomer takes the oldest slot of the busiest prefix (tunnel/core/admission.py)."""
    hosts = tunnel_stack.hosts
    atk = add_attacker(hosts.lab, hosts.server)
    res = starve.time_to_tunnel(tunnel_stack, atk, STARVE_RATE, STARVE_SOURCES)
    print(f"starvation: {res.to_json()}")
    # the flood ran as asked and filled the half-open table: the test exercises a full server
    assert res.achieved >= 0.75 * STARVE_RATE and res.flights > 0, res
    assert res.half_open_at_start >= 0.8 * 256 and res.counters["handshakes_refused"] > 0, res
    # the real client got in on its first attempt, within a second of it
    # (whether it took a free slot or evicted the oldest of the busiest prefix depends on the moment:
    # test_admission.py checks the eviction itself)
    assert res.time_to_tunnel_s < 1.0 and res.client_attempts == 1, res
    log = tunnel_stack.server_log.read_text()
    assert "Traceback" not in log and log.count("connected from") == 1
