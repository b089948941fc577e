"""The in-memory lab for the sans-IO cores: ClientCores and a ServerCore wired together in memory.

Shared by the core tests (test_client_core, test_server_core, test_engine, test_path,
test_rebind, test_ipv6, test_ecn, ...); the fixtures that go with it (``pki``, ``plain``)
are in conftest.py, except ``drive`` (below), which a module imports to run all its tests
in both clock modes.

A manual clock (``Net.now``) drives everything; datagrams move only when the
test pumps them.  The in-memory network knows every client path by its key: it
can drop the datagrams of a path (per direction), delay them, or filter them,
so loss, outages and RTT differences are explicit.

Times are multiples of STEP = 1/64 s and the path intervals are binary
fractions too, so "down after exactly dead_interval" is an exact comparison.
"""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path
from typing import Callable, Optional

import pytest

from tunnel.core import events

from tunnel.wire import frames, mtu
from tunnel.core.client import C_UP, ClientCore
from tunnel.wire.dtls import ESTABLISHED, DtlsSession, make_context
from tunnel.core.path import TICK
from tunnel.core.pool import AddressPool
from tunnel.core.server import ServerCore
from tunnel.core.settings import ClientSettings, Limits, PathSettings, ServerSettings

from tests.wiretap import Tap

SERVER_ADDR = ("198.18.0.1", 4433)
CLIENT_IP = "198.18.0.2"
SERVER_INNER = ipaddress.IPv4Interface("100.64.0.1/24")
FIRST_CLIENT = ipaddress.IPv4Interface("100.64.0.2/24")
DGRAM_MTU = mtu.datagram_mtu(1500)
INNER_MTU = mtu.inner_mtu(1500)
ROUTES = [ipaddress.IPv4Network("10.9.0.0/16")]
PROBE, DEAD, TIMEOUT, LINGER = 0.125, 0.375, 2.0, 5.0
STEP = 1 / 64
T0 = 1000.0


def path_settings(probe_interval: float = PROBE, dead_interval: float = DEAD, timeout: float = TIMEOUT,
                  idle_probe_interval: Optional[float] = None) -> PathSettings:
    """The lab's path timing (binary fractions; no idle probing unless a test asks)."""
    return PathSettings(probe_interval, dead_interval, idle_probe_interval, timeout)


def client_settings(mode: str = "duplicate", redundancy: int = 2, pin_flows: bool = False,
                    window: int = 4096, **path) -> ClientSettings:
    return ClientSettings(mode, redundancy, pin_flows, window, path_settings(**path))


def server_settings(mode: str = "client", window: int = 4096, linger: float = LINGER,
                    allowed_clients=None, routes=ROUTES, client_routes=None, client_to_client: bool = False,
                    unknown_destination: str = "drop", limits: Optional[dict] = None, **path) -> ServerSettings:
    return ServerSettings(
        DGRAM_MTU, INNER_MTU, tuple(routes), mode, window, linger,
        None if allowed_clients is None else frozenset(allowed_clients), client_routes or {}, client_to_client,
        unknown_destination, path_settings(**path), Limits(**(limits or {})),
    )


LIMIT_KEYS = ("max_tunnels", "max_paths", "handshake_rate", "max_handshakes", "pending_queue", "pending_expiry")


def server_core(ctx, pool: Optional[AddressPool] = None, pool6=None, policy=None, revocation=None,
                random_bytes=None, **kw) -> ServerCore:
    """A ServerCore with the lab's settings; ``kw``: server_settings()'s, and the Limits fields."""
    limits = {k: kw.pop(k) for k in LIMIT_KEYS if k in kw}
    extra = {} if random_bytes is None else {"random_bytes": random_bytes}
    return ServerCore(ctx, server_settings(limits=limits, **kw), pool or AddressPool(SERVER_INNER), pool6, policy,
                      revocation, **extra)


def client_core(ctx, policy=None, **kw) -> ClientCore:
    """A ClientCore with the lab's settings; ``kw``: client_settings()'s."""
    return ClientCore(ctx, client_settings(**kw), policy)


def ipv4(src: str, dst: str, payload: bytes = b"payload", proto: int = 17) -> bytes:
    """A minimal IPv4 packet (checksum left zero: the cores do not check it)."""
    total = 20 + len(payload)
    header = bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(4) + bytes([64, proto, 0, 0])
    return header + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + payload


