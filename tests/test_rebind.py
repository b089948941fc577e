"""Sans-IO tests of NAT rebinding and long outages (issue #8 part 5), on the in-memory lab of tests/corelab.py.

A NAT rebinding is modelled as it looks on the wire: the client's socket for a
path keeps sending, but the server sees it from a new (ip, port), and the
server's datagrams to the old address go nowhere.
"""

from __future__ import annotations

from pathlib import Path

from tests.corelab import (
    CLIENT_IP, DEAD, FIRST_CLIENT, STEP, TIMEOUT, Net, down_pkt, one_path, two_paths, up_pkt,
)
from tunnel.core import events
from tunnel.wire import frames
from tunnel.core.client import C_UP, REBIND_AFTER, SILENT_ATTEMPT, SILENT_BACKOFF
from tunnel.core.path import P_DOWN, P_UP

NAT_PORTS = iter(range(60000, 61000))


def nat_rebind(net: Net, c, key) -> tuple:
    """The NAT in front of path ``key`` forgets its mapping: the same socket shows up from a new port."""
    old = c.addrs[key]
    new = (CLIENT_IP, next(NAT_PORTS))
    c.addrs[key] = new
    net.owner[new] = (c, key)
    del net.owner[old]  # replies to the old mapping are lost
    return new


def joined_up(c, key) -> bool:
    slot = c.core.slots[key]
    return slot.joined and slot.path is not None and slot.path.state == P_UP


