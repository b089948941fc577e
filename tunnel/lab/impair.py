"""Impair the paths of a MultipathTopology: delay, jitter, loss, reordering, rate, outages, traces.

Why: a multipath tunnel earns its keep when paths are bad in different ways:
slow, lossy, bursty, narrow, or gone for a while.  Tests and benchmarks need
to spoil each path, per direction, reproducibly and transparently to the
tunnel under test.  Everything happens in the router namespace of a
:class:`~tunnel.lab.topology.MultipathTopology`, so it dies with the lab and
cannot leak into another one.

Each mechanism goes where it is cheapest and most faithful:

- ``rate_mbit``: a tbf qdisc on the router's egress for that direction.
  Downstream (server->client) that is the path's own veth, so the tbf is its
  root qdisc.  Upstream every path leaves through the one server link, so its
  root is an htb with ``default 0`` (unclassified packets bypass shaping) and
  one class ``1:<i+1>`` per rate-limited path, whose leaf qdisc is the tbf
  (handle ``<0x100+i>:``); nftables steers the path's packets into the class
  by setting ``meta priority`` (htb honours skb->priority naming one of its
  classes, no tc filter needed).  The tbf queue holds ``rate_queue_ms`` worth
  of bytes, then tail-drops like a real bottleneck;
- ``loss`` (independent random loss) and :meth:`Impairments.blackhole`
  (instant outage): nftables in the router's forward chain, table
  ``inet mptunlab``, with ``numgen random`` for the loss;
- ``delay_ms``, ``jitter_ms``, ``reorder``, ``burst`` (Gilbert-Elliott),
  scheduled ``outages`` and a time-varying rate from a cellular ``trace``
  (mahimahi's format, :mod:`tunnel.lab.linktrace`): the user-space delay line
  (:mod:`tunnel.lab.delayline`), one process in the router namespace, started
  when first needed.  A trace is a rate that changes every millisecond, which
  tbf cannot follow; the delay line serves its drop-tail queue at the
  trace's opportunities, then applies the delay.  A fixed ``rate_mbit`` stays
  with tbf (cheaper, in the kernel); a path direction has one or the other.

Packets reach the delay line by policy routing (rule priorities and tables
``1000 + 2*i`` upstream, ``1001 + 2*i`` downstream, for path ``i``)::

    up:   iif <path veth>                 lookup 1000+2i: default dev dl<i>u
    down: iif <server veth> to <subnet i> lookup 1001+2i: default dev dl<i>d

Each table also holds a blackhole default route (metric 4096): if the delay
line dies, its TUNs vanish and the path fails closed instead of silently
bypassing the impairment.  The delay line writes packets back into the same
TUN; they then come in on ``dl<i>u``/``dl<i>d``, which no rule matches, and
follow the main table.  The nftables rules and the tbf sit *after* the delay
line: they match the packet's last hop (``oif`` = egress veth, ``iif`` = the
ingress veth or the TUN).  A direction only passes through the delay line
when one of its settings needs it (or ``force_delay_line``).

Outage windows are seconds after :attr:`Impairments.schedule_start`, a
``time.monotonic()`` instant (CLOCK_MONOTONIC is the same in every
namespace): the moment the :class:`Impairments` was created, or whatever
:meth:`Impairments.restart_schedule` set.

``python -m tunnel.lab.impair measure`` produces the figures in docs/LAB.md.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import TC_H_ROOT

from tunnel.lab.delayline import GilbertElliott, LineSettings
from tunnel.lab.linktrace import TRACE_QUEUE_MS, load_trace, resolve_trace
from tunnel.lab.netns import Host, Lab, unique_prefix, wait_for
from tunnel.lab.topology import MultipathTopology, echo_server_argv, probe_argv, rtts_ms

__all__ = ["Direction", "GilbertElliott", "Impairment", "Impairments", "trace_pair", "tun_name"]

Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = ("up", "down")
NFT_TABLE = "mptunlab"
RULE_BASE = 1000  # rule priority and table of path i, direction d: RULE_BASE + 2*i + (d == "down")
FAILSAFE_METRIC = 4096  # the blackhole default route behind each delay-line route
HTB_ROOT = 0x10000  # "1:" on the server link
TBF_MAJOR = 0x100  # tbf of path i's upstream: handle (0x100 + i):, under class 1:(i+1)
TUN_TXQUEUELEN = 1000


@dataclass(frozen=True)
class Impairment:
    """What one path does to the packets of one direction; the default does nothing.

    ``loss``, ``reorder`` and the :class:`GilbertElliott` probabilities are in
    0..1; ``reorder`` is the chance that a packet is held back an extra
    ``reorder_gap_ms`` (so later ones overtake it).  Jitter is uniform in
    ``delay_ms +- jitter_ms`` and never reorders by itself.  ``outages`` are
    ``(t1, t2)`` pairs of seconds after the schedule start.
    ``force_delay_line`` routes through the delay line even when nothing
    needs it (to measure its overhead).

    ``trace`` names a capacity trace in mahimahi's format: a path (relative to
    the working directory) or the file name of one shipped in
    ``tunnel/lab/traces/``; it is resolved to an absolute path and read here,
    so a bad one fails at construction (:class:`~tunnel.lab.linktrace.TraceError`,
    a ValueError naming the file).  Each opportunity carries ``trace_scale`` x
    1500 bytes.  The drop-tail queue in front of it holds ``trace_queue_ms``
    at the trace's scaled mean rate, or ``trace_queue_packets`` packets if
    that is set.  E.g. "ATT-LTE up x8 with a 200 ms queue":
    ``Impairment(trace="ATT-LTE-driving-2016.up", trace_scale=8, trace_queue_ms=200)``.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    burst: Optional[GilbertElliott] = None
    reorder: float = 0.0
    reorder_gap_ms: float = 10.0
    rate_mbit: Optional[float] = None
    rate_queue_ms: float = 50.0
    outages: tuple[tuple[float, float], ...] = ()
    force_delay_line: bool = False
    trace: Optional[str] = None
    trace_scale: float = 1.0
    trace_queue_ms: float = TRACE_QUEUE_MS
    trace_queue_packets: Optional[int] = None

    def __post_init__(self) -> None:
        probabilities = [self.loss, self.reorder]
        if self.burst:
            probabilities += [self.burst.p_good_to_bad, self.burst.p_bad_to_good,
                              self.burst.loss_in_bad, self.burst.loss_in_good]
        if not all(0.0 <= p <= 1.0 for p in probabilities):
            raise ValueError(f"probabilities must lie in 0..1: {self}")
        if min(self.delay_ms, self.jitter_ms, self.reorder_gap_ms, self.rate_queue_ms) < 0:
            raise ValueError(f"times must not be negative: {self}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be positive: {self}")
        if any(not 0 <= a < b for a, b in self.outages):
            raise ValueError(f"outages must be (t1, t2) with 0 <= t1 < t2: {self.outages}")
        object.__setattr__(self, "outages", tuple((float(a), float(b)) for a, b in self.outages))
        if self.trace is not None:
            self._check_trace()

    def _check_trace(self) -> None:
        if self.rate_mbit is not None:
            raise ValueError(f"a trace and rate_mbit exclude each other (the trace is the rate): {self}")
        if not self.trace_scale > 0:
            raise ValueError(f"trace_scale must be positive: {self.trace_scale}")
        if self.trace_queue_ms < 0 or (self.trace_queue_packets is not None
                                       and self.trace_queue_packets < 1):
            raise ValueError(f"the trace queue must hold something: {self}")
        path = str(resolve_trace(str(self.trace)))
        load_trace(path)
        object.__setattr__(self, "trace", path)

    def needs_delay_line(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.reorder or self.burst
                    or self.outages or self.trace or self.force_delay_line)

    def line_settings(self, tun: str) -> LineSettings:
        """This impairment's share of the delay line's work."""
        return LineSettings(tun, self.delay_ms, self.jitter_ms, self.reorder, self.reorder_gap_ms,
                            self.burst, self.outages, self.trace, self.trace_scale,
                            self.trace_queue_ms, self.trace_queue_packets)