def up_pkt(i: int = 0, size: int = 0) -> bytes:
    return ipv4("100.64.0.2", "100.64.0.1", b"u%d" % i + bytes(size))


def down_pkt(i: int = 0, dst: str = "100.64.0.2", size: int = 0) -> bytes:
    return ipv4("100.64.0.1", dst, b"d%d" % i + bytes(size))


def flow_pkt(i: int, size: int = 1200, up: bool = True) -> bytes:
    """Packet ``i`` of one UDP flow (fixed ports: one reordering queue), ``size`` bytes of payload."""
    src, dst = ("100.64.0.2", "100.64.0.1") if up else ("100.64.0.1", "100.64.0.2")
    return ipv4(src, dst, b"\x13\x88\x13\x89" + b"%06d" % i + bytes(size))


# How the lab drives the clients' timers: "step" calls handle_timer at every step of the
# clock; "deadline" only when the deadline handle_timer() returned has come, or right after
# input that set timer_dirty -- as the shell does.  The core test modules (test_client_core, test_server_core,
# test_engine, test_path) run every test both ways (they import the autouse ``drive`` fixture
# below), so a deadline that handle_timer() returns too late shows up as a changed outcome or timing.
# Other modules run in "step" mode.
DRIVE = {"mode": "step"}


@pytest.fixture(autouse=True, params=["step", "deadline"])
def drive(request):
    """Run the test in both clock modes (DRIVE).  Autouse only in the modules that import it:
    defined here rather than in conftest.py, where it would double every test of the suite."""
    DRIVE["mode"] = request.param
    yield request.param
    DRIVE["mode"] = "step"

# The wire tap of the lab's Nets (tests/wiretap.py), when a test asked for one (the ``plain``
# fixture sets it): every Net then decrypts what it delivers into it.  Off, it costs nothing.
TAP: dict = {"tap": None}


# -- the in-memory lab --------------------------------------------------------------------
class Client:
    """One ClientCore on the lab network, with the current address of each of its paths."""

    def __init__(self, net: "Net", core: ClientCore):
        self.net, self.core = net, core
        self.addrs: dict = {}  # path key -> current (ip, port)
        self.events: list[tuple[float, object]] = []
        self.deadline = DRIVE["mode"] == "deadline"
        self.armed = float("-inf")  # deadline mode: when handle_timer runs next
        self.timer_runs = 0
        # deadline mode, when set: before the deadline, with no input since the timers last ran,
        # running them must change nothing this snapshot shows (the deadline is never late)
        self.invariant: Optional[Callable[[], object]] = None
        self.checked = 0

    # network side
    def outgoing(self) -> list:
        return [(key, self.addrs[key], d) for key, d, _tos in self.core.datagrams_to_send()]

    def deliver(self, key, data: bytes) -> None:
        self.core.receive_datagram(key, data, self.net.now)
        self.check_timer()

    def check_timer(self) -> None:
        """Deadline mode, after input (the shell's _check_timer)."""
        core = self.core
        if self.deadline and core.timer_dirty:  # the shell runs the timers once the wakeup is done
            core.timer_dirty = False
            self.armed = min(self.armed, self.net.now)

    def drain(self) -> None:
        self.check_timer()
        while (ev := self.core.next_event()) is not None:
            self.events.append((self.net.now, ev))
            if isinstance(ev, events.Connecting):
                self.net.assign(self, ev.key)  # like the shell: a fresh socket (source port) per attempt
            elif isinstance(ev, events.Rebound):  # like the shell: the spare's socket becomes the path's
                addr = self.addrs[ev.key] = self.addrs.pop(events.SpareKey(ev.key))
                self.net.owner[addr] = (self, ev.key)

    def tick(self) -> None:
        now, core = self.net.now, self.core
        if not self.deadline:
            core.handle_timer(now)
            self.timer_runs += 1
            return
        self.check_timer()
        if now >= self.armed:
            self.run_timer()
        elif self.invariant is not None:
            before = self.invariant()
            core.handle_timer(now)
            assert self.invariant() == before, f"the timers acted at {now}, before their deadline {self.armed}"
            self.checked += 1

    def run_timer(self) -> None:
        """Deadline mode: what the shell's _tick does (it runs the timers, which say when next)."""
        now = self.net.now
        when = self.core.handle_timer(now)
        self.timer_runs += 1
        self.armed = now + TICK if when <= now else when

    # test helpers
    def add(self, key, priority: int = 0, pump: bool = True) -> None:
        self.core.add_path(key, SERVER_ADDR, self.net.now, name=key, priority=priority, mtu=DGRAM_MTU)
        self.drain()
        if pump:
            self.net.pump()

    def remove(self, key) -> None:
        self.core.remove_path(key, self.net.now)
        self.net.pump()

    def addr(self, key) -> tuple:
        return self.addrs[key]

    def path(self, key):
        return self.core.slots[key].path

    def joined(self) -> list:
        return sorted(k for k, s in self.core.slots.items() if s.joined)

    def evs(self, cls) -> list:
        return [e for _, e in self.events if isinstance(e, cls)]

    def times(self, cls, pred: Callable = lambda e: True) -> list[float]:
        return [t for t, e in self.events if isinstance(e, cls) and pred(e)]

    def send_up(self, pkt: bytes) -> list:
        """Send one packet from the TUN; return the keys of the paths its DATA went out on."""
        before = len(self.core.outbox)
        self.core.send_packet(pkt, self.net.now)
        self.check_timer()
        return [k for k, _, _ in self.core.outbox[before:]]


