"""Multipath end to end: one tunnel over several veth links, real processes.

The client namespace has one veth link per path straight to the server
namespace (198.18.4i.0/30, server .1, client .2); the server listens on each
of its link addresses and the client is told all of them, so each client
interface gets exactly one path (the only server address it has a route to).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from tunnel.lab.netns import wait_for
from tunnel.lab.stack import PORT, SERVER_INNER, TunnelStack
from tunnel.lab.stream import run_stream

pytestmark = pytest.mark.netns
STREAM_PORT = 5004


class Multipath:
    def __init__(self, lab, tmp_path, n_paths: int = 2, mode: str = "duplicate"):
        self.lab = lab
        self.server = lab.add_host("srv")
        self.client = lab.add_host("cli")
        self.links = [self.add_link(i) for i in range(n_paths)]
        self.stack = TunnelStack(self.server, self.client, self.links[0].a_addr, workdir=tmp_path / "stack")
        listen = [f"{l.a_addr}:{PORT}" for l in self.links] + [f"198.18.{4 * i}.1:{PORT}" for i in range(n_paths, 3)]
        self.stack.server_overrides["listen"] = listen
        self.stack.client_overrides["server"] = listen
        self.stack.client_overrides["mode"] = mode

    def add_link(self, i: int):
        return self.lab.link(self.server, self.client, f"198.18.{4 * i}.0/30")

    def start(self) -> "Multipath":
        # addresses for links that may be hot-plugged later must exist on the server at start
        for i in range(len(self.links), 3):
            self.server.run(["ip", "addr", "add", f"198.18.{4 * i}.1/32", "dev", "lo"])
        self.stack.start()
        self.wait_paths(len(self.links))
        return self

    def client_paths(self) -> list[dict]:
        return self.stack.client_status()["paths"]

    def server_paths(self) -> list[dict]:
        tunnels = self.stack.server_status()["tunnels"]
        return tunnels[0]["paths"] if tunnels else []

    def wait_paths(self, n: int, timeout: float = 10.0) -> None:
        wait_for(
            lambda: sum(p["joined"] and p["state"] == "up" for p in self.client_paths()) == n
            and len(self.server_paths()) == n,
            timeout,
            message=f"expected {n} joined paths; client: {self.client_paths()}",
        )

    def blackhole(self, i: int) -> None:
        """Drop everything on link i, both ways (from the client namespace)."""
        ifname = self.links[i].b_ifname
        rules = (
            "add table inet bh\n"
            "add chain inet bh out { type filter hook output priority 0; }\n"
            "add chain inet bh in { type filter hook input priority 0; }\n"
            f"add rule inet bh out oifname {ifname} drop\n"
            f"add rule inet bh in iifname {ifname} drop\n"
        )
        self.nft(self.client, rules)

    def random_loss(self, percent: int) -> None:
        """Drop ``percent`` % of the UDP datagrams leaving on every link, both ends, independently."""
        for host, is_client in ((self.client, True), (self.server, False)):
            rules = ["add table inet loss", "add chain inet loss out { type filter hook output priority 0; }"]
            for link in self.links:
                ifname = link.b_ifname if is_client else link.a_ifname
                rules.append(f"add rule inet loss out oifname {ifname} meta l4proto udp numgen random mod 100 < {percent} drop")
            self.nft(host, "\n".join(rules) + "\n")

    def nft(self, host, rules: str) -> None:
        path = self.stack.workdir / f"nft-{host.name}-{time.monotonic_ns()}.rules"
        path.write_text(rules)
        host.run(["nft", "-f", str(path)])

    def stream(self, rate: float, count: int, during=None, size: int = 200):
        return run_stream(
            self.client, self.server, SERVER_INNER, STREAM_PORT, rate, size, count, self.stack.workdir, during=during
        )


@pytest.fixture
def multipath(lab, tmp_path):
    made: list[Multipath] = []

    def make(n_paths: int = 2, mode: str = "duplicate") -> Multipath:
        mp = Multipath(lab, tmp_path, n_paths, mode)
        made.append(mp)
        return mp

    yield make
    for mp in made:
        mp.stack.stop()


def _later(delay: float, fn) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.start()
    return t


def test_duplicate_mode_loses_nothing_when_a_link_dies(multipath):
    mp = multipath(2, "duplicate").start()
    timer = None

    def cut():
        nonlocal timer
        timer = _later(2.0, lambda: mp.blackhole(0))

    result = mp.stream(rate=50, count=250, during=cut)  # 5 s, link 0 dies at about 2 s
    timer.join()
    assert result.end_seen and result.sent == 250
    assert result.lost == 0, result
    assert result.longest_gap_ms < 100  # no stall at the failover
    # the receiver's dedup dropped the copies: duplicates counted on the server, not delivered twice
    assert result.duplicates == 0
    states = {p["addr"].split(":")[0]: p["state"] for p in mp.client_paths()}
    assert states["198.18.0.1"] in ("down", "reconnecting", "handshaking", "closed")
    assert states["198.18.4.1"] == "up"
    tunnel = mp.stack.server_status()["tunnels"][0]
    assert tunnel["duplicates"] > 50  # both links carried copies before the cut


def test_duplicate_mode_residual_loss_with_independent_random_loss(multipath):
    mp = multipath(2, "duplicate").start()
    mp.random_loss(5)
    result = mp.stream(rate=400, count=2000, size=200)
    assert result.end_seen
    # independent 5 % losses on each of the two links: 0.25 % expected; 1 % allowed
    assert result.loss_ratio <= 0.01, result
    # and the links really were lossy: the client saw loss on its paths
    losses = [p["loss"] for p in mp.client_paths()]
    assert all(l > 0 for l in losses) or mp.stack.server_status()["tunnels"][0]["duplicates"] < 1990


@pytest.mark.parametrize("mode", ["lowest-rtt", "balance"])
def test_single_path_modes_fail_over_within_the_dead_interval(multipath, mode):
    mp = multipath(2, mode).start()
    # which link carries the stream now? the one with traffic
    timer = None

    def cut():
        nonlocal timer
        before = {p["addr"]: p["tx_packets"] for p in mp.client_paths()}
        time.sleep(1.0)
        after = {p["addr"]: p["tx_packets"] for p in mp.client_paths()}
        busiest = max(after, key=lambda a: after[a] - before.get(a, 0))
        index = 0 if busiest.startswith("198.18.0.1") else 1
        timer = _later(0.5, lambda: mp.blackhole(index))

    result = mp.stream(rate=100, count=500, during=cut)
    timer.join()
    assert result.end_seen
    # the gap is detection (dead interval 0.3 s) plus the switch; allow margin for a loaded machine
    assert result.longest_gap_ms < 800, result
    assert result.lost <= 0.8 * 100, result  # at most ~0.8 s worth of packets lost
    print(f"{mode}: failover gap {result.longest_gap_ms:.0f} ms, lost {result.lost}")


def _tbf(host, ifname: str, mbit: int) -> None:
    host.run(["tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", f"{mbit}mbit",
              "burst", "32kb", "latency", "50ms"])


def _iperf(mp: Multipath, target: str, seconds: int = 4) -> float:
    srv = mp.server.popen(["iperf3", "-s", "-1", "-B", target], stdout=subprocess.DEVNULL)
    wait_for(lambda: mp.server.is_listening(5201), 5, message="iperf3 server")
    res = mp.client.run(["iperf3", "-c", target, "-t", str(seconds), "-J"], timeout=seconds + 30)
    srv.wait(10)
    return json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]


def test_balance_mode_aggregates_two_rate_limited_links(multipath):
    mp = multipath(2, "balance").start()
    for link in mp.links:
        _tbf(mp.client, link.b_ifname, 20)
        _tbf(mp.server, link.a_ifname, 20)
    single = _iperf(mp, mp.links[0].a_addr)  # the raw link alone
    both = _iperf(mp, SERVER_INNER)
    print(f"balance: one raw link {single / 1e6:.1f} Mbit/s, tunnel over two {both / 1e6:.1f} Mbit/s")
    assert both >= 1.6 * single


def test_paths_follow_interfaces_hot_plug(multipath):
    mp = multipath(2, "duplicate").start()
    link = mp.add_link(2)  # a third interface appears
    mp.links.append(link)
    mp.wait_paths(3, timeout=5)
    assert mp.client.ping(SERVER_INNER)
    mp.client.set_link(link.b_ifname, up=False)  # and goes away again
    wait_for(lambda: len(mp.client_paths()) == 2, 5, message="path of the removed interface still listed")
    wait_for(lambda: len(mp.server_paths()) == 2, 5, message="server still lists the removed path")
    assert mp.client.ping(SERVER_INNER)
    log = mp.stack.client_log.read_text()
    assert "tunnel down" not in log and log.count("tunnel up:") == 1