NO_IMPAIRMENT = Impairment()


def trace_pair(name: str, scale: float = 1.0, **fields: Any) -> dict[Direction, Impairment]:
    """Both directions of a recorded link: ``name + ".up"`` and ``name + ".down"``.

    E.g. ``trace_pair("ATT-LTE-driving-2016", 8, trace_queue_ms=200, delay_ms=20)``;
    ``fields`` are further :class:`Impairment` fields, the same both ways.
    """
    return {d: Impairment(trace=f"{name}.{d}", trace_scale=scale, **fields) for d in DIRECTIONS}
Key = tuple[int, Direction]


def tun_name(path: int, direction: Direction) -> str:
    """The delay line's TUN for one path and direction: ``dl<i>u`` / ``dl<i>d``."""
    return f"dl{path}{direction[0]}"


def _directions(direction: str) -> tuple[Direction, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")
    return (direction,)  # type: ignore[return-value]


def _line_name(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def _ignoring(codes: Iterable[int], fn: Any, *args: Any, **kw: Any) -> None:
    """Call a pyroute2 function, ignoring the NetlinkError codes in ``codes``."""
    try:
        fn(*args, **kw)
    except NetlinkError as exc:
        if exc.code not in codes:
            raise


class DelayLineProcess:
    """The delay line running in a namespace, driven over its stdin/stdout."""

    def __init__(self, host: Host, seed: Optional[int] = None, timeout: float = 15.0) -> None:
        argv = [sys.executable, "-m", "tunnel.lab.delayline"]
        if seed is not None:
            argv += ["--seed", str(seed)]
        self.proc = host.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""
        self._read_reply(timeout)  # {"ok": true, "ready": true}

    def request(self, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send one control message; return the reply, raise if it says not ok."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"delay line exited with {self.proc.poll()}") from None
        reply = self._read_reply(timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"delay line: {reply.get('error')}")
        return reply

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"delay line did not answer within {timeout:g}s")
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"delay line exited with {self.proc.wait()}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def stop(self, timeout: float = 5.0) -> dict[str, Any]:
        """SIGTERM it and return its final counters ({} if it is already gone)."""
        if self.proc.poll() is not None:
            return {}
        self.proc.send_signal(signal.SIGTERM)
        try:
            stats = self._read_reply(timeout).get("stats", {})
        except (TimeoutError, RuntimeError):
            stats = {}
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return stats


class Impairments:
    """The impairments of one :class:`MultipathTopology`; see the module doc.

    Every change takes effect before the call returns.  :meth:`clear` (or
    leaving the ``with`` block) removes them all; closing the lab does too.
    ``seed`` makes the delay line's random choices repeatable.
    """

    def __init__(self, topo: MultipathTopology, seed: Optional[int] = None) -> None:
        self.topo = topo
        self.router = topo.router
        self.seed = seed
        self.schedule_start = time.monotonic()
        self._plan: dict[Key, Impairment] = {}
        self._blackholes: set[Key] = set()
        self._delay_line: Optional[DelayLineProcess] = None
        self._routed: set[Key] = set()  # directions the rules send through the delay line
        self._rate_specs: dict[Key, tuple[float, float]] = {}
        self._htb = False

    def __enter__(self) -> Impairments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    # -- public API ----------------------------------------------------------
    def get(self, path: int, direction: Direction) -> Impairment:
        return self._plan.get((path, direction), NO_IMPAIRMENT)

    def set(self, path: int, impairment: Impairment, direction: str = "both") -> None:
        """Give path ``path`` this impairment in ``direction`` ("up", "down", "both")."""
        self._check_path(path)
        plan = dict(self._plan)
        for d in _directions(direction):
            plan[(path, d)] = impairment
        self.apply(plan)

    def apply(self, plan: Mapping[Key, Impairment]) -> None:
        """Make ``plan`` (``{(path, direction): Impairment}``) the whole set of impairments."""
        for path, direction in plan:
            self._check_path(path)
            _directions(direction)
        self._plan = {k: v for k, v in plan.items() if v != NO_IMPAIRMENT}
        self._sync()

    def blackhole(self, path: int, direction: str = "both", on: bool = True) -> None:
        """Drop everything on a path (instantly, in nftables) or stop doing so."""
        self._check_path(path)
        keys = {(path, d) for d in _directions(direction)}
        self._blackholes = self._blackholes | keys if on else self._blackholes - keys
        self._sync_nft()

    def restart_schedule(self, start: Optional[float] = None) -> float:
        """Let outage schedules count from ``start`` (``time.monotonic()``; default now)."""
        self.schedule_start = time.monotonic() if start is None else start
        if self._delay_line is not None:
            self._configure_delay_line(self._routed)
        return self.schedule_start

    def stats(self, reset: bool = False) -> dict[Key, dict[str, Any]]:
        """The delay line's counters per (path, direction) it serves (see tunnel.lab.delayline)."""
        if self._delay_line is None:
            return {}
        raw = self._delay_line.request({"cmd": "stats", "reset": reset})["stats"]
        return {self._key(name): value for name, value in raw.items()}

    def clear(self) -> None:
        """Remove every impairment and blackhole and stop the delay line."""
        self._plan, self._blackholes = {}, set()
        if self.topo.lab.hosts.get(self.router.name) is self.router:
            self._sync()
            if self._delay_line is not None:
                self._delay_line.stop()
        else:  # the lab is closed: all of it died with the router namespace
            self._routed, self._rate_specs, self._htb = set(), {}, False
        self._delay_line = None

    # -- reconciliation ----------------------------------------------------
    def _sync(self) -> None:
        self._sync_delay_line()
        self._sync_rates()
        self._sync_nft()

    def _sync_delay_line(self) -> None:
        wanted = {k for k, imp in self._plan.items() if imp.needs_delay_line()}
        exit_code = self._reap_delay_line()
        with self.router.ipr() as ipr:
            for key in self._routed - wanted:  # stop routing into TUNs before they go
                self._unroute(ipr, key)
        if exit_code is not None and wanted:
            raise RuntimeError(f"the delay line had exited ({exit_code}); its paths were dropping"
                               " everything (clear() to start over)")
        if wanted and self._delay_line is None:
            self._delay_line = DelayLineProcess(self.router, self.seed)
        if self._delay_line is not None:
            self._configure_delay_line(wanted)
        with self.router.ipr() as ipr:
            for key in wanted - self._routed:
                self._route(ipr, key)

    def _reap_delay_line(self) -> Optional[int]:
        """If the delay line died, forget it and its routes and return its exit code."""
        if self._delay_line is None or self._delay_line.proc.poll() is None:
            return None
        code = self._delay_line.proc.returncode
        self._delay_line = None
        with self.router.ipr() as ipr:
            for key in list(self._routed):
                self._unroute(ipr, key)
        return code

    def _configure_delay_line(self, keys: Iterable[Key]) -> None:
        assert self._delay_line is not None
        lines = {_line_name(k): self._plan[k].line_settings(tun_name(*k)).to_json() for k in keys}
        self._delay_line.request({"cmd": "configure", "lines": lines,
                                  "schedule_start": self.schedule_start})

    def _rule(self, key: Key) -> dict[str, Any]:
        """The policy rule sending one direction of one path into the delay line."""
        path, direction = self.topo.paths[key[0]], key[1]
        number = RULE_BASE + 2 * path.index + (direction == "down")
        if direction == "up":
            return {"iifname": path.router_ifname, "table": number, "priority": number}
        net, plen = path.subnet.split("/")
        return {"iifname": self.topo.router_server_ifname, "dst": net, "dst_len": int(plen),
                "table": number, "priority": number}

    def _route(self, ipr: Any, key: Key) -> None:
        rule = self._rule(key)
        tun = ipr.link_lookup(ifname=tun_name(*key))[0]
        ipr.link("set", index=tun, mtu=self.topo.mtu, txqlen=TUN_TXQUEUELEN, state="up")
        ipr.route("replace", dst="0.0.0.0/0", oif=tun, table=rule["table"])
        ipr.route("replace", dst="0.0.0.0/0", type="blackhole", table=rule["table"],
                  priority=FAILSAFE_METRIC)
        _ignoring([errno.EEXIST], ipr.rule, "add", **rule)
        self._routed.add(key)

    def _unroute(self, ipr: Any, key: Key) -> None:
        rule = self._rule(key)
        _ignoring([errno.ENOENT], ipr.rule, "del", **rule)
        _ignoring([errno.ESRCH], ipr.route, "del", dst="0.0.0.0/0", type="blackhole",
                  table=rule["table"], priority=FAILSAFE_METRIC)
        self._routed.discard(key)

    def _sync_rates(self) -> None:
        wanted = {k: (imp.rate_mbit, imp.rate_queue_ms) for k, imp in self._plan.items()
                  if imp.rate_mbit is not None}
        with self.router.ipr() as ipr:
            for key in set(self._rate_specs) | set(wanted):
                if self._rate_specs.get(key) != wanted.get(key):
                    self._set_rate(ipr, key, wanted.get(key))
            if self._htb and not any(d == "up" for _, d in self._rate_specs):
                index = ipr.link_lookup(ifname=self.topo.router_server_ifname)[0]
                ipr.tc("del", index=index, parent=TC_H_ROOT)
                self._htb = False

    def _set_rate(self, ipr: Any, key: Key, spec: Optional[tuple[float, float]]) -> None:
        """Install, change or (``spec`` None) remove the tbf of one direction of a path."""
        path = self.topo.paths[key[0]]
        if key[1] == "down":  # the tbf is the root qdisc of the path's veth
            index = ipr.link_lookup(ifname=path.router_ifname)[0]
            parent, handle = TC_H_ROOT, HTB_ROOT
        else:  # the tbf hangs under the path's class of the server link's htb
            index = ipr.link_lookup(ifname=self.topo.router_server_ifname)[0]
            parent, handle = HTB_ROOT + path.index + 1, (TBF_MAJOR + path.index) << 16
            if spec is not None and key not in self._rate_specs:
                self._add_htb_class(ipr, index, parent)
        if spec is None:
            if key[1] == "down":
                _ignoring([errno.ENOENT, errno.EINVAL], ipr.tc, "del", index=index, parent=parent)
            else:  # deleting the class deletes its tbf
                _ignoring([errno.ENOENT], ipr.tc, "del-class", index=index, handle=parent,
                          parent=HTB_ROOT)
            del self._rate_specs[key]
            return
        ipr.tc("replace", "tbf", index, handle, parent=parent, **_tbf_params(*spec, self.topo.mtu))
        self._rate_specs[key] = spec

    def _add_htb_class(self, ipr: Any, index: int, classid: int) -> None:
        if not self._htb:  # unclassified packets (default 0) pass unshaped
            ipr.tc("add", "htb", index, HTB_ROOT, default=0)
            self._htb = True
        ipr.tc("add-class", "htb", index, classid, parent=HTB_ROOT, rate="10gbit")

    def _sync_nft(self) -> None:
        self.router.run(["nft", "-f", "-"], stdin=None, input=self._nft_script())

    def _nft_script(self) -> str:
        """The whole nftables table, rebuilt atomically on every change."""
        script = [f"table inet {NFT_TABLE} {{}}", f"delete table inet {NFT_TABLE}"]
        jumps, chains = [], []
        for key in sorted(set(self._plan) | self._blackholes):
            rules = self._nft_rules(key)
            if not rules:
                continue
            name = f"p{key[0]}{key[1]}"
            jumps.append(f"    {self._nft_match(key)} jump {name}")
            chains.append(f"  chain {name} {{\n" + "".join(f"    {r}\n" for r in rules) + "  }")
        if jumps:
            script += [f"table inet {NFT_TABLE} {{",
                       "  chain forward {",
                       "    type filter hook forward priority filter; policy accept;",
                       *jumps, "  }", *chains, "}"]
        return "\n".join(script) + "\n"

    def _nft_match(self, key: Key) -> str:
        """Matches the last hop of a packet of this path and direction (after the delay line)."""
        path, direction = self.topo.paths[key[0]], key[1]
        ingress, egress = path.router_ifname, self.topo.router_server_ifname
        if direction == "down":
            ingress, egress = egress, ingress
        return f'iifname {{ "{ingress}", "{tun_name(*key)}" }} oifname "{egress}"'

    def _nft_rules(self, key: Key) -> list[str]:
        imp = self._plan.get(key, NO_IMPAIRMENT)
        rules = []
        if key in self._blackholes:
            rules.append("drop")
        if imp.loss:
            rules.append(f"numgen random mod 1000000 < {round(imp.loss * 1_000_000)} drop")
        if imp.rate_mbit is not None and key[1] == "up":
            rules.append(f"meta priority set 1:{key[0] + 1:x}")
        return rules

    # -- helpers -------------------------------------------------------------
    def _check_path(self, path: int) -> None:
        if not 0 <= path < len(self.topo.paths):
            raise ValueError(f"no path {path} (the topology has {len(self.topo.paths)})")

    @staticmethod
    def _key(name: str) -> Key:
        path, direction = name.split("/")
        return int(path), direction  # type: ignore[return-value]


def _tbf_params(rate_mbit: float, queue_ms: float, mtu: int) -> dict[str, int]:
    """tbf settings: ``rate_mbit``, a burst of 2 ms (at least 4 frames), ``queue_ms`` of queue."""
    rate = int(rate_mbit * 1e6 / 8)  # bytes per second
    burst = max(4 * (mtu + 14), int(rate * 0.002))
    return {"rate": rate, "burst": burst, "limit": burst + int(rate * queue_ms / 1e3)}


# --------------------------------------------------------------------------
# Measurements for docs/LAB.md: python -m tunnel.lab.impair measure
# --------------------------------------------------------------------------

ECHO_PORT = 7007
IPERF_PORT = 5201
LOAD_DELAY_MS = 10.0  # the delay under which the packet-rate sweep runs
LOAD_SIZE = 100  # UDP payload bytes of the load
PROBE_RATE = 100.0  # echo probes per second beside the load
Figures = dict[str, float]


def _percentiles(values: Sequence[float]) -> Figures:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": at(0.5), "p99": at(0.99), "max": ordered[-1]}


def _probe_rtts(topo: MultipathTopology, count: int, rate: float) -> list[float]:
    argv = probe_argv(topo.server_addr, ECHO_PORT, count, rate,
                      device=topo.paths[0].client_ifname, grace=0.5)
    return rtts_ms(json.loads(topo.client.run(argv, timeout=count / rate + 30).stdout))


def wakeup_lateness(seconds: float, interval: float = 0.005) -> Figures:
    """How late a bare select() wakes up here (ms): the floor under any delay line."""
    late = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        due = time.monotonic() + interval
        select.select([], [], [], interval)
        late.append((time.monotonic() - due) * 1e3)
    return _percentiles(late)


def overhead_rtts(topo: MultipathTopology, imp: Impairments, seconds: float) -> dict[str, Figures]:
    """RTT (ms) of path 0 routed plainly, then through the delay line at zero impairment."""
    out = {}
    for name, impairment in (("plain", NO_IMPAIRMENT), ("delay line", Impairment(force_delay_line=True))):
        imp.set(0, impairment)
        out[name] = _percentiles(_probe_rtts(topo, int(seconds * 200), 200.0))
    imp.clear()
    return out


def loaded_delay(topo: MultipathTopology, imp: Impairments, pps: int, seconds: float) -> dict[str, Any]:
    """UDP load at ``pps`` upstream through a 10 ms delay line, an echo probe beside it.

    Reports the delay line's lateness and the probe's RTT minus the 10 ms;
    the probe also sees time spent queued in the TUN before the delay line
    reads a packet, which its lateness counter cannot.
    """
    imp.set(0, Impairment(delay_ms=LOAD_DELAY_MS), "up")
    imp.stats(reset=True)
    load = topo.client.popen(["iperf3", "-c", topo.server_addr, "-p", str(IPERF_PORT), "-u",
                              "-l", str(LOAD_SIZE), "-b", str(pps * LOAD_SIZE * 8), "-t", str(seconds),
                              "--bind-dev", topo.paths[0].client_ifname, "-J"],
                             stdout=subprocess.PIPE)
    rtts = _probe_rtts(topo, int((seconds - 1.0) * PROBE_RATE), PROBE_RATE)
    out, _ = load.communicate(timeout=seconds + 30)
    lateness = imp.stats()[(0, "up")]["lateness_ms"]
    received = json.loads(out)["end"]["sum_received"]
    return {"delivered": (received["packets"] - received["lost_packets"]) / received["seconds"],
            "lost %": received["lost_percent"],
            "lateness p50": lateness["p50"], "lateness p99": lateness["p99"],
            "RTT-10 p50": _percentiles(rtts)["p50"] - LOAD_DELAY_MS,
            "RTT-10 p99": _percentiles(rtts)["p99"] - LOAD_DELAY_MS}


def measure(rounds: int, seconds: float, rates: Sequence[int]) -> dict[str, Any]:
    """All figures of docs/LAB.md, round by round (each round measures everything once).

    Returns ``{"wakeup": [...], "overhead": [...], "load": {pps: [...]}}``,
    one entry per round.
    """
    results: dict[str, Any] = {"wakeup": [], "overhead": [], "load": {pps: [] for pps in rates}}
    with Lab(unique_prefix("measure")) as lab:
        topo = MultipathTopology(lab, n_paths=1)
        topo.server.popen(echo_server_argv(ECHO_PORT))
        topo.server.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        wait_for(lambda: topo.server.is_listening(ECHO_PORT, udp=True)
                 and topo.server.is_listening(IPERF_PORT), 10, message="servers did not start")
        with Impairments(topo) as imp:
            for _ in range(rounds):
                results["wakeup"].append(wakeup_lateness(min(seconds, 2.0)))
                results["overhead"].append(overhead_rtts(topo, imp, seconds))
                for pps in rates:
                    results["load"][pps].append(loaded_delay(topo, imp, pps, seconds))
                imp.clear()
    return results


def _cell(values: Sequence[float], fmt: str = ".2f") -> str:
    """Median of the rounds, (min-max) when there are several."""
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{med:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def render(results: dict[str, Any]) -> str:
    """The figures as Markdown tables: median of the rounds (min–max)."""
    rows = ["| ms | p50 | p99 | max |", "|---|--:|--:|--:|"]
    lines = [("bare `select()` wake-up lateness", results["wakeup"])]
    lines += [(f"RTT, {name}", [r[name] for r in results["overhead"]])
              for name in results["overhead"][0]]
    for label, per_round in lines:
        rows.append(f"| {label} | " + " | ".join(
            _cell([r[k] for r in per_round], ".3f") for k in ("p50", "p99", "max")) + " |")
    keys = list(next(iter(results["load"].values()))[0])
    rows += ["", "| load (packets/s) | " + " | ".join(keys) + " |",
             "|--:|" + "--:|" * len(keys)]
    for pps, per_round in results["load"].items():
        rows.append(f"| {int(pps):,} | " + " | ".join(
            _cell([r[k] for r in per_round], ",.0f" if k == "delivered" else ".2f") for k in keys)
            + " |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunnel.lab.impair")
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="measure the delay line (figures of docs/LAB.md)")
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--seconds", type=float, default=4.0, help="per figure and round")
    m.add_argument("--rates", default="1000,5000,10000,20000,40000,60000",
                   help="load levels in packets/s, comma-separated")
    m.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    results = measure(args.rounds, args.seconds, [int(r) for r in args.rates.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
