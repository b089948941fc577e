"""Trace-driven links: the trace parser, the queue served at the trace's opportunities, the
scenario keys and options, and (netns) a trace-driven path end to end.

Why: a trace-driven link is only worth having if it delivers what the trace
says and drops where the queue ends; a queue that served too fast, let
unused opportunities pile up, ignored the scale or never dropped would still
"work".  The queue is tested with a manual clock (no sleeps); the netns test
pushes more UDP through a real path than the trace allows and compares what
arrives with the trace's capacity over the same window.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tunnel.app.cli import main as mptun
from tunnel.lab.impair import Impairment, Impairments, trace_pair
from tunnel.lab.linktrace import (OPPORTUNITY_BYTES, TRACES_DIR, Trace, TraceError, TraceQueue,
                                  load_trace, queue_limit_bytes, resolve_trace)
from tunnel.lab.netns import NETNS_DIR, Lab, unique_prefix, wait_for
from tunnel.lab.scenario import Scenario, ScenarioError, load_scenario, with_overrides
from tunnel.lab.topology import MultipathTopology

MTU = OPPORTUNITY_BYTES
SHIPPED = ("ATT-LTE-driving-2016.up", "ATT-LTE-driving-2016.down",
           "TMobile-UMTS-driving.up", "TMobile-UMTS-driving.down")


def write(tmp_path: Path, text: str, name: str = "t.trace") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def every_2ms(tmp_path: Path) -> Trace:
    """Opportunities at 2, 4, 6, 8, 10 ms, repeating every 10 ms: 500 per second."""
    return load_trace(write(tmp_path, "2\n4\n6\n8\n10\n"))


class Sink:
    """Collects what a TraceQueue emits: (packet, departure time)."""

    def __init__(self) -> None:
        self.out: list[tuple[bytes, float]] = []

    def __call__(self, packet: bytes, t: float) -> None:
        self.out.append((packet, t))

    def times_ms(self) -> list[float]:
        return [round(t * 1e3, 6) for _, t in self.out]


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_traces_parse(name: str) -> None:
    trace = load_trace(resolve_trace(name))
    assert trace.path == str(TRACES_DIR / name)
    assert len(trace.times_ms) > 10_000 and trace.period_ms >= 120_000
    assert list(trace.times_ms) == sorted(trace.times_ms)
    assert 0.5 < trace.mean_mbit() < 6  # the README's means: 0.94 .. 4.56 Mbit/s
    assert trace.mean_mbit(8) == pytest.approx(8 * trace.mean_mbit())


def test_parser_reads_times_ignores_blank_lines_and_knows_the_period(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "0\n0\n\n5\n  7 \n10\n\n"))
    assert trace.times_ms == (0, 0, 5, 7, 10) and trace.period_ms == 10
    assert trace.mean_mbit() == pytest.approx(5 * 1500 * 8 / 0.010 / 1e6)  # 5 packets per 10 ms
    # opportunities at 0 0 5 7 10 | 10 10 15 17 20 | 20 ...: [0, 10) holds 4, [10, 20) holds 5
    assert trace.bytes_between(0, 10) == 4 * MTU
    assert trace.bytes_between(10, 20) == 5 * MTU
    assert trace.bytes_between(0, 30, scale=2) == 2 * 14 * MTU
    assert trace.bytes_between(3, 23) == 10 * MTU  # two whole periods, wherever they start


@pytest.mark.parametrize("text, message", [
    ("", "the trace is empty"),
    ("\n \n", "the trace is empty"),
    ("1\n2\nabc\n4\n", "line 3: 'abc' is not a time in ms"),
    ("1\n-2\n", "line 2: '-2' is not a time in ms"),
    ("1.5\n", "line 1: '1.5' is not a time in ms"),
    ("1\n5\n3\n", "entry 3: time 3 goes back (after 5)"),
    ("0\n0\n", "the trace lasts 0 ms"),
])
def test_parser_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TraceError) as exc:
        load_trace(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_unreadable_and_missing_traces(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read the trace"):
        load_trace(tmp_path / "nope")
    with pytest.raises(TraceError, match="cannot read the trace"):
        load_trace(tmp_path)  # a directory
    with pytest.raises(TraceError, match=r"trace 'nope.up' not found .*ATT-LTE-driving-2016.up"):
        resolve_trace("nope.up", tmp_path)


def test_resolution_prefers_the_given_path_then_the_shipped_name(tmp_path: Path) -> None:
    write(tmp_path, "1\n2\n", "ATT-LTE-driving-2016.up")
    assert resolve_trace("ATT-LTE-driving-2016.up", tmp_path) == tmp_path / "ATT-LTE-driving-2016.up"
    assert resolve_trace("ATT-LTE-driving-2016.up", tmp_path / "sub") == \
        TRACES_DIR / "ATT-LTE-driving-2016.up"
    with pytest.raises(TraceError):  # a relative path with a folder is never a shipped name
        resolve_trace("sub/ATT-LTE-driving-2016.up", tmp_path)


# --------------------------------------------------------------------------
# The queue, with a manual clock
# --------------------------------------------------------------------------

def test_packets_leave_at_the_opportunities_one_per_opportunity(tmp_path: Path) -> None:
    q, sink = TraceQueue(every_2ms(tmp_path), 1.0, start=100.0, queue_packets=100), Sink()
    for i in range(5):
        assert q.enqueue(bytes([i]) * MTU, 100.0)
    q.serve(100.0051, sink)
    assert sink.times_ms() == [100002.0, 100004.0]
    assert [p[0] for p, _ in sink.out] == [0, 1]  # FIFO
    assert q.next_time() == pytest.approx(100.006)
    q.serve(100.0101, sink)  # 6, 8, 10 (the period's last line) ...
    assert sink.times_ms()[2:] == [100006.0, 100008.0, 100010.0]
    assert q.next_time() is None and q.used == 5 and q.wasted == 0
    assert (q.bytes, len(q.packets), q.sent_bytes) == (0, 0, 5 * MTU)


def test_the_trace_repeats_and_delivers_its_rate(tmp_path: Path) -> None:
    q, sink = TraceQueue(every_2ms(tmp_path), 1.0, start=0.0, queue_packets=10_000), Sink()
    for _ in range(2000):
        q.enqueue(b"x" * MTU, 0.0)
    for now in range(1, 1001):  # 1 s in 1 ms steps
        q.serve(now / 1e3, sink)
    assert len(sink.out) == 500  # 2, 4, ..., 1000 ms
    gaps = {round((b - a) * 1e3, 6) for (_, a), (_, b) in zip(sink.out, sink.out[1:])}
    assert gaps == {2.0}  # no double opportunity where the trace wraps


def test_unused_opportunities_are_lost(tmp_path: Path) -> None:
    """An idle second does not let a burst through faster afterwards."""
    q, sink = TraceQueue(every_2ms(tmp_path), 1.0, start=0.0, queue_packets=100), Sink()
    for _ in range(10):
        q.enqueue(b"x" * MTU, 1.0005)
    q.serve(1.1, sink)
    assert sink.times_ms() == [1002.0 + 2 * i for i in range(10)]
    assert q.wasted == 500 and q.used == 10  # 2 .. 1000 ms passed with nothing queued


def test_scale_multiplies_the_bytes_of_an_opportunity(tmp_path: Path) -> None:
    trace = every_2ms(tmp_path)
    q, sink = TraceQueue(trace, 3.0, start=0.0, queue_packets=100), Sink()
    for _ in range(6):
        q.enqueue(b"x" * MTU, 0.0)
    q.serve(0.0041, sink)
    assert sink.times_ms() == [2.0] * 3 + [4.0] * 3
    half, sink = TraceQueue(trace, 0.5, start=0.0, queue_packets=100), Sink()
    for _ in range(2):
        half.enqueue(b"x" * MTU, 0.0)
    half.serve(1.0, sink)
    assert sink.times_ms() == [4.0, 8.0]  # a full packet needs two half opportunities


def test_small_packets_share_an_opportunity(tmp_path: Path) -> None:
    q, sink = TraceQueue(every_2ms(tmp_path), 1.0, start=0.0, queue_packets=100), Sink()
    for size in (500, 500, 500, 1000, 100):
        q.enqueue(b"x" * size, 0.0)
    q.serve(1.0, sink)
    # 1500 bytes at 2 ms: three of 500; then 1000 + 100 at 4 ms; the rest of 4 ms is lost
    assert sink.times_ms() == [2.0, 2.0, 2.0, 4.0, 4.0]
    assert q.sent_bytes == 2600 and q.used == 2


def test_drop_tail_in_packets(tmp_path: Path) -> None:
    q, sink = TraceQueue(every_2ms(tmp_path), 1.0, start=0.0, queue_packets=3), Sink()
    accepted = [q.enqueue(bytes([i]) * MTU, 0.0) for i in range(5)]
    assert accepted == [True, True, True, False, False] and q.dropped == 2
    q.serve(0.0021, sink)  # one leaves: room for one more, at the tail
    assert q.enqueue(b"\x09" * MTU, 0.0021) and not q.enqueue(b"\x0a" * MTU, 0.0021)
    q.serve(1.0, sink)
    assert [p[0] for p, _ in sink.out] == [0, 1, 2, 9]
    c = q.counters()
    assert (c["dropped"], c["max_queued_packets"], c["limit_packets"], c["limit_bytes"]) == (3, 3, 3, None)


def test_drop_tail_in_milliseconds_uses_the_scaled_mean_rate(tmp_path: Path) -> None:
    trace = every_2ms(tmp_path)  # 6 Mbit/s at x1: 750 kB/s
    assert queue_limit_bytes(trace, 2.0, 100) == 150_000  # 100 ms at 12 Mbit/s
    assert queue_limit_bytes(trace, 1.0, 0) == 2 * MTU  # never less than two packets
    q = TraceQueue(trace, 2.0, start=0.0, queue_ms=100)
    accepted = sum(q.enqueue(b"x" * MTU, 0.0) for _ in range(150))
    assert accepted == 100 and q.bytes == 150_000 and q.dropped == 50
    assert q.enqueue(b"x" * 0, 0.0)  # a byte limit: what fits still goes in


def test_a_real_trace_scaled_delivers_its_capacity(tmp_path: Path) -> None:
    """ATT-LTE up x8, saturated for 10 s from 9 s into the trace: exactly the trace's bytes."""
    trace = load_trace(resolve_trace("ATT-LTE-driving-2016.up"))
    q, sink = TraceQueue(trace, 8.0, start=-9.0, queue_packets=500), Sink()
    for ms in range(10_001):
        while len(q.packets) < 500:  # keep it full: every opportunity is used
            q.enqueue(b"x" * MTU, ms / 1e3)
        q.serve(ms / 1e3, sink)
    sent = sum(len(p) for p, _ in sink.out)
    capacity = trace.bytes_between(9_000, 19_000.5, 8.0)  # opportunities at 9 s .. 19 s
    edges = trace.bytes_between(8_999, 9_001, 8.0) + trace.bytes_between(18_999, 19_001, 8.0)
    assert abs(sent - capacity) <= edges  # float rounding may move an edge opportunity
    assert 10 < capacity * 8 / 10 / 1e6 < 40  # x8: tens of Mbit/s
    assert q.wasted == trace.bytes_between(0, 9_000) / MTU  # the 9 s before the first packet
    assert q.dropped == 0 and q.used * 8 * MTU == sent


