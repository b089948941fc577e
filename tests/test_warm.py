"""keep_warm: dummy passes over the packet path leave no trace, and run only before periodic packets."""

from __future__ import annotations

import time

import pytest

from tests.corelab import down_pkt, one_path, up_pkt
from tunnel.wire import dtls
from tunnel.lab.netns import wait_for
from tunnel.lab.stack import SERVER_INNER
from tunnel.core.warm import MAX_INTERVAL, MIN_INTERVAL, TRAIN, Warmer


def _visible(net, c) -> tuple:
    """Everything a warming pass must not change."""
    path, spath, tunnel = c.path("a"), net.spath(c, "a"), net.tunnel()
    return (
        path.tx_records, path.rx_records, path.dtls.records_dropped,
        spath.tx_records, spath.rx_records, spath.dtls.records_dropped,
        c.core.engine.dedup.highest, c.core.engine.dedup.delivered, tunnel.dedup.highest, tunnel.dedup.delivered,
        tunnel.seq, c.core.engine.seq, len(c.core.outbox), len(net.server.outbox), len(c.core.to_tun), len(net.server.to_tun),
    )


def test_warm_passes_change_nothing_and_real_records_still_pass(pki):
    net, c = one_path(pki)
    net.send_down(down_pkt(0))  # the server's warming follows the tunnel that sent last
    net.pump()
    c.core.to_tun.clear()
    before = _visible(net, c)
    for _ in range(2000):
        c.core.warm()
        net.server.warm()
    assert _visible(net, c) == before
    # the forged records did not mark any sequence number as seen, and the thrown-away
    # records only left gaps: real records in both directions still authenticate and count
    c.send_up(up_pkt(1))
    (_, dgram, _), = c.core.outbox
    assert int.from_bytes(dgram[5:11], "big") >= 2000  # each pass really encrypted a record (and threw it away)
    net.pump()
    net.send_down(down_pkt(2))
    net.pump()
    assert net.server.to_tun == [up_pkt(1)] and c.core.to_tun == [down_pkt(2)]
    assert c.path("a").dtls.records_dropped == 0 and net.spath(c, "a").dtls.records_dropped == 0


def test_warm_does_nothing_without_an_established_session(pki):
    net, c = one_path(pki)
    path = c.path("a")
    path.dtls.state = dtls.CLOSED
    path.dtls.warm(b"\x03" + bytes(40))  # no OpenSSL call on a session that is not established
    assert path.dtls.records_dropped == 0


def test_warmer_predicts_the_next_packet_of_a_periodic_flow():
    w = Warmer()
    assert not w.arrival("tun", 10.0)  # one arrival says nothing about the next
    assert w.next_pass() is None
    assert w.arrival("tun", 10.020)
    assert w.next_pass() == pytest.approx(10.040 - TRAIN[0])
    assert not w.arrival("sock", 10.021)  # each source has its own rhythm
    assert w.next_pass() == pytest.approx(10.040 - TRAIN[0])  # and it left the plan alone
    assert w.arrival("tun", 10.040)  # the next packet: a new plan replaces the old
    assert w.next_pass() == pytest.approx(10.060 - TRAIN[0])
    assert not w.arrival("tun", 10.040 + MIN_INTERVAL / 2)  # bulk: the caches stay warm anyway
    assert not w.arrival("tun", 11.0)  # longer than MAX_INTERVAL: not a flow worth warming for
    assert MAX_INTERVAL < 1.0
    w.forget("tun")
    assert not w.arrival("tun", 11.020)


def test_warmer_plans_a_train_of_passes_before_the_packet():
    w = Warmer()
    w.arrival("tun", 5.0)
    w.arrival("tun", 5.020)
    due = 5.040
    assert list(TRAIN) == sorted(TRAIN, reverse=True) and TRAIN[-1] > 0  # all before the packet, earliest first
    seen = []
    while (t := w.next_pass()) is not None:
        seen.append(t)
        assert not w.take(t - 1e-6)  # not due yet
        assert w.take(t)
    assert seen == pytest.approx([due - lead for lead in TRAIN])
    assert not w.take(due)  # nothing left
    # a late timer drops every pass it is late for, and runs one
    w.arrival("tun", 5.040)
    assert w.take(5.060)
    assert w.next_pass() is None


@pytest.mark.parametrize("keep_warm", [True, False])
def test_keep_warm_runs_before_periodic_packets_only(tunnel_stack, keep_warm):
    tunnel_stack.server_overrides["keep_warm"] = keep_warm
    tunnel_stack.client_overrides["keep_warm"] = keep_warm
    tunnel_stack.start()

    def passes() -> tuple[int, int]:
        return tunnel_stack.client_status()["io"]["warm_passes"], tunnel_stack.server_status()["io"]["warm_passes"]

    def settled() -> bool:  # the same counts twice, longer than any prediction apart: no pass is pending
        first = passes()
        time.sleep(2 * MAX_INTERVAL)  # a measurement interval, not a wait for something
        return passes() == first

    wait_for(settled, 15, interval=0, message=f"warming never stopped on an idle tunnel: {passes()}")
    idle = passes()
    time.sleep(1.0)  # keepalive probes every 100 ms are not data: an idle tunnel is never warmed
    assert passes() == idle
    assert tunnel_stack.client_host.echo_count(SERVER_INNER, 40, interval=0.02) == 40
    if not keep_warm:
        assert passes() == (0, 0)
        return
    # echos 20 ms apart (like audio): each end warms before most of them (the echo's own
    # timing jitters on a busy machine, so not before every one)
    wait_for(lambda: min(a - b for a, b in zip(passes(), idle)) >= 10, 5,
             message=f"too few warming passes: {idle} -> {passes()}")
    after = passes()
    assert max(a - b for a, b in zip(after, idle)) <= 40 * len(TRAIN)  # at most one train per packet
    wait_for(settled, 15, interval=0, message=f"warming did not stop after traffic stopped: {passes()}")
    server = tunnel_stack.server_status()["tunnels"][0]
    assert server["dtls_dropped"] == 0 and server["paths"][0]["dtls_dropped"] == 0  # forged records stay local
    assert tunnel_stack.client_host.ping(SERVER_INNER)
