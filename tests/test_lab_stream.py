"""The UDP stream tool (tunnel/lab/stream.py): statistics, and real streams over a veth."""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from tunnel.lab import stream
from tunnel.lab.netns import Host
from tunnel.lab.stream import Arrival, analyze

PORT = 5600
MS = 1_000_000  # ns


def _arrivals(*items: tuple[int, float]) -> list[Arrival]:
    """Arrivals from (seq, arrival ms); each was sent 1 ms before it arrived."""
    return [Arrival(seq, int((t - 1) * MS), int(t * MS), 0) for seq, t in items]


# --------------------------------------------------------------------------
# Pure statistics
# --------------------------------------------------------------------------

def test_clean_stream_statistics() -> None:
    r = analyze(_arrivals(*((i, 10.0 * i) for i in range(10))), end_count=10)
    assert (r.sent, r.received, r.lost, r.duplicates, r.reordered) == (10, 10, 0, 0, 0)
    assert r.loss_ratio == 0.0 and r.longest_loss_run == 0 and r.loss_run_start is None
    assert r.longest_gap_ms == pytest.approx(10.0)
    assert r.latency_p50_ms == pytest.approx(1.0) and r.latency_p99_ms == pytest.approx(1.0)
    assert r.tos_counts == {0: 10} and r.end_seen and r.arrivals is None


def test_loss_runs_and_the_gap_they_leave() -> None:
    seqs = [0, 1, 2, 6, 7, 9]  # lost: 3-5 (a run of 3) and 8; 10, 11 lost at the end
    r = analyze(_arrivals(*((s, 10.0 * s) for s in seqs)), end_count=12)
    assert (r.sent, r.received, r.lost) == (12, 6, 6)
    assert r.loss_ratio == pytest.approx(0.5)
    assert (r.longest_loss_run, r.loss_run_start) == (3, 3)
    assert (r.longest_gap_ms, r.gap_after_seq, r.gap_before_seq) == (pytest.approx(40.0), 2, 6)


def test_loss_run_reaching_the_end_and_sent_without_end_marker() -> None:
    assert stream.longest_loss_run({0, 1}, 6) == (4, 2)
    assert stream.longest_loss_run(set(), 0) == (0, None)
    r = analyze(_arrivals((0, 1.0), (4, 2.0)))  # no end marker: sent = highest seq + 1
    assert (r.sent, r.received, r.lost, r.end_seen) == (5, 2, 3, False)


def test_held_gap_leaves_out_sender_pauses_and_stalls_only_where_they_overlap() -> None:
    # 100 packets/s, 1 ms on the way; what was sent in [100, 300) ms is held and arrives at
    # 301 ms in a burst (a 210 ms gap after seq 9); seq 50 left 190 ms late (its sender paused)
    items = []
    for seq in range(80):
        sent = 10.0 * seq + (190.0 if seq >= 50 else 0.0)
        arrived = 301.0 if 10 <= seq < 30 else sent + 1
        items.append(Arrival(seq, int(sent * MS), int(arrived * MS), 0))
    r = analyze(items, end_count=80, full=True)
    assert (r.longest_gap_ms, r.gap_after_seq) == (pytest.approx(210.0), 9)
    assert stream.held_gap_ms(r, 100) == pytest.approx(210.0)  # the sender's pause (200) is not the tunnel's ...
    # ... and a stall of an mptun process over part of the held time is left out, once
    stalls = [(0.150, 0.250, "client"), (0.200, 0.280, "server")]
    assert stream.held_gap_ms(r, 100, stalls) == pytest.approx(80.0)
    # a stall elsewhere in the stream excuses nothing
    assert stream.held_gap_ms(r, 100, [(0.6, 0.9, "client")]) == pytest.approx(210.0)
    # without the held burst the longest gap is the sender's pause: 200 ms, of which 10 are the way's
    paused = analyze([Arrival(a.seq, a.sent_ns, a.sent_ns + MS, 0) for a in items], end_count=80, full=True)
    assert paused.longest_gap_ms == pytest.approx(200.0) and stream.held_gap_ms(paused, 100) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="full=True"):
        stream.held_gap_ms(analyze(items, end_count=80), 100)


def test_duplicates_count_once_and_reordering() -> None:
    r = analyze(_arrivals((0, 1.0), (2, 2.0), (1, 3.0), (2, 4.0), (3, 5.0), (1, 6.0)), end_count=4)
    assert (r.received, r.duplicates, r.lost) == (4, 2, 0)
    assert r.reordered == 1  # seq 1 came after seq 2; the late copies are duplicates, not reorderings
    assert stream.count_reordered([0, 3, 1, 2, 4, 5]) == 2
    assert stream.count_reordered([]) == 0


def test_gap_uses_first_arrivals_and_arrival_time_order() -> None:
    # a duplicate of seq 0 in the middle of the 50 ms hole does not shorten the gap
    r = analyze(_arrivals((1, 60.0), (0, 10.0), (0, 30.0)))
    assert (r.longest_gap_ms, r.gap_after_seq, r.gap_before_seq) == (pytest.approx(50.0), 0, 1)
    assert r.reordered == 0  # sorted by arrival time: 0 then 1