# --------------------------------------------------------------------------
# The Impairment API and the scenario keys
# --------------------------------------------------------------------------

def test_impairment_takes_a_shipped_trace_by_name() -> None:
    imp = Impairment(trace="ATT-LTE-driving-2016.up", trace_scale=8, trace_queue_ms=200, delay_ms=20)
    assert imp.trace == str(TRACES_DIR / "ATT-LTE-driving-2016.up") and imp.needs_delay_line()
    line = imp.line_settings("dl0u")
    assert (line.trace, line.trace_scale, line.trace_queue_ms, line.delay_ms) == (imp.trace, 8, 200, 20)
    for bad in ({"rate_mbit": 10}, {"trace_scale": 0}, {"trace_queue_packets": 0}):
        with pytest.raises(ValueError):
            Impairment(trace="ATT-LTE-driving-2016.up", **bad)
    with pytest.raises(TraceError, match="not found"):
        Impairment(trace="no-such-trace.up")
    pair = trace_pair("ATT-LTE-driving-2016", 8, trace_queue_ms=200, delay_ms=20)
    assert pair["up"] == imp and Path(pair["down"].trace or "").name == "ATT-LTE-driving-2016.down"


def test_scenario_trace_keys_resolve_against_the_file(tmp_path: Path) -> None:
    write(tmp_path, "5\n10\n", "mine.up")
    path = write(tmp_path, '[[path]]\ntrace_up = "mine.up"\ntrace_down = "ATT-LTE-driving-2016.down"\n'
                           "trace_scale = 4\ntrace_queue_packets = 30\nrate_mbit = 5\n", "s.toml")
    spec = load_scenario(path).paths[0]
    assert spec.trace_up == str(tmp_path / "mine.up")
    assert spec.trace_down == str(TRACES_DIR / "ATT-LTE-driving-2016.down")
    s = load_scenario(path)
    up, down = s.impairments(False, "up")[0], s.impairments(False, "down")[0]
    assert (up.trace, down.trace, up.rate_mbit, up.trace_scale, up.trace_queue_packets) == \
        (spec.trace_up, spec.trace_down, None, 4, 30)
    one_way = load_scenario(write(tmp_path, '[[path]]\ntrace_up = "mine.up"\nrate_mbit = 5\n', "o.toml"))
    assert one_way.impairments(False, "down")[0].rate_mbit == 5  # no trace down: the fixed rate stays
    assert "up: trace mine.up x1" in one_way.paths[0].describe()


