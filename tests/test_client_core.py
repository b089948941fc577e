"""Tests of the client core (tunnel/core/client.py): the client state machine, HELLO and JOIN,
lost control frames, reconnecting with back-off, spare sessions and rebinding, link events,
removing paths and closing, and the client's timers.

On the in-memory lab of tests/corelab.py (ClientCores and a ServerCore wired together,
manual clock, per-path drops and delays).  Every lab test here runs in both clock modes
(the autouse ``drive`` fixture, imported from corelab): the timers run at every step, or
only when the cores' deadlines say.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corelab import drive  # noqa: F401  (autouse here: every test runs in both clock modes)
from tests.corelab import (
    DEAD, FIRST_CLIENT, INNER_MTU, PROBE, ROUTES, STEP, TIMEOUT, Net, client_core, client_snapshot, down_pkt,
    frames_seen, handshake_only, ipv4, one_path, two_paths, up_pkt,
)
from tunnel.core import events
from tunnel.wire import frames
from tunnel.core.client import (
    BACKOFF_MIN, BACKOFF_REFUSED, C_CLOSED, C_CONNECTING, C_UP, REBIND_AFTER, SILENT_ATTEMPT, SILENT_BACKOFF,
)
from tunnel.core.path import P_DOWN, P_UP
from tunnel.core.settings import HANDSHAKE_TIMEOUT


# -- coming up: HELLO, CONFIG, JOIN -----------------------------------------------------------------
def test_tunnel_comes_up(pki: Path, plain) -> None:
    net, c = one_path(pki)
    kinds = [type(e) for _, e in c.events]
    assert kinds == [events.Connecting, events.PathUp, events.TunnelUp, events.PathJoined]
    connecting, path_up, tunnel_up, joined = (e for _, e in c.events)
    assert connecting == events.Connecting("a", 1)
    assert path_up.addr == "a" and path_up.peer == "srv" and path_up.cipher.startswith("ECDHE-")
    assert joined == events.PathJoined("a", "a")
    cfg = tunnel_up.config
    assert cfg.addresses == [FIRST_CLIENT]
    assert cfg.mtu == INNER_MTU == 1422
    assert (cfg.keepalive_ms, cfg.timeout_ms) == (125, 2000)  # the server's probe interval and timeout
    assert cfg.routes == ROUTES
    assert cfg.tunnel_id == (1).to_bytes(16, "big") == c.core.tunnel_id
    st = c.core.stats()
    assert st["state"] == "up" and st["mode"] == "duplicate" and st["address"] == "100.64.0.2/24"
    assert [(p["name"], p["state"], p["joined"]) for p in st["paths"]] == [("a", "up", True)]

    assert [type(e) for _, e in net.sevents] == [events.PathUp, events.ClientConnected]
    assert net.sev(events.PathUp)[0].peer == "alice"
    assert net.sev(events.ClientConnected) == [events.ClientConnected("alice", "100.64.0.2/24", c.addr("a"), False)]
    assert net.server.counters["cookies_sent"] == 1
    t = net.tunnel()
    assert t.name == "alice" and t.address == FIRST_CLIENT and [p.addr for p in t.paths] == [c.addr("a")]
    assert t.scheduler.mode == "duplicate" and t.stats()["mode"] == "duplicate"
    assert net.server.route_table.lookup(FIRST_CLIENT.ip.packed) is t
    # on the wire: HELLO(v1, new tunnel, duplicate, k=2, priority 0) up, CONFIG down
    assert frames_seen(plain, "server", frames.Hello) == [frames.Hello(1, frames.NEW_TUNNEL, 1, 2, 0)]
    assert frames_seen(plain, "client", frames.Config) == [cfg]


def test_hello_mode_numbers(pki: Path) -> None:
    from tunnel.core.scheduler import MODES

    for i, mode in enumerate(MODES, start=1):
        assert client_core(None, mode=mode).hello_mode == i
    with pytest.raises(ValueError):
        client_core(None, mode="fastest")


def test_two_paths_one_tunnel(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    tid = c.core.tunnel_id
    # one path created the tunnel, the other JOINed it
    hellos = frames_seen(plain, "server", frames.Hello)
    assert sorted(hellos, key=lambda h: h.priority) == [
        frames.Hello(1, frames.NEW_TUNNEL, 1, 2, 0),
        frames.Hello(1, tid, 1, 2, 1),
    ]
    assert len(net.server.tunnels) == 1
    t = net.tunnel()
    assert sorted(p.addr for p in t.paths) == sorted([c.addr("a"), c.addr("b")])
    assert sorted(p.priority for p in t.paths) == [0, 1]
    assert len(net.sev(events.ClientConnected)) == 1
    (sj,) = net.sev(events.PathJoined)
    assert sj == events.PathJoined(c.addr("b"), "alice")
    # client: one TunnelUp, both paths joined, the CONFIG of both paths is the same
    assert len(c.evs(events.TunnelUp)) == 1
    assert sorted(e.key for e in c.evs(events.PathJoined)) == ["a", "b"]
    configs = frames_seen(plain, "client", frames.Config)
    assert len(configs) == 2 and configs[0] == configs[1] == c.core.config
    assert [p["joined"] for p in c.core.stats()["paths"]] == [True, True]
    assert len(t.stats()["paths"]) == 2


def test_only_one_path_creates_the_tunnel(pki: Path, plain) -> None:
    """Both handshakes finish before any CONFIG: the second path waits and then JOINs."""
    net = Net(pki)
    c = net.client()
    c.add("a", pump=False)
    c.add("b", pump=False)
    net.pump()
    assert all(c.path(k).established for k in "ab")
    assert c.joined() == ["a", "b"]
    assert [h.tunnel_id for h in frames_seen(plain, "server", frames.Hello)] == [frames.NEW_TUNNEL, c.core.tunnel_id]
    assert len(net.server.tunnels) == 1


def test_path_added_later_joins_at_once(pki: Path, plain) -> None:
    net, c = one_path(pki)
    net.advance(0.5)
    c.add("c", priority=3)
    assert c.joined() == ["a", "c"]
    assert frames_seen(plain, "server", frames.Hello)[-1] == frames.Hello(1, c.core.tunnel_id, 1, 2, 3)
    assert len(c.evs(events.TunnelUp)) == 1 and c.evs(events.PathJoined)[-1] == events.PathJoined("c", "c")
    assert len(net.tunnel().paths) == 2


def test_packets_while_down_are_counted(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    assert c.send_up(up_pkt()) == []
    assert c.core.counters["dropped_no_path"] == 1 and c.core.stats()["dropped_no_path"] == 1
    c.add("a", pump=False)  # handshaking: still no path carries the tunnel
    assert c.send_up(up_pkt()) == [] and c.core.counters["dropped_no_path"] == 2
    assert net.send_down(down_pkt()) == []
    assert net.server.counters["no_route"] == 1


# -- lost or early control frames -------------------------------------------------------------------
HELLO_DGRAM = 13 + 8 + 21 + 16  # DTLS header, explicit nonce, HELLO, AES-GCM tag


CONFIG_DGRAM = 13 + 8 + 37 + 16  # the same around this lab's 37-byte CONFIG


@pytest.mark.parametrize("lost", ["HELLO of the creating path", "CONFIG of the joining path"])
def test_one_lost_hello_or_config_is_repaired(pki: Path, lost: str) -> None:
    net = Net(pki)
    c = net.client()
    dropped: list = []

    def drop(direction: str, key, d: bytes) -> bool:
        if dropped:
            return False
        if lost.startswith("HELLO") and (direction, len(d)) == ("up", HELLO_DGRAM):
            dropped.append(d)
        elif lost.startswith("CONFIG") and (direction, key, len(d)) == ("down", "b", CONFIG_DGRAM):
            dropped.append(d)
        return bool(dropped)

    net.drop = drop
    c.add("a", pump=False)
    c.add("b", pump=False)
    net.advance(5.0)
    assert len(dropped) == 1
    assert all(c.path(k).state == P_UP for k in "ab")  # both sessions fine all along
    assert c.joined() == ["a", "b"]


def test_data_before_config_ignored_by_client(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    hello = handshake_only(net, c)
    s, core = net.server, c.core
    for d in hello:
        s.receive_datagram(c.addr("a"), d, net.now)
    config = s.datagrams_to_send()  # held back
    spath = s.paths[c.addr("a")]
    early = ipv4("100.64.0.1", "100.64.0.2", b"early")
    core.receive_datagram("a", spath.encrypt(frames.encode_data(1, early), net.now), net.now)
    core.receive_datagram("a", spath.encrypt(frames.encode(frames.Hello()), net.now), net.now)
    assert core.to_tun == [] and core.state == C_CONNECTING and core.counters["malformed"] == 2
    for _, d, _ in config:
        core.receive_datagram("a", d, net.now)
    assert core.state == C_UP
    late = ipv4("100.64.0.1", "100.64.0.2", b"late")
    s.send_packet(late, net.now)
    for _, d, _ in s.datagrams_to_send():
        core.receive_datagram("a", d, net.now)
    assert core.to_tun == [late]


@pytest.mark.parametrize("second", ["CLOSE", "CONFIG"])
def test_records_after_a_close_in_the_same_datagram_are_ignored(pki: Path, second: str) -> None:
    net, c = one_path(pki)
    sp = net.spath(c, "a")
    rec = frames.encode(frames.Close(0, "again")) if second == "CLOSE" else frames.encode(c.core.config)
    # a datagram may hold several DTLS records; the server only ever sends one, but nothing a
    # peer sends may raise out of the core
    d = sp.encrypt(frames.encode(frames.Close(0, "bye")), net.now) + sp.encrypt(rec, net.now)
    c.core.receive_datagram("a", d, net.now)
    assert c.core.slots["a"].path is None and c.core.state == C_CONNECTING
    assert c.core.scheduler.select(up_pkt(), 0.0) == []


# -- reconnecting: back-off, spares, a server that forgot the tunnel --------------------------------
def test_backoff_grows_while_server_is_unreachable(pki: Path) -> None:
    net = Net(pki)
    c = net.client()
    net.cut("a")
    c.add("a")
    t0 = net.now
    net.advance(3 * HANDSHAKE_TIMEOUT + 2)
    conns = [(t, e) for t, e in c.events if isinstance(e, events.Connecting)]
    assert [e.attempt for _, e in conns] == [1, 2, 3, 4]
    times = [t - t0 for t, _ in conns]
    # each attempt: handshake timeout, then 0.25, 0.5, 1 s of backoff
    assert times == [0, HANDSHAKE_TIMEOUT + 0.25, 2 * HANDSHAKE_TIMEOUT + 0.75, 3 * HANDSHAKE_TIMEOUT + 1.75]
    downs = c.evs(events.PathDown)
    assert len(downs) == 3 and all(d.reason == "handshake timed out" for d in downs)
    assert not c.evs(events.TunnelDown)  # it never was up
    assert net.server.paths == {} and net.server.counters["cookies_sent"] == 0
    # the server comes back: the next attempt succeeds and the backoff is reset
    net.mend("a")
    net.run_until(lambda: c.core.state == C_UP, HANDSHAKE_TIMEOUT + 2.5)
    assert c.core.slots["a"].backoff == BACKOFF_MIN


def test_backoff_is_per_path(pki: Path) -> None:
    net, c = one_path(pki)
    net.cut("b")
    c.add("b")
    net.advance(2 * HANDSHAKE_TIMEOUT + 1)
    assert [e.attempt for e in c.evs(events.Connecting) if e.key == "b"] == [1, 2, 3]
    assert c.core.slots["a"].attempts == 1 and c.core.slots["a"].backoff == BACKOFF_MIN
    assert c.core.state == C_UP and c.joined() == ["a"]


def test_a_server_restart_during_a_long_outage_still_recovers_with_a_new_handshake(pki: Path) -> None:
    """The kept session is useless when the server lost it: the spare sessions that keep trying
    during the outage find the new server, hear that the tunnel is unknown and start a new one."""
    net, c = one_path(pki)
    tid = c.core.tunnel_id
    net.cut("a")
    net.advance(3 * TIMEOUT)
    assert c.core.state == C_UP and c.path("a").state == P_DOWN  # still holding the old session
    net.restart_server()
    net.mend("a")
    t0 = net.now
    t_up = net.run_until(lambda: c.core.state == C_UP and c.core.tunnel_id not in (tid, frames.NEW_TUNNEL), 3.0)
    assert t_up - t0 <= SILENT_ATTEMPT + SILENT_BACKOFF + 0.1  # the next spare attempt
    assert c.evs(events.TunnelDown) == [events.TunnelDown("the server no longer knows the tunnel")]
    assert c.core.config.addresses == [FIRST_CLIENT]
    assert c.send_up(up_pkt()) == ["a"] and net.send_down(down_pkt()) == ["a"]


def test_a_link_event_retries_at_once(pki: Path) -> None:
    """A link or address event (the shell's netlink watcher) makes a silent path try again now:
    a spare attempt that has heard nothing is restarted instead of running out its second."""
    net, c = one_path(pki)
    tid = c.core.tunnel_id
    net.cut("a")
    slot = c.core.slots["a"]
    net.advance(2.0)
    net.run_until(lambda: slot.spare is not None and net.now - slot.spare.created >= 2 * SILENT_BACKOFF, 2.0)
    net.restart_server()  # the kept session is lost: only a new handshake helps
    net.mend("a")
    t0 = net.now
    c.core.link_changed(t0)
    c.drain()
    net.pump()
    assert c.times(events.Connecting, lambda e: e.key == events.SpareKey("a"))[-1] == t0
    t_up = net.run_until(lambda: c.core.state == C_UP and c.core.tunnel_id not in (tid, frames.NEW_TUNNEL), 2.0)
    assert t_up - t0 <= 2 * STEP  # without the event: the unheard spare's second, then SILENT_BACKOFF
    # a refusal's wait is not cut short by a link event
    slot.retry_at, slot.refused = net.now + BACKOFF_REFUSED, True
    c.core.link_changed(net.now)
    assert slot.retry_at == net.now + BACKOFF_REFUSED


def test_join_of_an_unknown_tunnel_starts_a_new_tunnel(pki: Path, plain) -> None:
    net = Net(pki)
    c = net.client()
    bogus = bytes([0x99]) * 16
    c.core.tunnel_id = bogus  # a tunnel id the server never gave out
    c.add("a")
    closes = frames_seen(plain, "client", frames.Close)
    assert [(f.code, f.reason) for f in closes] == [(frames.CLOSE_UNKNOWN_TUNNEL, "unknown tunnel")]
    assert c.core.tunnel_id == frames.NEW_TUNNEL  # forgotten
    assert c.evs(events.PathDown) == [events.PathDown("a", "server closed the path: unknown tunnel")]
    assert net.sev(events.Refused) == [events.Refused(c.addr("a"), "unknown tunnel")]
    t_close = net.now
    t_up = net.run_until(lambda: c.core.state == C_UP, 1.0)
    assert t_up == t_close + STEP  # no backoff: the next timer tick
    assert c.evs(events.Connecting)[-1] == events.Connecting("a", 2)
    assert [h.tunnel_id for h in frames_seen(plain, "server", frames.Hello)] == [bogus, frames.NEW_TUNNEL]
    assert c.core.tunnel_id == net.tunnel().id != bogus
    assert len(c.evs(events.TunnelUp)) == 1


def test_server_restart_client_recovers_with_a_new_tunnel(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    old_tid = c.core.tunnel_id
    for i in range(3):
        c.send_up(up_pkt(i))
    net.advance(0.5)
    fresh = net.restart_server()
    t_restart = net.now
    n_old = len(net.sevents)
    assert c.send_up(up_pkt(3)) == ["a", "b"]
    net.pump()
    assert fresh.counters["junk"] == 2 and fresh.paths == {}  # old-session records from nobody
    t_back = net.run_until(
        lambda: c.core.state == C_UP and c.core.tunnel_id not in (old_tid, frames.NEW_TUNNEL)
        and c.joined() == ["a", "b"],
        TIMEOUT + 2.0,
    )
    assert c.evs(events.TunnelDown)
    # the paths came back, JOINed the tunnel the server had forgotten, and were told so
    unknown = [e for e in net.sev(events.Refused) if e.reason == "unknown tunnel"]
    assert unknown
    assert all(f.code == frames.CLOSE_UNKNOWN_TUNNEL for f in frames_seen(plain, "client", frames.Close))
    assert len(c.evs(events.TunnelUp)) == 2
    t = net.tunnel()
    assert t.id == c.core.tunnel_id and sorted(p.addr for p in t.paths) == sorted(c.addr(k) for k in "ab")
    assert c.core.config.addresses == [FIRST_CLIENT]
    assert [e.replaced for _, e in net.sevents[n_old:] if isinstance(e, events.ClientConnected)] == [False]
    for key in "ab":
        # down after the dead interval; REBIND_AFTER later a spare session from a new socket JOINs,
        # hears that the tunnel is unknown, and the path starts over at once (no wait for the timeout)
        assert [e.reason for e in c.evs(events.PathDown) if e.addr == key] == ["the server no longer knows the tunnel"]
        assert [e.attempt for e in c.evs(events.Connecting) if e.key == key] == [1, 2]
        assert [e.attempt for e in c.evs(events.Connecting) if e.key == events.SpareKey(key)] == [1]
    assert t_back - t_restart < DEAD + REBIND_AFTER + 0.1
    t_refused = net.stimes(events.Refused)[0]
    assert c.times(events.Connecting)[-1] == t_refused + STEP  # the new tunnel at once
    # a new tunnel, a new sequence space: the next DATA is number 1 again, delivered once
    up = up_pkt(7)
    c.send_up(up)
    net.pump()
    assert fresh.to_tun == [up] and t.dedup.duplicates == 1
    assert [f.seq for f in frames_seen(plain, "server", frames.Data, t.paths[0].addr)] == [1]
    assert sorted(net.send_down(down_pkt())) == ["a", "b"]


def test_forgotten_tunnel_is_reported_down(pki: Path) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    net.restart_server()
    # before the old sessions time out, an interface change brings a new path: its JOIN is refused
    c.remove("a")
    c.add("a2")
    assert c.evs(events.PathDown)[-1] == events.PathDown("a2", "server closed the path: unknown tunnel")
    assert c.joined() == [] and c.core.tunnel_id == frames.NEW_TUNNEL
    assert c.core.state == C_CONNECTING
    assert c.evs(events.TunnelDown)


# -- removing paths, closing ------------------------------------------------------------------------
def test_remove_path_closes_it_and_the_server_drops_just_that_path(pki: Path, plain) -> None:
    net, c = two_paths(pki)
    c.remove("b")
    assert frames_seen(plain, "server", frames.Close, c.addr("b")) == [frames.Close(frames.CLOSE_PATH, "interface gone")]
    assert net.sev(events.PathDown) == [events.PathDown(c.addr("b"), "client closed: interface gone")]
    t = net.tunnel()
    assert [p.addr for p in t.paths] == [c.addr("a")] and t.idle_since is None
    assert not net.sev(events.ClientGone)
    assert c.evs(events.PathDown) == [events.PathDown("b", "interface gone")]
    assert not c.evs(events.TunnelDown) and c.core.state == C_UP and list(c.core.slots) == ["a"]
    assert c.send_up(up_pkt()) == ["a"] and net.send_down(down_pkt()) == ["a"]
    net.advance(2.0)
    assert [e.key for e in c.evs(events.Connecting)] == ["a", "b"]  # a removed path is not retried
    c.remove("nonexistent")  # harmless


def test_client_close(pki: Path, plain) -> None:
    """A client that shuts down (CLOSE_NORMAL) ends its tunnel at once: no lingering."""
    net, c = two_paths(pki)
    c.core.close(net.now)
    net.pump()
    closes = frames_seen(plain, "server", frames.Close)
    assert closes and all(f == frames.Close(frames.CLOSE_NORMAL, "client shutting down") for f in closes)
    assert net.server.paths == {} and net.server.tunnels == {} and len(net.server.route_table) == 0
    assert c.core.state == C_CLOSED
    (gone,) = net.sev(events.ClientGone)
    assert gone.name == "alice" and gone.reason == "client closed: client shutting down"
    net.advance(3)  # a closed client never reconnects
    assert len(c.evs(events.Connecting)) == 2
    c.add("c")
    assert "c" not in c.core.slots


# -- the client's timer: deadlines, not a fixed tick ------------------------------------------------
def test_idle_client_runs_its_timer_only_to_probe(pki: Path, drive) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    ests = [c.path(k).est for k in ("a", "b")]
    runs0, probes0 = c.timer_runs, sum(e.probes_sent for e in ests)
    net.advance(2.0)
    runs, probes = c.timer_runs - runs0, sum(e.probes_sent for e in ests) - probes0
    assert probes == 2 * round(2.0 / PROBE)  # both paths keep probing, in both modes
    if drive == "step":
        assert runs == round(2.0 / STEP)
    else:
        assert runs <= probes  # one timer per probe (the two paths' probes may share one)
        # no polling in the steady state: the timer is the earliest path deadline
        assert c.armed == min(c.path(k).service(net.now) for k in ("a", "b")) > net.now
    assert c.path("a").state == c.path("b").state == P_UP and c.core.state == C_UP


def test_the_client_timers_never_act_before_the_deadline_they_gave(pki: Path, drive) -> None:
    net, c = two_paths(pki)
    net.advance(0.5)
    c.invariant = client_snapshot(c)
    net.cut("b")  # through a path going down, a spare session, and back
    net.advance(1.5)
    net.mend("b")
    net.advance(1.5)
    c.remove("b")
    net.cut("a")  # the last path: the tunnel goes down and reconnects with back-off
    net.advance(TIMEOUT + 1.0)
    net.mend("a")
    net.advance(2.0)
    assert c.core.state == C_UP
    assert c.checked > 100 or drive == "step"


@pytest.mark.parametrize("lost", ["HELLO", "CONFIG"])
def test_the_client_timers_cover_hello_retries(pki: Path, lost: str, drive) -> None:
    net = Net(pki)
    c = net.client()
    c.invariant = client_snapshot(c)
    dropped: list = []

    def drop(direction: str, key, d: bytes) -> bool:
        if not dropped and (direction, len(d)) == (("up", HELLO_DGRAM) if lost == "HELLO" else ("down", CONFIG_DGRAM)):
            dropped.append(net.now)
            return True
        return False

    net.drop = drop
    c.add("a", pump=False)
    t_joined = net.run_until(lambda: c.joined() == ["a"], 3.0)
    assert len(dropped) == 1
    from tunnel.core.client import HELLO_RETRY

    assert dropped[0] + HELLO_RETRY <= t_joined < dropped[0] + HELLO_RETRY + 2 * STEP  # retried on time
    assert c.checked > 10 or drive == "step"