class RawClient:
    """A bare DTLS session on the lab network, to send the server arbitrary frames."""

    def __init__(self, net: "Net", pki: Path, name: str = "alice", key: str = "raw", established: bool = True):
        self.net, self.key = net, key
        ctx = net.context("client", pki / f"{name}.crt", pki / f"{name}.key", pki / "ca.crt", "srv")
        self.dtls = DtlsSession.client(ctx, DGRAM_MTU, net.now)
        self.frames: list = []
        self.pending: list[bytes] = []
        self.addrs: dict = {}
        net.endpoints.append(self)
        self.addr = net.assign(self, key)
        for _ in range(10):
            net.pump()
            if self.dtls.state == ESTABLISHED:
                break
        assert self.dtls.state == ESTABLISHED or not established

    def outgoing(self) -> list:
        out = self.dtls.datagrams_to_send() + self.pending
        self.pending = []
        return [(self.key, self.addr, d) for d in out]

    def deliver(self, key, data: bytes) -> None:
        for rec in self.dtls.receive_datagram(data, self.net.now):
            self.frames.append(frames.parse(rec))

    def drain(self) -> None:
        pass

    def tick(self) -> None:
        pass

    def send(self, *records: bytes) -> list:
        before = len(self.frames)
        self.pending.extend(self.dtls.send(r) for r in records)
        self.net.pump()
        return self.frames[before:]


