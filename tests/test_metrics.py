"""Tests for the Prometheus endpoint (tunnel/app/metrics.py) and the JSON log format (tunnel/app/daemon.py).

The MetricsServer runs in a real EventLoop on a background thread; the tests
scrape it over HTTP with urllib and parse the answer with prometheus_client's
own parser.  The status it serves is built from real cores (the in-memory lab
of tests/corelab.py) or, for the corner cases, a literal dict of the same shape.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from prometheus_client.parser import text_string_to_metric_families

from tests.corelab import down_pkt, ipv4, one_path, up_pkt
from tunnel.app.daemon import setup_logging
from tunnel.io.loop import EventLoop
from tunnel.app.metrics import CONTENT_TYPE, MetricsServer, parse_metrics_address


# -- a MetricsServer in a loop on a thread -------------------------------------------------
class Running:
    def __init__(self, status, role: str, **kw):
        self.loop = EventLoop()
        self.server = MetricsServer("127.0.0.1", 0, status, role, **kw)
        self.server.start(self.loop)
        self._stop = threading.Event()
        self.loop.call_later(0.01, self._watch)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _watch(self) -> None:  # the loop is not thread-safe: it stops itself when told
        if self._stop.is_set():
            self.loop.stop()
        else:
            self.loop.call_later(0.01, self._watch)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/metrics"

    def scrape(self, timeout: float = 5.0) -> dict:
        """{(sample name, frozenset of labels): value} of one scrape (also checks the answer's headers)."""
        with urllib.request.urlopen(self.url, timeout=timeout) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            text = resp.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for f in self.families.values()
            for s in f.samples
        }

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.server.close()
        assert self.loop.callback_errors == 0
        self.loop.close()


