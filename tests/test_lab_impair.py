"""The impairment lab does what it claims: delay, jitter, reordering, loss, outages, rate.

Each test builds a fresh MultipathTopology (client, router, server, 2 paths)
and measures through it with the UDP echo probe of tunnel.lab.topology
(timestamps in CLOCK_MONOTONIC, shared by all namespaces) or iperf3.  Bounds
are chosen so that a correct lab passes on a noisy 2-core VM, where a bare
select() wake-up is late by ~0.1 ms typically and by ~2 ms at p99, while a
broken one (missing, doubled or rounded delay, reordering jitter, wrong loss
rate, leaky outage, unshaped rate) fails.  Every test also checks that its
namespaces are gone afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Iterator

import pytest

from tunnel.lab.delayline import GilbertElliott
from tunnel.lab.impair import Impairment, Impairments
from tunnel.lab.netns import NETNS_DIR, Lab, unique_prefix, wait_for
from tunnel.lab.topology import MultipathTopology, echo_server_argv, probe_argv, rtts_ms

pytestmark = pytest.mark.netns

ECHO_PORT = 7007
IPERF_PORT = 5201


def _namespaces(prefix: str) -> list[str]:
    return [n for n in os.listdir(NETNS_DIR) if n.startswith(prefix + "-")] \
        if os.path.isdir(NETNS_DIR) else []


@pytest.fixture
def topo(request: pytest.FixtureRequest) -> Iterator[MultipathTopology]:
    """A 2-path topology with a UDP echo server on srv; asserts nothing is left afterwards."""
    prefix = unique_prefix(request.node.name.removeprefix("test_"))
    try:
        with Lab(prefix) as lab:
            topology = MultipathTopology(lab, n_paths=2)
            server = topology.server
            echo = server.popen(echo_server_argv(ECHO_PORT))
            wait_for(lambda: server.is_listening(ECHO_PORT, udp=True) or echo.poll() is not None,
                     10, message="echo server did not start")
            assert echo.poll() is None, "echo server died"
            yield topology
    finally:
        assert _namespaces(prefix) == [], "namespaces left behind"


@pytest.fixture
def imp(topo: MultipathTopology) -> Iterator[Impairments]:
    with Impairments(topo, seed=1) as impairments:
        yield impairments


def probe(topo: MultipathTopology, path: int, count: int, rate: float, grace: float = 0.5) -> dict:
    """Run the UDP echo probe over one path; see tunnel.lab.topology.probe."""
    argv = probe_argv(topo.server_addr, ECHO_PORT, count, rate,
                      device=topo.paths[path].client_ifname, grace=grace)
    return json.loads(topo.client.run(argv, timeout=count / rate + 30).stdout)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def late_arrivals(result: dict) -> int:
    """Echoes that arrive after one with a higher sequence number (0 = in order)."""
    highest, late = -1, 0
    for seq, _ in result["recv"]:
        late += seq < highest
        highest = max(highest, seq)
    return late


def test_delay_is_held(topo: MultipathTopology, imp: Impairments) -> None:
    """20 ms each way: p50 RTT = raw + 40 ms +- 3 ms, and never below 40 ms.

    The delay line adds two forwarding hops and a Python pass per direction
    (~0.1-0.2 ms each) and wakes up late by ~0.1 ms (p50) on this VM: about
    +0.5 ms in all.  +-3 ms absorbs a noisy machine (+-2 ms failed once in
    a full suite run here) but catches a missing or doubled delay.  A packet can never leave early, so
    the minimum is a hard bound.
    """
    raw = quantile(rtts_ms(probe(topo, 0, 200, 200)), 0.5)
    imp.set(0, Impairment(delay_ms=20))
    rtts = rtts_ms(probe(topo, 0, 200, 200))
    assert len(rtts) == 200
    assert abs(quantile(rtts, 0.5) - (raw + 40)) <= 3.0, (raw, quantile(rtts, 0.5))
    assert min(rtts) >= 40.0
    assert quantile(rtts_ms(probe(topo, 1, 50, 200)), 0.5) < 5  # the other path is untouched
    stats = imp.stats()
    assert stats[(0, "up")]["in"] == stats[(0, "up")]["out"] == 200
    assert stats[(0, "down")]["out"] == 200


def test_jitter_spreads_without_reordering(topo: MultipathTopology, imp: Impairments) -> None:
    """Upstream 20 +- 10 ms (uniform), 100 packets/s, reorder 0.

    Simulating the FIFO rule (due = max(sampled, previous due)) over 200
    packets gives min 10.0-11.6 ms, p10 11.5-15 ms, p90 26-29.2 ms; the
    bounds below leave room for ~0.3 ms of path and lateness on top.
    """
    imp.set(0, Impairment(delay_ms=20, jitter_ms=10), "up")
    result = probe(topo, 0, 200, 100)
    rtts = rtts_ms(result)
    assert len(rtts) == 200
    assert late_arrivals(result) == 0
    assert min(rtts) >= 10.0
    assert quantile(rtts, 0.1) <= 16.0 and quantile(rtts, 0.9) >= 25.5
    assert quantile(rtts, 0.95) <= 33.0


def test_reorder_holds_packets_back(topo: MultipathTopology, imp: Impairments) -> None:
    """reorder 0.2, gap 10 ms, 5 ms apart: held-back packets are overtaken.

    Held back: binomial(200, 0.2), mean 40, sigma 5.7; bounds at ~4 sigma.
    A held-back packet arrives after its successor unless that one is held
    back too (ties), so at least half of them must show as late.
    """
    imp.set(0, Impairment(delay_ms=5, reorder=0.2, reorder_gap_ms=10), "up")
    result = probe(topo, 0, 200, 200)
    held = imp.stats()[(0, "up")]["held_back"]
    assert 17 <= held <= 63
    assert len(result["recv"]) == 200
    assert held // 2 <= late_arrivals(result) <= held


def test_random_loss_is_binomial(topo: MultipathTopology, imp: Impairments) -> None:
    """10% upstream loss (nftables numgen) over 2000 packets: 200 +- 4 sigma (sigma 13.4)."""
    imp.set(0, Impairment(loss=0.1), "up")
    lost = 2000 - len(rtts_ms(probe(topo, 0, 2000, 1000)))
    assert 146 <= lost <= 254
    assert imp.stats() == {}  # random loss alone does not need the delay line


def test_burst_loss_clusters(topo: MultipathTopology, imp: Impairments) -> None:
    """Gilbert-Elliott 0.05 / 0.5, all lost in bad: loss 9.1%, mean burst 2 packets.

    Simulated over 2000 packets: lost 182 (sigma 21), mean run 2.0 (sigma
    0.15); bounds at ~4 sigma.  Every loss is one the delay line counted.
    """
    imp.set(0, Impairment(burst=GilbertElliott(0.05, 0.5)), "down")
    result = probe(topo, 0, 2000, 1000)
    got = {seq for seq, _ in result["recv"]}
    lost = [seq for seq in range(2000) if seq not in got]
    runs = sum(1 for seq in lost if seq - 1 not in lost)
    assert 100 <= len(lost) <= 270
    assert 1.4 <= len(lost) / runs <= 2.7
    assert imp.stats()[(0, "down")]["dropped"]["burst"] == len(lost)


def test_outage_drops_inside_the_window_only(topo: MultipathTopology, imp: Impairments) -> None:
    """Outages 0.5-1.0 s upstream and 1.5-2.0 s downstream, 200 probes/s.

    Echoes of probes sent more than 50 ms inside a window are all lost, those
    sent more than 50 ms outside any window all come back (50 ms covers the
    time from sending to the delay line on a busy 2-core machine, where other
    tests' load can hold a process back for tens of ms), and no echo arrives
    during the downstream window.
    """
    up, down = (0.5, 1.0), (1.5, 2.0)
    imp.set(0, Impairment(outages=(up,)), "up")
    imp.set(0, Impairment(outages=(down,)), "down")
    start = imp.restart_schedule()
    result = probe(topo, 0, 500, 200)
    margin = 0.05
    got = {seq for seq, _ in result["recv"]}
    for seq, sent in enumerate(result["sent"]):
        t = sent - start
        if any(a + margin <= t <= b - margin for a, b in (up, down)):
            assert seq not in got, f"probe sent at {t:.3f} s came back"
        elif not any(a - margin <= t <= b + margin for a, b in (up, down)):
            assert seq in got, f"probe sent at {t:.3f} s was lost"
    assert not [t - start for _, t in result["recv"]
                if down[0] + margin <= t - start <= down[1] - margin]
    stats = imp.stats()
    dropped = stats[(0, "up")]["dropped"]["outage"] + stats[(0, "down")]["dropped"]["outage"]
    assert dropped == 500 - len(got)
    assert 180 <= dropped <= 220  # two windows of 0.5 s at 200/s


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_rate_limit_holds(topo: MultipathTopology, imp: Impairments) -> None:
    """iperf3 TCP through a 20 Mbit/s tbf, each direction: 15-22 Mbit/s."""
    server = topo.server.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL)
    wait_for(lambda: topo.server.is_listening(IPERF_PORT) or server.poll() is not None, 10,
             message="iperf3 server did not start")
    imp.set(0, Impairment(rate_mbit=20))
    for reverse in (False, True):
        argv = ["iperf3", "-c", topo.server_addr, "-p", str(IPERF_PORT), "-t", "2", "-J",
                "--bind-dev", topo.paths[0].client_ifname] + (["-R"] if reverse else [])
        out = json.loads(topo.client.run(argv, timeout=30).stdout)
        mbit = out["end"]["sum_received"]["bits_per_second"] / 1e6
        assert 15 <= mbit <= 22, f"{'down' if reverse else 'up'}: {mbit:.1f} Mbit/s"


def test_blackhole_and_clear(topo: MultipathTopology, imp: Impairments) -> None:
    """A blackhole drops a path at once and only that path; clear() removes everything."""
    imp.blackhole(1)
    assert probe(topo, 1, 20, 200, grace=0.2)["recv"] == []
    assert len(probe(topo, 0, 20, 200, grace=0.2)["recv"]) == 20
    imp.blackhole(1, on=False)
    assert len(probe(topo, 1, 20, 200, grace=0.2)["recv"]) == 20
    imp.set(0, Impairment(delay_ms=5, loss=0.5, rate_mbit=10))
    imp.set(1, Impairment(rate_mbit=5), "up")
    imp.blackhole(1, "down")
    router = topo.router
    assert "lookup 1000" in router.run(["ip", "rule"]).stdout
    imp.clear()
    assert "lookup 10" not in router.run(["ip", "rule"]).stdout
    assert router.run(["nft", "list", "tables"]).stdout.strip() == ""
    qdiscs = router.run(["tc", "qdisc"]).stdout
    assert "tbf" not in qdiscs and "htb" not in qdiscs
    assert "dl0" not in router.run(["ip", "link"]).stdout  # the delay line is gone
    for path in (0, 1):
        assert quantile(rtts_ms(probe(topo, path, 20, 200, grace=0.2)), 0.5) < 5


def test_hot_plugged_path_and_link_down(topo: MultipathTopology, imp: Impairments) -> None:
    """add_path() gives a working, impairable path; set_path_link() takes one down and back."""
    path = topo.add_path()
    assert (path.index, path.subnet, path.client_addr) == (2, "198.18.2.0/30", "198.18.2.2")
    imp.set(2, Impairment(delay_ms=10))
    assert quantile(rtts_ms(probe(topo, 2, 20, 200, grace=0.2)), 0.5) >= 20
    topo.set_path_link(1, up=False)
    assert probe(topo, 1, 10, 200, grace=0.2)["recv"] == []
    topo.set_path_link(1, up=True)
    assert len(probe(topo, 1, 10, 200, grace=0.2)["recv"]) == 10


def test_everything_is_torn_down_after_a_failure() -> None:
    """An exception inside the lab still kills the delay line and removes the namespaces."""
    prefix = unique_prefix("fail")
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(prefix) as lab:
            impairments = Impairments(MultipathTopology(lab, n_paths=1))
            impairments.set(0, Impairment(delay_ms=50))
            assert impairments._delay_line is not None
            proc = impairments._delay_line.proc
            assert len(_namespaces(prefix)) == 3
            raise RuntimeError("boom")
    assert _namespaces(prefix) == []
    assert proc.poll() is not None
    impairments.clear()  # harmless once the lab is gone