@pytest.mark.parametrize("text, message", [
    ('trace_up = "missing.up"', "[path 0] trace_up: trace 'missing.up' not found"),
    ('trace_down = "empty.down"', "[path 0] trace_down: {dir}/empty.down: the trace is empty"),
    ('trace_up = "bad.up"', "[path 0] trace_up: {dir}/bad.up: line 2: 'x' is not a time in ms"),
    ("trace_up = 5", "[path 0] trace_up: expected a trace file path"),
    ("trace_scale = 0", "[path 0] trace_scale: 0 is out of range"),
    ("trace_queue_packets = 1.5", "[path 0] trace_queue_packets: expected an integer"),
    ('trace_upp = "x"', "trace_upp"),
])
def test_scenario_trace_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path, "", "empty.down")
    write(tmp_path, "1\nx\n", "bad.up")
    path = write(tmp_path, f"[[path]]\n{text}\n", "s.toml")
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert message.format(dir=tmp_path) in str(exc.value) and "\n" not in str(exc.value)


def test_options_set_traces_per_path() -> None:
    s = with_overrides(Scenario(), trace_up=["ATT-LTE-driving-2016.up", None],
                       trace_down=["TMobile-UMTS-driving.down"], trace_scale=[8, 4])
    assert [Path(p.trace_up).name if p.trace_up else None for p in s.paths] == \
        ["ATT-LTE-driving-2016.up", None]
    assert [Path(p.trace_down or "").name for p in s.paths] == ["TMobile-UMTS-driving.down"] * 2
    assert [p.trace_scale for p in s.paths] == [8, 4]
    assert len(with_overrides(Scenario(), trace_up=["ATT-LTE-driving-2016.up"] * 3).paths) == 3
    with pytest.raises(ScenarioError, match="command line: --trace-up: 3 values for 2 paths"):
        with_overrides(Scenario(), paths=2, trace_up=["a", "b", "c"])