@pytest.fixture
def serve():
    started: list[Running] = []

    def start(status, role: str = "server", **kw) -> Running:
        r = Running(status, role, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def L(**labels) -> frozenset:
    return frozenset(labels.items())


# -- a status shaped like the real ones ------------------------------------------------------
def server_status() -> dict:
    return {
        "tunnels": [
            {
                "name": "alice",
                "address": "100.64.0.2/24",
                "mode": "duplicate",
                "policy": None,
                "classes": [{"name": "default", "mode": "duplicate", "outer_dscp": None, "packets": 12, "copies": 24}],
                "ecn_dropped": 1,
                "delivered": 100,
                "duplicates": 40,
                "too_old": 2,
                "spoofed": 3,
                "malformed": 4,
                "paths": [
                    {
                        "addr": "198.18.0.2:40000", "name": "wlan0", "state": "up", "priority": 0,
                        "rtt_ms": 12.5, "loss": 0.02, "rate_kbps": 800.0, "state_changes": 1,
                        "tx_packets": 10, "rx_packets": 11, "tx_bytes": 1000, "rx_bytes": 1100,
                        "dtls_dropped": 5, "malformed": 6, "cipher": "ECDHE-ECDSA-AES128-GCM-SHA256",
                        "probing": "idle",
                    },
                    {
                        "addr": "198.18.4.2:40001", "name": "lte0", "state": "degraded", "priority": 1,
                        "rtt_ms": None, "loss": 0.5, "rate_kbps": 0, "state_changes": 3,
                        "tx_packets": 7, "rx_packets": 0, "tx_bytes": 700, "rx_bytes": 0,
                        "dtls_dropped": 0, "malformed": 0, "cipher": "ECDHE-ECDSA-AES128-GCM-SHA256",
                        "probing": "active",
                    },
                ],
            },
            {
                "name": "bob", "address": "100.64.0.3/24", "mode": "balance", "policy": None, "classes": [],
                "ecn_dropped": 0, "delivered": 1, "duplicates": 0, "too_old": 0, "spoofed": 0, "malformed": 0,
                "paths": [],
            },
        ],
        "handshaking": 2,
        "counters": {"junk": 9, "cookies_sent": 8, "handshakes_failed": 7, "no_route": 6, "no_path": 5,
                     "not_ipv4": 4, "brand-new": 3},
        "io": {"send_errors": 1, "tun_write_errors": 2, "recv_errors": 3},
    }


def client_status() -> dict:
    return {
        "state": "up", "mode": "duplicate", "policy": None,
        "classes": [{"name": "default", "mode": "duplicate", "outer_dscp": None, "packets": 3, "copies": 6}],
        "ecn_dropped": 0, "address": "100.64.0.2/24",
        "delivered": 50, "duplicates": 49, "too_old": 1, "malformed": 0, "dropped_no_path": 4, "not_ipv4": 2, "rebinds": 3, "rebind_attempts": 5,
        "paths": [
            {
                "addr": "198.18.0.1:4433", "name": "eth0", "state": "up", "priority": 0, "rtt_ms": 1.0,
                "loss": 0.0, "rate_kbps": 8.0, "state_changes": 0, "tx_packets": 1, "rx_packets": 2,
                "tx_bytes": 3, "rx_bytes": 4, "dtls_dropped": 0, "malformed": 0, "cipher": "x", "joined": True,
            },
            {"addr": "198.18.4.1:4433", "name": "wwan0", "state": "reconnecting", "joined": False},
        ],
        "io": {"send_errors": 0, "tun_write_errors": 0, "recv_errors": 0},
        "loop": {"stalls": 3, "stall_longest_ms": 450.0, "stall_total_ms": 520.5, "busy": 1, "busy_longest_ms": 21.0,
                 "now": 50.0, "recent_stalls": [[10.0, 450.0], [20.0, 40.0], [30.0, 30.5]]},
    }


# -- the metrics -----------------------------------------------------------------------------
def test_server_metrics_from_a_literal_status(serve) -> None:
    st = server_status()
    m = serve(lambda: st).scrape()
    assert m[("mptun_info", L(role="server"))] == 1
    assert m[("mptun_tunnels", L())] == 2
    assert m[("mptun_handshaking", L())] == 2
    alice = dict(client="alice", address="100.64.0.2/24")
    for key in ("delivered", "duplicates", "too_old", "spoofed", "malformed", "ecn_dropped"):
        assert m[(f"mptun_tunnel_{key}_total", L(**alice))] == st["tunnels"][0][key]
    assert m[("mptun_tunnel_delivered_total", L(client="bob", address="100.64.0.3/24"))] == 1
    assert m[("mptun_class_packets_total", L(client="alice", **{"class": "default"}))] == 12
    assert m[("mptun_class_copies_total", L(client="alice", **{"class": "default"}))] == 24

    wlan = dict(client="alice", path="198.18.0.2:40000", name="wlan0")
    lte = dict(client="alice", path="198.18.4.2:40001", name="lte0")
    for key, value in (("tx_packets", 10), ("rx_packets", 11), ("tx_bytes", 1000), ("rx_bytes", 1100),
                       ("dtls_dropped", 5), ("malformed", 6)):
        assert m[(f"mptun_path_{key}_total", L(**wlan))] == value
    assert m[("mptun_path_rtt_seconds", L(**wlan))] == pytest.approx(0.0125)
    assert m[("mptun_path_idle_probing", L(**wlan))] == 1 and m[("mptun_path_idle_probing", L(**lte))] == 0
    assert m[("mptun_path_loss_ratio", L(**wlan))] == pytest.approx(0.02)
    assert m[("mptun_path_rate_bytes_per_second", L(**wlan))] == pytest.approx(100_000)
    assert m[("mptun_path_up", L(**wlan))] == 1
    assert m[("mptun_path_state", L(state="up", **wlan))] == 1
    assert m[("mptun_path_up", L(**lte))] == 0
    assert m[("mptun_path_state", L(state="degraded", **lte))] == 1
    assert ("mptun_path_rtt_seconds", L(**lte)) not in m  # no RTT measured yet: no sample
    assert m[("mptun_path_loss_ratio", L(**lte))] == 0.5
    assert not any(name == "mptun_path_joined" for name, _ in m)  # a client-only family

    for key, value in st["counters"].items():
        assert m[(f"mptun_server_{key.replace('-', '_')}_total", L())] == value
    for key, value in st["io"].items():
        assert m[(f"mptun_io_{key}_total", L())] == value


def test_metric_types(serve) -> None:
    r = serve(server_status)
    r.scrape()
    types = {name: f.type for name, f in r.families.items()}
    assert types["mptun_tunnels"] == "gauge"
    assert types["mptun_tunnel_delivered"] == "counter"
    assert types["mptun_path_tx_bytes"] == "counter"
    assert types["mptun_path_rtt_seconds"] == "gauge"
    assert types["mptun_path_up"] == "gauge"
    assert types["mptun_server_junk"] == "counter"
    assert types["mptun_io_send_errors"] == "counter"


def test_client_metrics_from_a_literal_status(serve) -> None:
    st = client_status()
    r = serve(lambda: st, "client", name="alice")
    m = r.scrape()
    assert m[("mptun_info", L(role="client"))] == 1
    assert m[("mptun_tunnels", L())] == 1
    assert m[("mptun_tunnel_duplicates_total", L(client="alice", address="100.64.0.2/24"))] == 49
    eth = dict(client="alice", path="198.18.0.1:4433", name="eth0")
    wwan = dict(client="alice", path="198.18.4.1:4433", name="wwan0")
    assert m[("mptun_path_rx_bytes_total", L(**eth))] == 4
    assert m[("mptun_path_rate_bytes_per_second", L(**eth))] == 1000
    assert m[("mptun_path_joined", L(**eth))] == 1
    assert m[("mptun_path_joined", L(**wwan))] == 0
    assert m[("mptun_path_state", L(state="reconnecting", **wwan))] == 1
    assert m[("mptun_path_up", L(**wwan))] == 0
    assert ("mptun_path_tx_bytes_total", L(**wwan)) not in m  # a reconnecting path has no counters
    assert m[("mptun_client_dropped_no_path_total", L())] == 4
    assert m[("mptun_client_not_ipv4_total", L())] == 2
    assert m[("mptun_client_rebinds_total", L())] == 3 and m[("mptun_client_rebind_attempts_total", L())] == 5
    assert not any(name.startswith("mptun_server_") for name, _ in m)
    # the loop's stalls: time the OS did not run the daemon
    assert m[("mptun_loop_stalls_total", L())] == 3
    assert m[("mptun_loop_stall_seconds_total", L())] == pytest.approx(0.5205)
    assert m[("mptun_loop_stall_longest_seconds", L())] == pytest.approx(0.45)
    assert m[("mptun_loop_busy_total", L())] == 1

    st.update(state="connecting", address=None, paths=[])
    m = r.scrape()
    assert m[("mptun_tunnels", L())] == 0
    assert m[("mptun_tunnel_delivered_total", L(client="alice", address=""))] == 50


def test_no_tunnels_no_empty_families(serve) -> None:
    st = {"tunnels": [], "handshaking": 0, "counters": {"junk": 0}, "io": {}}
    r = serve(lambda: st)
    m = r.scrape()
    assert m[("mptun_tunnels", L())] == 0 and m[("mptun_server_junk_total", L())] == 0
    assert all(f.samples for f in r.families.values())
    assert not any(name.startswith(("mptun_tunnel_", "mptun_path_")) for name, _ in m)


def test_each_scrape_asks_for_a_fresh_status(serve) -> None:
    st = server_status()
    r = serve(lambda: st)
    assert r.scrape()[("mptun_server_junk_total", L())] == 9
    st["counters"]["junk"] = 1000
    del st["tunnels"][1]
    m = r.scrape()
    assert m[("mptun_server_junk_total", L())] == 1000
    assert m[("mptun_tunnels", L())] == 1
    assert r.server.scrapes == 2


def test_metrics_from_real_cores(serve, pki: Path) -> None:
    """The real ServerCore/ClientCore stats of an in-memory tunnel, after some traffic both ways."""
    net, c = one_path(pki)
    for i in range(5):
        c.send_up(up_pkt(i))
    c.send_up(ipv4("100.64.0.99", "100.64.0.1"))  # spoofed
    for i in range(3):
        net.send_down(down_pkt(i))
    net.send_down(down_pkt(dst="100.64.0.99"))  # no route
    net.pump()
    io_counters = {"send_errors": 0, "tun_write_errors": 0, "recv_errors": 0}

    sst = {**net.server.stats(), "io": io_counters}
    m = serve(lambda: sst).scrape()
    (t,) = sst["tunnels"]
    (p,) = t["paths"]
    assert m[("mptun_tunnels", L())] == 1
    labels = dict(client="alice", address=t["address"])
    assert m[("mptun_tunnel_delivered_total", L(**labels))] == t["delivered"] >= 5  # (dedup counts before the source check)
    assert m[("mptun_tunnel_spoofed_total", L(**labels))] == 1
    path = dict(client="alice", path=p["addr"], name=p["name"] or "")
    for key in ("tx_packets", "rx_packets", "tx_bytes", "rx_bytes"):
        assert m[(f"mptun_path_{key}_total", L(**path))] == p[key] > 0
    assert m[("mptun_path_up", L(**path))] == (p["state"] == "up")
    assert m[("mptun_server_no_route_total", L())] == 1
    for key, value in sst["counters"].items():
        assert m[(f"mptun_server_{key}_total", L())] == value

    cst = {**c.core.stats(), "io": io_counters}
    m = serve(lambda: cst, "client", name="alice").scrape()
    (cp,) = cst["paths"]
    assert m[("mptun_tunnels", L())] == 1
    assert m[("mptun_tunnel_delivered_total", L(client="alice", address=cst["address"]))] == 3
    cpath = dict(client="alice", path=cp["addr"], name=cp["name"])
    assert m[("mptun_path_rx_packets_total", L(**cpath))] == cp["rx_packets"] > 0
    assert m[("mptun_path_joined", L(**cpath))] == 1


# -- HTTP ------------------------------------------------------------------------------------
def test_other_paths_are_404_and_other_methods_405(serve) -> None:
    r = serve(server_status)
    base = f"http://127.0.0.1:{r.server.port}"
    for path in ("/", "/metricsx", "/status"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=5)
        assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(base + "/metrics", data=b"x", method="POST"), timeout=5)
    assert err.value.code == 405
    # a query string is fine (some scrapers add one)
    with urllib.request.urlopen(base + "/metrics?x=1", timeout=5) as resp:
        assert resp.status == 200
    conn = http.client.HTTPConnection("127.0.0.1", r.server.port, timeout=5)
    conn.request("HEAD", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0 and resp.read() == b""
    conn.close()


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_http_10_bare_newlines_and_garbage(serve) -> None:
    r = serve(server_status)
    reply = raw(r.server.port, b"GET /metrics HTTP/1.0\n\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in reply
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"Content-Length: %d\r\n" % len(body) in head
    assert b"mptun_tunnels 2.0" in body
    assert raw(r.server.port, b"hello there\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(r.server.port, b"GET /metrics SPDY/3\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n"
    assert raw(r.server.port, huge).startswith(b"HTTP/1.1 431 ")
    # the client half-closes right after its request: it still gets the whole answer
    with socket.create_connection(("127.0.0.1", r.server.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 OK") and b"mptun_tunnels 2.0" in out


def test_a_failing_status_is_a_500_and_the_loop_goes_on(serve) -> None:
    calls = []

    def status() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return server_status()

    r = serve(status)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(r.url, timeout=5)
    assert err.value.code == 500
    assert r.server.errors == 1
    assert r.scrape()[("mptun_tunnels", L())] == 2


def test_a_status_that_cannot_be_rendered_is_a_500(serve) -> None:
    r = serve(lambda: {"tunnels": [None], "counters": {}})  # fails on the worker thread
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(r.url, timeout=5)
    assert err.value.code == 500 and r.server.errors == 1 and r.server.scrapes == 0


def test_a_silent_client_blocks_nobody_and_is_dropped(serve) -> None:
    r = serve(server_status, timeout=1.0)
    silent = socket.create_connection(("127.0.0.1", r.server.port), timeout=5)
    slow = socket.create_connection(("127.0.0.1", r.server.port), timeout=5)
    slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # ... and never the blank line
    try:
        t0 = time.monotonic()
        assert r.scrape(timeout=2)[("mptun_tunnels", L())] == 2
        assert time.monotonic() - t0 < 0.8  # served at once, not after the others' deadline
        # past the deadline the server closes both: the client sees EOF
        for s in (silent, slow):
            assert s.recv(100) == b""
        assert time.monotonic() - t0 < 3
        assert r.server.scrapes == 1 and not r.server._conns
    finally:
        silent.close()
        slow.close()


class SlowList(list):
    """Slow to walk: the rendering of a status holding one takes ``delay`` seconds."""

    delay = 0.6

    def __iter__(self):
        time.sleep(self.delay)
        return super().__iter__()


def test_rendering_happens_off_the_loop_and_a_third_scrape_waits_for_none(serve) -> None:
    def status() -> dict:
        st = server_status()
        st["tunnels"] = SlowList(st["tunnels"])
        return st

    r = serve(status)
    results: dict = {}

    def scrape(i: int) -> None:
        try:
            results[i] = r.scrape(timeout=5)[("mptun_tunnels", L())]
        except urllib.error.HTTPError as exc:
            results[i] = exc.code

    threads = [threading.Thread(target=scrape, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)  # in this order: the first is rendering, the second waits for the worker
    t0 = time.monotonic()
    # meanwhile the loop answers at once: a 404, and a third scrape that finds the worker busy
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{r.server.port}/other", timeout=5)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(r.url, timeout=5)
    assert err.value.code == 503
    assert time.monotonic() - t0 < 0.4
    for t in threads:
        t.join(5)
    assert results == {0: 2, 1: 2}
    assert r.server.scrapes == 2


def test_too_many_connections_are_refused_not_queued_forever(serve) -> None:
    r = serve(server_status, timeout=1.0)
    hogs = [socket.create_connection(("127.0.0.1", r.server.port), timeout=5) for _ in range(MetricsServer.MAX_CONNS + 4)]
    try:
        # the ones over the limit are closed at once; the others wait for their deadline
        closed, end = [], time.monotonic() + 0.5
        while (left := end - time.monotonic()) > 0:
            readable, _, _ = select.select([s for s in hogs if s not in closed], [], [], left)
            for s in readable:
                assert s.recv(1) == b""
                closed.append(s)
        assert len(closed) == 4
        time.sleep(1.0)  # the others hit their deadline: there is room again
        assert r.scrape(timeout=2)[("mptun_tunnels", L())] == 2
        for s in hogs:
            s.settimeout(0)
            assert s.recv(1) == b""
    finally:
        for s in hogs:
            s.close()


def test_port_in_use_is_an_error() -> None:
    loop = EventLoop()
    a = MetricsServer("127.0.0.1", 0, server_status, "server")
    a.start(loop)
    try:
        b = MetricsServer("127.0.0.1", a.port, server_status, "server")
        with pytest.raises(OSError):
            b.start(loop)
    finally:
        a.close()
        loop.close()


def test_unknown_role_rejected() -> None:
    with pytest.raises(ValueError, match="role"):
        MetricsServer("127.0.0.1", 0, server_status, "proxy")


# -- --metrics ADDR:PORT ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        (" 10.0.0.1:1 ", ("10.0.0.1", 1)),
        ("localhost:9100", ("127.0.0.1", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_parse_metrics_address(text: str, expected: tuple) -> None:
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected ADDR:PORT"),
        ("9100", "expected ADDR:PORT"),
        (":9100", "expected ADDR:PORT"),
        ("127.0.0.1", "expected ADDR:PORT"),
        ("127.0.0.1:", "not a number"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:0", "not a number in 1..65535"),
        ("127.0.0.1:65536", "not a number in 1..65535"),
        ("127.0.0.1:-1", "not a number"),
        ("127.0.0.1:٩١", "not a number"),
        ("::1:9100", "in brackets"),
        ("[::1]9100", "expected ADDR:PORT"),
        ("[::1]", "expected ADDR:PORT"),
        ("[127.0.0.1]:9100", "not an IPv6 address"),
        ("example.com:9100", "not an IP address"),
        ("300.1.1.1:9100", "not an IP address"),
    ],
)
def test_bad_metrics_address(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_metrics_address(text)
    assert repr(text) in str(err.value)


# -- JSON logs --------------------------------------------------------------------------------
@pytest.fixture
def restore_logger():
    log = logging.getLogger("mptun")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


def test_json_logs(restore_logger, monkeypatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    log = setup_logging("server", "info", fmt="json")
    log.info("client '%s' connected", "alice")
    log.debug("not shown")
    try:
        raise ValueError("bad")
    except ValueError:
        log.error("oops \"quoted\"\nsecond line", exc_info=True)
    lines = err.getvalue().splitlines()
    assert len(lines) == 2  # one object a line, even for a multi-line message with a traceback
    first, second = map(json.loads, lines)
    assert first["level"] == "info" and first["role"] == "server" and first["msg"] == "client 'alice' connected"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "error" and second["msg"] == 'oops "quoted"\nsecond line'
    assert "ValueError: bad" in second["exc"]


def test_text_logs_unchanged_and_bad_format(restore_logger, monkeypatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    setup_logging("client", "info").warning("hello")  # the old two-argument call
    assert " mptun-client WARNING hello" in err.getvalue()
    with pytest.raises(ValueError, match="log format 'xml'"):
        setup_logging("client", "info", fmt="xml")


def test_a_busy_scrape_costs_no_snapshot(serve) -> None:
    """The 503 for a scrape over MAX_PENDING is decided before the status snapshot is taken
    (the snapshot is the loop's cost of a scrape: ~8 ms at 1000 tunnels)."""
    snapshots = []

    def status() -> dict:
        snapshots.append(time.monotonic())
        st = server_status()
        st["tunnels"] = SlowList(st["tunnels"])  # keeps the worker busy rendering
        return st

    r = serve(status)
    threads = [threading.Thread(target=lambda: r.scrape(timeout=5)) for _ in range(MetricsServer.MAX_PENDING)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(snapshots) < MetricsServer.MAX_PENDING and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(snapshots) == MetricsServer.MAX_PENDING
    for _ in range(5):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(r.url, timeout=5)
        assert err.value.code == 503
    assert len(snapshots) == MetricsServer.MAX_PENDING  # none taken for the five 503s
    assert r.server.busy == 5
    for t in threads:
        t.join(5)
    assert r.server.scrapes == MetricsServer.MAX_PENDING


def test_crl_metrics_only_with_a_crl(serve) -> None:
    def status(crl) -> dict:
        st = server_status()
        st["revocation"] = {"crl": crl, "denied": 0}
        return st

    crl = {"file": "/etc/mptun/ca.crl", "revoked": 3, "next_update": 1_700_000_000.0, "expired": True,
           "on_expiry": "refuse"}
    m = serve(lambda: status(crl)).scrape()
    assert m[("mptun_crl_expired", L())] == 1
    assert m[("mptun_crl_next_update_timestamp_seconds", L())] == 1_700_000_000.0
    assert m[("mptun_crl_revoked", L())] == 3
    m = serve(lambda: status({**crl, "expired": False})).scrape()
    assert m[("mptun_crl_expired", L())] == 0
    m = serve(lambda: status(None)).scrape()  # no CRL configured: no CRL metrics at all
    assert not [k for k in m if k[0].startswith("mptun_crl_")]