def test_nat_rebinding_recovers_the_path_without_a_new_tunnel(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    tid, t = c.core.tunnel_id, net.tunnel()
    net.advance(0.5)
    old_path = c.path("a")
    stale = nat_rebind(net, c, "a")
    t0 = net.now
    # duplicate mode: while "a" is silent, every packet still goes out on "b" and arrives
    delivered_before = t.dedup.delivered
    sent = 0

    def traffic():
        nonlocal sent
        sent += 1
        c.send_up(up_pkt(sent))

    t_up = net.run_until(lambda: c.path("a") is not old_path and joined_up(c, "a"), 2.0, each=traffic)
    # down after the dead interval, the spare REBIND_AFTER later; its handshake and JOIN take no time here
    assert t_up - t0 <= DEAD + REBIND_AFTER + 0.1 + STEP
    assert t.dedup.delivered - delivered_before == sent  # nothing lost meanwhile
    # the same tunnel: no new HELLO, no TunnelDown/TunnelUp, same id and address
    assert c.core.tunnel_id == tid and net.tunnel() is t and c.core.state == C_UP
    assert len(c.evs(events.TunnelUp)) == 1 and not c.evs(events.TunnelDown)
    assert not net.sev(events.ClientGone) and len(net.sev(events.ClientConnected)) == 1
    assert c.evs(events.Rebound) == [events.Rebound("a")]
    # the server holds exactly the live paths: the new mapping of "a" and "b", not the stale one
    assert sorted(p.addr for p in t.paths) == sorted([c.addr("a"), c.addr("b")])
    assert stale not in net.server.paths and c.addr("a") != stale
    assert net.server.counters["paths_replaced"] == 1
    assert c.core.stats()["rebinds"] == 1 and c.core.stats()["rebind_attempts"] == 1
    # and it carries traffic both ways again
    assert sorted(c.send_up(up_pkt(999))) == ["a", "b"]
    assert sorted(net.send_down(down_pkt())) == ["a", "b"]


def test_nat_rebinding_single_path_recovers_traffic(pki: Path) -> None:
    net, c = one_path(pki)
    t = net.tunnel()
    net.advance(0.5)
    nat_rebind(net, c, "a")
    t0 = net.now
    got_at: list[float] = []
    n = 0

    def traffic():  # a packet every step, both ways; note when they arrive again
        nonlocal n
        n += 1
        c.send_up(up_pkt(n))
        net.server.send_packet(down_pkt(n), net.now)

    def flowing() -> bool:
        if c.core.to_tun:
            got_at.append(net.now)
        c.core.to_tun.clear()
        return bool(got_at) and t.dedup.delivered >= 1 and got_at[-1] > t0 + DEAD

    delivered = t.dedup.delivered
    t_back = net.run_until(flowing, 2.0, each=traffic)
    assert t_back - t0 <= DEAD + REBIND_AFTER + 0.1 + STEP
    assert t.dedup.delivered > delivered
    # the tunnel never went down on the client (the silent session stays joined until the spare replaces it)
    assert not c.evs(events.TunnelDown) and c.core.state == C_UP
    assert [p.addr for p in t.paths] == [c.addr("a")]
    assert len(net.sev(events.ClientConnected)) == 1


def test_short_outage_keeps_the_old_session_and_drops_the_spare(pki: Path, plain) -> None:
    """The link comes back while the spare's ClientHello is unanswered: the old session stays."""
    net, c = two_paths(pki)
    net.advance(0.5)
    old = c.path("b")
    net.cut("b")
    net.run_until(lambda: c.core.slots["b"].spare is not None, 1.0)
    net.mend("b")
    net.run_until(lambda: old.state == P_UP and c.core.slots["b"].spare is None, 2.0)
    assert c.path("b") is old and c.core.stats()["rebinds"] == 0
    net.advance(1.0)
    assert len(net.tunnel().paths) == 2 and net.server.counters["paths_replaced"] == 0


def test_outage_rate_of_attempts_is_bounded_and_not_rate_limited(pki: Path) -> None:
    """All paths dead for 10 s: spares, then reconnects, at most one ClientHello per 1.25 s per path;
    when the link is back the path is up within one attempt period, and the server's handshake
    rate limit never bit."""
    net, c = two_paths(pki)
    net.server.linger = 60.0
    tid = c.core.tunnel_id
    net.advance(0.5)
    for k in "ab":
        net.cut(k)
    n_before = {k: len([e for e in c.evs(events.Connecting) if getattr(e.key, "base", e.key) == k]) for k in "ab"}
    net.advance(10.0)
    for k in "ab":
        attempts = len([e for e in c.evs(events.Connecting) if getattr(e.key, "base", e.key) == k]) - n_before[k]
        assert 4 <= attempts <= 10 / (SILENT_ATTEMPT + SILENT_BACKOFF) + 2, attempts
    for k in "ab":
        net.mend(k)
    t0 = net.now
    t_up = net.run_until(lambda: c.joined() == ["a", "b"] and c.core.state == C_UP, 5.0)
    assert t_up - t0 <= SILENT_ATTEMPT + SILENT_BACKOFF + 0.1
    assert net.server.counters["handshakes_rate_limited"] == 0
    # the server kept the tunnel (linger 60 s): the client JOINed it, same id and address
    assert c.core.tunnel_id == tid and c.core.config.addresses == [FIRST_CLIENT]
    assert len(net.sev(events.ClientConnected)) == 1


def test_outage_longer_than_linger_resumes_with_a_new_tunnel_and_the_same_address(pki: Path) -> None:
    net, c = one_path(pki)  # the lab's server lingers 5 s
    tid = c.core.tunnel_id
    net.advance(0.5)
    net.cut("a")
    net.advance(30.0)
    assert net.server.tunnels == {}  # forgotten after timeout + linger
    net.mend("a")
    t0 = net.now
    t_up = net.run_until(lambda: c.core.state == C_UP and c.core.tunnel_id != tid, 5.0)
    assert t_up - t0 <= SILENT_ATTEMPT + SILENT_BACKOFF + 0.2
    assert c.core.config.addresses == [FIRST_CLIENT]
    assert c.send_up(up_pkt()) == ["a"]


def test_rebinding_path_does_not_count_against_max_paths(pki: Path) -> None:
    net, c = two_paths(pki)
    net.server.max_paths = 2
    net.advance(0.5)
    nat_rebind(net, c, "b")
    net.run_until(lambda: c.core.stats()["rebinds"] == 1 and joined_up(c, "b"), 2.0)
    assert net.server.counters["paths_refused"] == 0
    assert len(net.tunnel().paths) == 2


def test_server_replaces_only_stale_paths_on_join(pki: Path) -> None:
    """A third path joining a healthy tunnel replaces nothing; one that joins while a path is down
    replaces that one."""
    net, c = two_paths(pki)
    net.advance(0.5)
    c.add("c", priority=2)
    net.run_until(lambda: c.joined() == ["a", "b", "c"], 2.0)
    assert len(net.tunnel().paths) == 3 and net.server.counters["paths_replaced"] == 0
    net.cut("c")
    net.run_until(lambda: net.spath(c, "c").state == P_DOWN, 1.0)
    c.add("d", priority=3)
    net.run_until(lambda: "d" in c.joined(), 2.0)
    assert net.server.counters["paths_replaced"] == 1
    assert sorted(p.addr for p in net.tunnel().paths) == sorted(c.addr(k) for k in "abd")


def test_datagrams_read_from_the_spare_socket_after_promotion_reach_the_path(pki: Path) -> None:
    """The shell drains a socket under the key it was opened with: datagrams that follow the
    promoting CONFIG in the same drain still come in under the spare's key."""
    net, c = one_path(pki)
    net.advance(0.5)
    nat_rebind(net, c, "a")
    net.run_until(lambda: c.core.stats()["rebinds"] == 1, 2.0)
    c.core.to_tun.clear()
    net.server.send_packet(down_pkt(7), net.now)
    ((addr, dgram, _tos),) = net.server.datagrams_to_send()
    assert addr == c.addr("a")
    c.core.receive_datagram(events.SpareKey("a"), dgram, net.now)
    assert c.core.to_tun == [down_pkt(7)]


def test_server_restart_one_unknown_tunnel_restarts_every_silent_path(pki: Path) -> None:
    """The first spare to hear CLOSE_UNKNOWN_TUNNEL restarts the other silent paths too: their
    sessions belong to the server that is gone, so none waits for its own timeout."""
    net, c = two_paths(pki)
    net.advance(0.5)
    net.delay["b"] = 0.05  # b's spare is slower than a's
    tid = c.core.tunnel_id
    net.restart_server()
    t0 = net.now
    t_up = net.run_until(lambda: c.joined() == ["a", "b"] and c.core.state == C_UP and c.core.tunnel_id != tid, TIMEOUT)
    assert t_up - t0 < TIMEOUT  # b did not wait for its timeout
    for key in "ab":
        assert [e.reason for e in c.evs(events.PathDown) if e.addr == key] == ["the server no longer knows the tunnel"]
    assert len(net.tunnel().paths) == 2


def test_spare_that_lost_the_race_is_closed_on_the_server(pki: Path, plain) -> None:
    """The spare is established on the server (its JOIN unanswered) when the old session answers
    again: the client keeps the old one and ends the spare with CLOSE_PATH, so the server does
    not keep a session nobody uses."""
    net, c = two_paths(pki)
    net.advance(0.5)
    old, old_addr = c.path("b"), c.addr("b")
    blocked = {"join": True}
    # the old session hears nothing (the server's datagrams to it are lost); the spare's handshake
    # gets through, but its JOIN (a HELLO naming the tunnel) is lost on the way up
    del net.owner[old_addr]
    net.drop = lambda direction, link, d: blocked["join"] and direction == "up" and any(
        isinstance(f, frames.Hello) and f.tunnel_id != frames.NEW_TUNNEL for f in plain.peek(True, d))
    net.run_until(lambda: (s := c.core.slots["b"].spare) is not None and s.established, 1.0)
    spare_addr = c.addrs[events.SpareKey("b")]
    assert spare_addr in net.server.paths  # the server holds the spare's session
    net.owner[old_addr] = (c, "b")
    net.run_until(lambda: c.core.slots["b"].spare is None, 1.0)  # at the old session's first PONG
    blocked["join"] = False
    net.pump()
    net.run_until(lambda: old.state == P_UP, 1.0)
    assert c.path("b") is old and c.core.stats()["rebinds"] == 0
    assert spare_addr not in net.server.paths  # closed by the client's CLOSE_PATH
    assert sorted(p.addr for p in net.tunnel().paths) == sorted([c.addr("a"), c.addr("b")])


def test_a_path_that_still_delivers_data_keeps_its_session_without_pongs(pki: Path) -> None:
    """Lost PONGs make a path look down, but DATA still arriving proves the mapping works:
    no spare session (a handshake and a path replacement per dead interval on a lossy link)."""
    net, c = one_path(pki)
    big = down_pkt(0) + bytes(300)
    pong_size = 100  # every server datagram but DATA is shorter than this on an established path
    net.drop = lambda direction, link, data: direction == "down" and len(data) < pong_size
    before = len(c.evs(events.Connecting))
    path = c.path("a")
    states = set()

    def traffic():
        net.server.send_packet(big, net.now)
        states.add(path.state)

    net.advance(3 * (DEAD + REBIND_AFTER), each=traffic)
    assert P_DOWN in states  # no PONG: judged down, as before
    assert c.path("a") is path and c.core.slots["a"].spare is None
    assert len(c.evs(events.Connecting)) == before and c.core.stats()["rebind_attempts"] == 0
    assert len(c.core.to_tun) >= 3 * (DEAD + REBIND_AFTER) / STEP - 2  # DATA kept arriving all along