def test_cli_trace_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = write(tmp_path, "", "empty.up")
    for argv, message in ((["--trace-up", str(empty)], f"--trace-up: {empty}: the trace is empty"),
                          (["--trace-down", "none,nope.down"], "--trace-down: trace 'nope.down' not found"),
                          (["--quick", "--trace-up", "x"], "--trace-up: not used by --quick")):
        assert mptun(["lab", *argv]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("mptun lab: error: command line: ") and message in err


# --------------------------------------------------------------------------
# End to end (netns): a trace-driven path delivers the trace's rate and drops at the queue
# --------------------------------------------------------------------------

IPERF_PORT = 5201
UDP_PAYLOAD = MTU - 28  # IP packets of exactly one opportunity
OFFERED_MBIT = 40.0  # well above the trace windows below (~7 Mbit/s), well below the raw veth
WINDOW_S = 3.0


def _iperf_udp(topo: MultipathTopology, reverse: bool) -> dict[str, Any]:
    argv = ["iperf3", "-c", topo.server_addr, "-p", str(IPERF_PORT), "-u", "-l", str(UDP_PAYLOAD),
            "-b", f"{OFFERED_MBIT:g}M", "-t", f"{WINDOW_S:g}", "-J",
            "--bind-dev", topo.paths[0].client_ifname] + (["-R"] if reverse else [])
    out = json.loads(topo.client.run(argv, timeout=WINDOW_S + 30).stdout)
    return out["end"]["sum_received"] if "sum_received" in out["end"] else out["end"]["sum"]


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
@pytest.mark.parametrize("direction, name, scale, offset_s", [
    ("up", "ATT-LTE-driving-2016.up", 2.0, 9.0),  # 9-12 s of the trace: ~3.6 Mbit/s, x2
    ("down", "ATT-LTE-driving-2016.down", 1.0, 12.0),  # 12-15 s: ~7.8 Mbit/s
])
def test_trace_path_delivers_the_trace_rate_and_drops_at_the_queue(
        direction: str, name: str, scale: float, offset_s: float) -> None:
    prefix = unique_prefix(f"trace{direction}")
    trace = load_trace(resolve_trace(name))
    try:
        with Lab(prefix) as lab:
            topo = MultipathTopology(lab, n_paths=2)
            server = topo.server.popen(["iperf3", "-s", "-p", str(IPERF_PORT)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: topo.server.is_listening(IPERF_PORT) or server.poll() is not None, 10,
                     message="iperf3 server did not start")
            with Impairments(topo, seed=1) as imp:
                imp.set(0, Impairment(trace=name, trace_scale=scale, trace_queue_packets=40,
                                      delay_ms=5), direction)
                start = imp.restart_schedule(time.monotonic() - offset_s)
                imp.stats(reset=True)
                t0 = time.monotonic()
                received = _iperf_udp(topo, reverse=direction == "down")
                t1 = time.monotonic()
                stats = imp.stats()[(0, direction)]
    finally:
        leftover = [n for n in os.listdir(NETNS_DIR) if n.startswith(prefix + "-")] \
            if os.path.isdir(NETNS_DIR) else []
        assert leftover == [], "namespaces left behind"
    delivered_mbit = received["bytes"] * MTU / UDP_PAYLOAD * 8 / received["seconds"] / 1e6
    # The trace's capacity over the run: iperf3's sender ran within [t0, t1] (t1 - t0 also holds
    # its set-up and the drain), so take the WINDOW_S seconds at the start of that interval.
    capacity_mbit = trace.bytes_between((t0 - start) * 1e3, (t0 - start + WINDOW_S) * 1e3,
                                        scale) * 8 / WINDOW_S / 1e6
    assert capacity_mbit < OFFERED_MBIT / 3, "the chosen window is not a bottleneck"
    assert 0.75 * capacity_mbit <= delivered_mbit <= 1.25 * capacity_mbit, \
        f"{direction}: {delivered_mbit:.2f} Mbit/s through a trace of {capacity_mbit:.2f}"
    assert delivered_mbit < OFFERED_MBIT / 3  # far below what the unshaped path carried
    t = stats["trace"]
    assert t["max_queued_packets"] == t["limit_packets"] == 40  # the queue filled to its limit ...
    assert t["dropped"] == stats["dropped"]["trace_queue"] > 0  # ... and dropped at its tail
    assert stats["in"] == stats["out"] + sum(stats["dropped"].values()) + stats["queued"]
    assert t["opportunities_used"] > 0 and t1 - t0 < WINDOW_S + 10
