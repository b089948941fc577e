"""keep_warm: dummy passes over the packet path leave no trace, and run only while packets flow."""

from __future__ import annotations

import time

import pytest

from test_cores import down_pkt, one_path, pki, up_pkt  # noqa: F401 (pki is a fixture)
from tunnel import dtls
from tunnel.lab.netns import wait_for
from tunnel.lab.stack import SERVER_INNER
from tunnel.shell import WARM_WINDOW


def _visible(net, c) -> tuple:
    """Everything a warming pass must not change."""
    path, spath, tunnel = c.path("a"), net.spath(c, "a"), net.tunnel()
    return (
        path.tx_records, path.rx_records, path.dtls.records_dropped,
        spath.tx_records, spath.rx_records, spath.dtls.records_dropped,
        c.core._dedup.highest, c.core._dedup.delivered, tunnel.dedup.highest, tunnel.dedup.delivered,
        tunnel.seq, c.core._seq, len(c.core.outbox), len(net.server.outbox), len(c.core.to_tun), len(net.server.to_tun),
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


@pytest.mark.parametrize("keep_warm", [True, False])
def test_keep_warm_runs_while_packets_flow_and_stops_when_they_stop(tunnel_stack, keep_warm):
    tunnel_stack.server_overrides["keep_warm"] = keep_warm
    tunnel_stack.client_overrides["keep_warm"] = keep_warm
    tunnel_stack.start()

    def passes() -> tuple[int, int]:
        return tunnel_stack.client_status()["io"]["warm_passes"], tunnel_stack.server_status()["io"]["warm_passes"]

    def settled() -> bool:  # the same counts twice, WARM_WINDOW apart: no timer is running
        first = passes()
        time.sleep(WARM_WINDOW + 0.1)  # a measurement interval, not a wait for something
        return passes() == first

    # kernel chatter on a fresh TUN (e.g. IPv6 MLD) is traffic too; keepalive probes are not
    wait_for(settled, 15, interval=0, message=f"warming never stopped on an idle tunnel: {passes()}")
    before = passes()
    assert tunnel_stack.client_host.echo_count(SERVER_INNER, 20, interval=0.05) == 20
    if not keep_warm:
        assert passes() == (0, 0)
        return
    # pings 50 ms apart leave ~49 idle milliseconds each: both ends warm in between
    wait_for(lambda: min(a - b for a, b in zip(passes(), before)) >= 100, 5,
             message=f"too few warming passes: {before} -> {passes()}")
    wait_for(settled, 15, interval=0, message=f"warming did not stop after traffic stopped: {passes()}")
    server = tunnel_stack.server_status()["tunnels"][0]
    assert server["dtls_dropped"] == 0 and server["paths"][0]["dtls_dropped"] == 0  # forged records stay local
    assert tunnel_stack.client_host.ping(SERVER_INNER)