def test_empty_and_latency_percentiles() -> None:
    r = analyze([], stopped_by="timeout")
    assert (r.sent, r.received, r.lost, r.longest_gap_ms, r.latency_p50_ms) == (0, 0, 0, 0.0, None)
    lat = [Arrival(i, 0, (i + 1) * MS) for i in range(100)]  # latencies 1..100 ms
    r = analyze(lat)
    assert (r.latency_p50_ms, r.latency_p99_ms, r.latency_max_ms) == (50.0, 99.0, 100.0)
    assert r.tos_counts == {}  # no TOS reported


def test_result_json_round_trip(tmp_path: Path) -> None:
    r = analyze([Arrival(0, 1, 2, 0xB8), Arrival(1, 3, 5, 1)], end_count=3, full=True)
    stream.write_json_atomically(tmp_path / "r.json", r.to_json())
    assert stream.read_result(tmp_path / "r.json") == r
    assert r.tos_counts == {1: 1, 0xB8: 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_wire_format_and_addresses() -> None:
    data = stream.encode(stream.DATA_MAGIC, 7, 123, 100)
    assert len(data) == 100 and data[4:8] == (7).to_bytes(4, "big")  # seq at offset 4 (nft @th,96,32)
    assert stream.decode(data) == (stream.DATA_MAGIC, 7, 123)
    assert stream.decode(b"x" * 100) is None and stream.decode(data[:10]) is None
    assert stream.parse_address("198.18.0.1:5000") == ("198.18.0.1", 5000)
    assert stream.parse_address("[::1]:5000") == ("::1", 5000)
    with pytest.raises(ValueError):
        stream.parse_address("198.18.0.1")


def test_recording_stop_conditions_and_ancillary_data() -> None:
    rec = stream.Recording()
    rec.add(stream.encode(stream.DATA_MAGIC, 1, 10, 64), 20, 0xB8, 0)
    rec.add(b"not one of ours" * 4, 21, 0, 0)  # ignored
    rec.add(stream.encode(stream.END_MAGIC, 2, 30), 40, 0, 0)
    assert rec.done() is None  # the end marker says 2 were sent; seq 0 still missing
    rec.add(stream.encode(stream.DATA_MAGIC, 0, 5, 64), 50, 0, 7)
    assert rec.done() == "complete" and rec.socket_drops == 7
    assert [a.seq for a in rec.arrivals] == [1, 0]
    assert stream.Recording(expect=1, seqs={4}).done() == "expect"
    anc = [(socket.IPPROTO_IP, socket.IP_TOS, b"\xb8"),
           (socket.SOL_SOCKET, stream.SO_RXQ_OVFL, (3).to_bytes(4, sys.byteorder))]
    assert stream.parse_ancillary(anc) == (0xB8, 3)
    assert stream.parse_ancillary([]) == (None, None)


# --------------------------------------------------------------------------
# Real streams over a veth (two_hosts: srv 198.18.0.1 <-> cli 198.18.0.2)
# --------------------------------------------------------------------------

def _nft(host: Host, *commands: str) -> None:
    for command in commands:
        host.run(["nft", command])


def _drop_rule(host: Host, match: str) -> None:
    """In ``host``, drop incoming UDP to PORT that also matches ``match``."""
    _nft(host, "add table inet streamtest",
         "add chain inet streamtest input { type filter hook input priority 0; }",
         f"add rule inet streamtest input udp dport {PORT} {match} drop")


def _slack_ms(r: stream.StreamResult, rate: float) -> float:
    """Tolerance for a gap measured in send intervals: two intervals plus the sender's lateness."""
    return 2 / rate * 1e3 + r.sender["max_lateness_ms"]


@pytest.mark.netns
def test_monotonic_clock_is_shared_across_namespaces(two_hosts) -> None:
    """The one-way latency relies on it: time.monotonic_ns() read in srv, then in cli,
    lies between two readings in the test process, in that order."""
    argv = [sys.executable, "-c", "import time; print(time.monotonic_ns())"]
    before = time.monotonic_ns()
    in_srv = int(two_hosts.server.run(argv).stdout)
    in_cli = int(two_hosts.client.run(argv).stdout)
    after = time.monotonic_ns()
    assert before < in_srv < in_cli < after


@pytest.mark.netns
def test_clean_stream_over_veth(two_hosts, tmp_path: Path) -> None:
    r = stream.run_stream(two_hosts.client, two_hosts.server, two_hosts.server_addr, PORT,
                          rate=1000, size=200, count=500, workdir=tmp_path, full=True)
    assert (r.sent, r.received, r.lost, r.duplicates, r.reordered) == (500, 500, 0, 0, 0)
    assert r.stopped_by == "complete" and r.end_seen and r.socket_drops == 0
    assert r.tos_counts == {0: 500}
    assert 0 < r.latency_p50_ms < 10  # positive: sender and receiver share the clock
    late_ms = r.sender["max_lateness_ms"]  # a stalled sender makes gaps the network did not
    assert r.longest_gap_ms < 20 + late_ms
    assert [a.seq for a in r.arrivals] == list(range(500))
    assert r.sender["sent"] == 500 and r.sender["send_errors"] == 0
    # absolute schedule: the last datagram leaves at 499 ms, plus at most the worst lateness
    assert 0.499 <= r.sender["duration_s"] <= 0.499 + late_ms / 1e3 + 0.005


@pytest.mark.netns
def test_dropped_seq_range_is_lost_and_leaves_a_gap(two_hosts, tmp_path: Path) -> None:
    _drop_rule(two_hosts.server, "@th,96,32 100-149")  # seq 100..149
    rate = 200
    r = stream.run_stream(two_hosts.client, two_hosts.server, two_hosts.server_addr, PORT,
                          rate=rate, size=100, count=300, workdir=tmp_path)
    assert (r.sent, r.received, r.lost, r.duplicates) == (300, 250, 50, 0)
    assert r.end_seen and r.stopped_by == "end"  # never complete: lingered after the end marker
    assert (r.longest_loss_run, r.loss_run_start) == (50, 100)
    assert (r.gap_after_seq, r.gap_before_seq) == (99, 150)
    # 51 send intervals, give or take the sender's own lateness
    assert r.longest_gap_ms == pytest.approx(51 / rate * 1e3, abs=_slack_ms(r, rate))


@pytest.mark.netns
def test_outage_mid_stream(two_hosts, tmp_path: Path) -> None:
    """Everything dropped for 0.5 s (rule added, then removed) while the stream runs."""
    rate = 200

    def outage() -> None:
        time.sleep(0.5)
        _drop_rule(two_hosts.server, "")
        time.sleep(0.5)
        _nft(two_hosts.server, "delete table inet streamtest")

    r = stream.run_stream(two_hosts.client, two_hosts.server, two_hosts.server_addr, PORT,
                          rate=rate, size=100, count=400, workdir=tmp_path, during=outage)
    assert r.sent == 400 and r.lost > 0 and r.duplicates == 0 and r.socket_drops == 0
    assert r.longest_loss_run == r.lost  # one contiguous hole
    assert 450 < r.longest_gap_ms < 700
    # the hole in the arrivals matches the lost seqs: (lost + 1) send intervals
    assert r.longest_gap_ms == pytest.approx((r.lost + 1) / rate * 1e3, abs=_slack_ms(r, rate))
    assert r.gap_before_seq - r.gap_after_seq == r.lost + 1


@pytest.mark.netns
def test_duplicates_are_counted_not_received_twice(two_hosts, tmp_path: Path) -> None:
    r = stream.run_stream(two_hosts.client, two_hosts.server, two_hosts.server_addr, PORT,
                          rate=2000, size=64, count=200, workdir=tmp_path, dup_every=10)
    assert r.sender["duplicates_sent"] == 20
    assert (r.sent, r.received, r.lost) == (200, 200, 0)
    assert r.duplicates == 20 and r.reordered == 0


@pytest.mark.netns
def test_tos_reaches_the_receiver(two_hosts, tmp_path: Path) -> None:
    r = stream.run_stream(two_hosts.client, two_hosts.server, two_hosts.server_addr, PORT,
                          rate=2000, size=64, count=100, workdir=tmp_path, tos=0xB8)
    assert r.received == 100 and r.tos_counts == {0xB8: 100}


@pytest.mark.netns
def test_ipv6_loopback_with_traffic_class(lab, tmp_path: Path) -> None:
    host = lab.add_host("v6")
    r = stream.run_stream(host, host, "::1", PORT, rate=2000, size=64, count=50,
                          workdir=tmp_path, tos=0x2E)
    assert (r.received, r.lost) == (50, 0) and r.tos_counts == {0x2E: 50}


@pytest.mark.netns
def test_receiver_stop_conditions(two_hosts, tmp_path: Path) -> None:
    """--expect, SIGTERM and the idle timeout each end the recording with a result file."""
    srv, bind = two_hosts.server, f"0.0.0.0:{PORT}"

    out = tmp_path / "expect.json"
    proc = stream.start_receiver(srv, bind, out, expect=30)
    stream.wait_listening(srv, PORT, proc)
    to = f"{two_hosts.server_addr}:{PORT}"
    sent = stream.run_sender(two_hosts.client, to, rate=1000, size=64, count=100)
    r = stream.finish_receiver(proc, out, timeout=10)
    assert sent["sent"] == 100
    assert (r.stopped_by, r.received, r.sent, r.end_seen) == ("expect", 30, 30, False)

    out = tmp_path / "term.json"
    proc = stream.start_receiver(srv, bind, out, timeout=60)
    stream.wait_listening(srv, PORT, proc)
    r = stream.finish_receiver(proc, out, timeout=0)  # SIGTERM at once
    assert (r.stopped_by, r.sent, r.received) == ("signal", 0, 0)

    out = tmp_path / "idle.json"
    started = time.monotonic()
    proc = stream.start_receiver(srv, bind, out, timeout=0.3)
    r = stream.finish_receiver(proc, out, timeout=10)
    assert r.stopped_by == "timeout" and time.monotonic() - started < 5