class Net:
    """A server, clients, a wire with per-path drops/delays and a manual clock."""

    def __init__(self, pki: Path, *, allowed: Optional[set] = None, static: Optional[dict] = None,
                 pool: Optional[AddressPool] = None, mode: str = "client", idle_probe: Optional[float] = None):
        self.pki = pki
        self.tap: Optional[Tap] = TAP["tap"]
        self.now = T0
        self._ids = itertools.count(1)  # tunnel ids 1, 2, ... (also across server restarts)
        self._server_args = dict(allowed=allowed, static=static, pool=pool, mode=mode, idle_probe=idle_probe)
        self.server = self.make_server()
        self.endpoints: list = []
        self.owner: dict = {}  # client address -> (endpoint, key)
        self._ports = itertools.count(40000)
        self.drop_up: set = set()  # path keys whose client -> server datagrams are lost
        self.drop_down: set = set()  # path keys whose server -> client datagrams are lost
        self.drop: Optional[Callable[[str, object, bytes], bool]] = None  # (direction, key, datagram) -> lose it?
        self.delay: dict = {}  # path key -> one-way delay (both directions)
        self.queue: list = []
        self._order = itertools.count()
        self.stray: list = []  # server datagrams to addresses no client socket has (any more)
        self.sevents: list[tuple[float, object]] = []
        self.server_armed = float("-inf")  # deadline mode: when the server's handle_timer runs next
        self.server_timer_runs = 0
        self.server_ran_at = float("-inf")
        self.server_invariant: Optional[Callable[[], object]] = None  # as Client.invariant
        self.server_checked = 0

    def check_server_timer(self) -> None:
        """Deadline mode, after input (the shell's _check_timer)."""
        if DRIVE["mode"] == "deadline" and self.server.timer_dirty:
            self.server.timer_dirty = False
            self.server_armed = min(self.server_armed, self.now)

    def server_tick(self) -> None:
        if DRIVE["mode"] == "deadline":
            self.check_server_timer()
            if self.now < self.server_armed:
                if self.server_invariant is not None:
                    before = self.server_invariant()
                    self.server.handle_timer(self.now)
                    assert self.server_invariant() == before, f"the server's timers acted at {self.now}, early"
                    self.server_checked += 1
                return
        self.run_server_timer()

    def run_server_timer(self) -> None:
        when = self.server.handle_timer(self.now)
        self.server_timer_runs += 1
        self.server_ran_at = self.now
        self.server_armed = when

    def make_server(self) -> ServerCore:
        a, pki = self._server_args, self.pki
        return server_core(
            self.context("server", pki / "srv.crt", pki / "srv.key", pki / "ca.crt"),
            a["pool"] or AddressPool(SERVER_INNER, a["static"]), mode=a["mode"], allowed_clients=a["allowed"],
            idle_probe_interval=a["idle_probe"], random_bytes=lambda n: next(self._ids).to_bytes(n, "big"),
        )

    def context(self, *args):
        """A DTLS context whose keys the tap (if any) learns."""
        ctx = make_context(*args)
        if self.tap is not None:
            ctx.set_keylog_callback(self.tap.keylog)
        return ctx

    def restart_server(self) -> ServerCore:
        """The server process restarts: all its state is gone, same address."""
        self._server_args["pool"] = None
        self.server = self.make_server()
        self.server_armed = float("-inf")
        return self.server

    def client(self, name: str = "alice", client_pki: Optional[Path] = None, **kw) -> Client:
        d = client_pki or self.pki
        ctx = self.context("client", d / f"{name}.crt", d / f"{name}.key", self.pki / "ca.crt", "srv")
        c = Client(self, client_core(ctx, **kw))
        self.endpoints.append(c)
        return c

    def assign(self, endpoint, key) -> tuple:
        addr = (CLIENT_IP, next(self._ports))
        endpoint.addrs[key] = addr
        self.owner[addr] = (endpoint, key)
        return addr

    def cut(self, key) -> None:
        self.drop_up.add(key)
        self.drop_down.add(key)

    def mend(self, key) -> None:
        self.drop_up.discard(key)
        self.drop_down.discard(key)

    # moving datagrams
    def _wire(self, direction: str, endpoint, key, addr, data: bytes) -> None:
        link = getattr(key, "base", key)  # a spare session (NAT rebinding) runs over its path's link
        if link in (self.drop_up if direction == "up" else self.drop_down):
            return
        if self.drop is not None and self.drop(direction, link, data):
            return
        self.queue.append((self.now + self.delay.get(link, 0.0), next(self._order), direction, endpoint, key, addr, data))

    def drain(self) -> None:
        for ep in self.endpoints:
            ep.drain()
        self.check_server_timer()
        while (ev := self.server.next_event()) is not None:
            self.sevents.append((self.now, ev))

    def pump(self) -> None:
        for _ in range(1000):
            self.drain()
            moved = False
            for ep in self.endpoints:
                for key, addr, d in ep.outgoing():
                    moved = True
                    self._wire("up", ep, key, addr, d)
            for addr, d, _tos in self.server.datagrams_to_send():
                moved = True
                owner = self.owner.get(addr)
                if owner is None:
                    self.stray.append((addr, d))
                else:
                    self._wire("down", owner[0], owner[1], addr, d)
            due = sorted(q for q in self.queue if q[0] <= self.now)
            if due:
                moved = True
                self.queue = [q for q in self.queue if q[0] > self.now]
            for _, _, direction, ep, key, addr, d in due:
                if direction == "up":
                    if self.tap is not None:
                        self.tap.delivered(self.now, True, addr, d)
                    self.server.receive_datagram(addr, d, self.now)
                elif (owner := self.owner.get(addr)) is not None and owner[0] is ep and ep.addrs.get(owner[1]) == addr:
                    if self.tap is not None:
                        self.tap.delivered(self.now, False, addr, d)
                    ep.deliver(owner[1], d)  # the socket's key now (a promoted spare's socket is its path's)
                else:
                    self.stray.append((addr, d))
                self.drain()
            if not moved:
                break
        else:
            raise AssertionError("the network never settled")
        self.drain()

    def tick(self) -> None:
        for ep in self.endpoints:
            ep.tick()
        self.server_tick()
        self.pump()

    def advance(self, seconds: float, each: Optional[Callable[[], None]] = None) -> None:
        for _ in range(round(seconds / STEP)):
            self.now += STEP
            if each is not None:
                each()
            self.tick()

    def run_until(self, cond: Callable[[], bool], limit: float, each: Optional[Callable[[], None]] = None) -> float:
        """Step until ``cond()``; return that time (fail after ``limit`` seconds)."""
        end = self.now + limit
        while not cond():
            assert self.now < end, "condition not reached in time"
            self.now += STEP
            if each is not None:
                each()
            self.tick()
        return self.now

    # server-side helpers
    def send_down(self, pkt: bytes) -> list:
        """Send one packet from the server's TUN; return the path keys its DATA went out on."""
        before = len(self.server.outbox)
        self.server.send_packet(pkt, self.now)
        return [self.owner[addr][1] for addr, _, _ in self.server.outbox[before:]]

    def sev(self, cls) -> list:
        return [e for _, e in self.sevents if isinstance(e, cls)]

    def stimes(self, cls, pred: Callable = lambda e: True) -> list[float]:
        return [t for t, e in self.sevents if isinstance(e, cls) and pred(e)]

    def tunnel(self):
        (t,) = self.server.tunnels.values()
        return t

    def spath(self, client: Client, key):
        return self.server.paths[client.addr(key)]


def one_path(pki: Path, **kw) -> tuple[Net, Client]:
    net = Net(pki)
    c = net.client(**kw)
    c.add("a")
    assert c.core.state == C_UP, c.events
    return net, c


def two_paths(pki: Path, net: Optional[Net] = None, **kw) -> tuple[Net, Client]:
    net = net or Net(pki)
    c = net.client(**kw)
    c.add("a", pump=False)
    c.add("b", priority=1, pump=False)
    net.run_until(lambda: c.joined() == ["a", "b"], 2.0)
    return net, c


def frames_seen(tap: Tap, side: str, cls, addr: Optional[tuple] = None) -> list:
    """The frames of class ``cls`` that ``side`` decrypted (the ``plain`` fixture's tap); only
    those of the session of the client address ``addr``, if given."""
    return tap.frames(side, cls, addr)


def handshake_only(net: Net, c: Client) -> list[bytes]:
    """Run the DTLS handshake of path "a"; return the client's HELLO datagram(s), not yet delivered."""
    c.add("a", pump=False)
    for _ in range(10):
        out = c.core.datagrams_to_send()
        if c.core.slots["a"].hello_at is not None:
            return [d for _, d, _ in out]
        for _, d, _ in out:
            net.server.receive_datagram(c.addr("a"), d, net.now)
        for _, d, _ in net.server.datagrams_to_send():
            c.core.receive_datagram("a", d, net.now)
        c.drain()
    raise AssertionError("handshake did not finish")


def client_snapshot(c: Client) -> Callable[[], object]:
    """What the client's timers change, for Client.invariant."""
    core = c.core
    return lambda: (
        len(core.outbox), len(core._events), len(core.to_tun),
        [(k, s.path and s.path.state, s.joined, s.hello_at, s.spare is not None, s.retry_at)
         for k, s in core.slots.items()])


def server_snapshot(net: Net) -> Callable[[], object]:
    """What the server's timers change, for Net.server_invariant."""
    server = net.server
    return lambda: (
        len(server.outbox), len(server._events), len(server.to_tun),
        sorted((str(a), p.state) for a, p in server.paths.items()),
        sorted((t.name, len(t.paths), t.idle_since) for t in server.tunnels.values()))


def backup_pair(pki: Path) -> tuple[Net, Client]:
    """A backup-mode client with paths "a" (priority 1) and "b" (priority 0), both joined."""
    net = Net(pki)
    c = net.client(mode="backup")
    c.add("a", priority=1, pump=False)
    c.add("b", priority=0, pump=False)
    net.run_until(lambda: c.joined() == ["a", "b"], 2.0)
    net.advance(0.5)
    return net, c
