"""User-space delay line: delay, jitter, reordering, burst loss, outages, trace-driven rates.

Why: the lab kernel has no netem, so whatever a link's delay, jitter,
reordering, Gilbert-Elliott burst loss or scheduled outages are, something in
user space must hold the packets.  It must be transparent IP forwarding, so
that mptun, WireGuard or OpenVPN all run over the very same impaired links:
the router namespace of :class:`~tunnel.lab.topology.MultipathTopology` routes
each path's traffic, per direction, into a TUN device this process owns
(:mod:`tunnel.lab.impair` sets up those policy rules).  The process reads each
packet, decides whether it is lost, holds it until its due time and writes it
back into the *same* TUN.  To the kernel the written packet is received on the
TUN, a different input interface than the one it came in on, so the rules
that sent it to the TUN no longer match and it is forwarded normally (the
router therefore decrements the TTL twice).

Scheduling: no timerfd; ``select()`` with a timeout to the earliest due time.
Not epoll: ``epoll_wait`` takes whole milliseconds (CPython rounds up), which
alone makes a packet up to 1 ms late, whereas ``select``'s timeval has
microsecond resolution; with a handful of descriptors select costs the same.
The process also sets its timer slack to 1 ns (default 50 us).

Per line (one TUN = one path and direction) and per packet, in this order:

1. outage: dropped if it arrives inside an outage window;
2. burst loss: the Gilbert-Elliott chain makes one transition, then the
   packet is lost with the loss probability of the state it is now in;
3. trace (if the line has one): the packet joins a drop-tail queue served
   at a cellular trace's opportunities (:mod:`tunnel.lab.linktrace`); it is
   dropped if the queue is full, else it leaves when the trace lets its last
   byte through, and that departure counts as its arrival for step 4.  So
   the bottleneck queue comes first and the delay after it, like mahimahi's
   ``mm-link ... mm-delay`` order for the packets going out: the queue sits
   at the sender's end of the radio link, the propagation delay is behind it.
   Steps 1-2 come before the queue: a lost packet uses no opportunity;
4. due time = arrival + delay + uniform(-jitter, +jitter) (never before the
   arrival).  With probability ``reorder`` the packet is *held back*: its due
   time grows by ``reorder_gap_ms`` and later packets may overtake it.  All
   other packets keep FIFO order: due = max(sampled, previous due), so jitter
   alone never reorders;
5. at its due time it is dropped if that moment lies inside an outage window
   (it was "on the wire" when the link went down), else written back.

Outage windows ``(t1, t2)`` are seconds relative to the *schedule start*, a
``time.monotonic()`` instant.  CLOCK_MONOTONIC is shared by all network
namespaces, so a controller in another namespace can pass its own clock
reading; without one the schedule starts when the process starts.

Control: JSON lines on stdin, one JSON reply line each on stdout::

    {"cmd": "configure", "lines": {NAME: LINE, ...}, "schedule_start": T}
    {"cmd": "stats", "reset": false}

``configure`` replaces the set of lines: new names get a TUN, missing ones
lose theirs (queued packets are discarded), existing ones keep their TUN and
queue and take the new settings.  ``schedule_start`` is optional.
LINE is ``{"tun": "dl0u", "delay_ms": 20, "jitter_ms": 0, "reorder": 0,
"reorder_gap_ms": 10, "burst": null or {"p_good_to_bad": .., "p_bad_to_good": ..,
"loss_in_bad": 1, "loss_in_good": 0}, "outages": [[t1, t2], ...], "trace": null or
"/abs/path", "trace_scale": 1, "trace_queue_ms": 200, "trace_queue_packets": null}``
(a trace's clock starts at the schedule start, like the outages; a line that
keeps its trace keeps its queued packets across a ``configure``).
The TUNs are created down, without address and with IPv6 off; whoever
routes into them brings them up.

Counters per line: packets in, out, dropped by cause (``outage``, ``burst``,
``queue`` = already MAX_QUEUE packets held, ``trace_queue`` = the trace's
drop-tail queue was full, ``write`` = the TUN refused it), held back,
currently queued (trace queue included), and the lateness (actual release -
due time) in ms: max, mean, p50, p99 (10 us buckets).  Arrival is when the process reads
the packet, so time spent in the TUN's kernel queue before that (under
overload) does not show as lateness; an end-to-end probe sees it.  A line
with a trace also reports ``"trace"``: its queue (packets, bytes, the most
packets seen, the limits), the opportunities used and wasted (passed with
nothing queued), the bytes sent, and the drops by a full queue.  Time spent in
the trace queue is not lateness: lateness is measured from the due time
computed after the queue.  On SIGTERM or SIGINT the process prints
``{"stats": {...}}`` as its last stdout line (and to ``--stats FILE``).

Run it in the router namespace: ``python -m tunnel.lab.delayline
[--config FILE] [--stats FILE] [--seed N]``, the config FILE holding a
``configure`` message.
"""
from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import os
import random
import select
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from tunnel.io.tun import TunDevice
from tunnel.lab.linktrace import TRACE_QUEUE_MS, TraceQueue, load_trace

MAX_QUEUE = 100_000  # packets held per line before new ones are dropped ("queue")
READ_BATCH = 64  # packets read from one TUN per wakeup, so releases stay on time
HIST_BUCKET = 1e-5  # lateness histogram resolution: 10 us
HIST_BUCKETS = 10_000  # up to 100 ms; later releases land in the last bucket
PR_SET_TIMERSLACK = 29


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state burst loss: per packet one transition, then loss by state."""

    p_good_to_bad: float
    p_bad_to_good: float
    loss_in_bad: float = 1.0
    loss_in_good: float = 0.0

    def mean_loss(self) -> float:
        """The long-run loss rate (stationary distribution of the chain)."""
        total = self.p_good_to_bad + self.p_bad_to_good
        bad = self.p_good_to_bad / total if total else 0.0
        return bad * self.loss_in_bad + (1 - bad) * self.loss_in_good


@dataclass(frozen=True)
class LineSettings:
    """What one line does to its packets (see the module doc)."""

    tun: str
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    reorder_gap_ms: float = 10.0
    burst: Optional[GilbertElliott] = None
    outages: tuple[tuple[float, float], ...] = ()
    trace: Optional[str] = None  # an absolute path: the delay line may run in another cwd
    trace_scale: float = 1.0
    trace_queue_ms: Optional[float] = TRACE_QUEUE_MS
    trace_queue_packets: Optional[int] = None  # if set, replaces the ms limit

    def trace_key(self) -> tuple[Any, ...]:
        """What the line's trace queue is built from (a change rebuilds it)."""
        return (self.trace, self.trace_scale, self.trace_queue_ms, self.trace_queue_packets)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LineSettings:
        burst = obj.get("burst")
        return cls(**{**obj, "burst": GilbertElliott(**burst) if burst else None,
                      "outages": tuple((float(a), float(b)) for a, b in obj.get("outages", ()))})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LineStats:
    """Counters of one line; :meth:`to_json` is what ``stats`` reports."""

    received: int = 0
    sent: int = 0
    held_back: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("outage", "burst", "queue", "trace_queue", "write"), 0))
    late_sum: float = 0.0
    late_max: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * (HIST_BUCKETS + 1))

    def released(self, lateness: float) -> None:
        self.sent += 1
        self.late_sum += lateness
        if lateness > self.late_max:
            self.late_max = lateness
        self.hist[min(int(lateness / HIST_BUCKET), HIST_BUCKETS)] += 1

    def _percentile_ms(self, p: float) -> float:
        """Upper edge of the bucket holding the nearest-rank ``p`` percentile."""
        rank, seen = max(1, -(-self.sent * p // 100)), 0
        for bucket, count in enumerate(self.hist):
            seen += count
            if seen >= rank:
                return round((bucket + 1) * HIST_BUCKET * 1e3, 3)
        return 0.0

    def to_json(self, queued: int) -> dict[str, Any]:
        n = self.sent
        return {
            "in": self.received, "out": n, "dropped": dict(self.dropped),
            "held_back": self.held_back, "queued": queued,
            "lateness_ms": {
                "max": round(self.late_max * 1e3, 3),
                "mean": round(self.late_sum / n * 1e3, 3) if n else 0.0,
                "p50": self._percentile_ms(50) if n else 0.0,
                "p99": self._percentile_ms(99) if n else 0.0,
            },
        }


class Line:
    """One TUN device and the packets it holds."""

    def __init__(self, name: str, settings: LineSettings, rng: random.Random) -> None:
        self.name = name
        self.tun = TunDevice(settings.tun)
        _disable_ipv6(settings.tun)
        self.settings = settings
        self.rng = rng
        self.stats = LineStats()
        self.fifo: deque[tuple[float, bytes]] = deque()  # due times never decrease
        self.held: list[tuple[float, int, bytes]] = []  # held-back packets, a heap by due time
        self.last_due = 0.0
        self.bad = False  # Gilbert-Elliott state
        self._outages: tuple[tuple[float, float], ...] = ()
        self.trace: Optional[TraceQueue] = None  # the bottleneck queue of step 3, if any

    def configure(self, settings: LineSettings, schedule_start: float, now: float) -> None:
        if settings.tun != self.settings.tun:
            raise ValueError(f"a line cannot change its TUN ({self.settings.tun} -> {settings.tun})")
        old_trace = self.trace
        if settings.trace is None:
            self.trace = None
        elif (old_trace is None or old_trace.start != schedule_start
              or settings.trace_key() != self.settings.trace_key()):
            self.trace = TraceQueue(load_trace(settings.trace), settings.trace_scale, schedule_start,
                                    queue_ms=settings.trace_queue_ms,
                                    queue_packets=settings.trace_queue_packets)
            if old_trace is not None:
                self.trace.take_over(old_trace, now)
        self.settings = settings
        self._outages = tuple((schedule_start + a, schedule_start + b) for a, b in settings.outages)
        if old_trace is not None and self.trace is None:  # the trace is gone: its queue moves on now
            for packet in old_trace.packets:
                self._delay(packet, now)

    def in_outage(self, t: float) -> bool:
        return bool(self._outages) and any(a <= t < b for a, b in self._outages)

    def queued(self) -> int:
        n = len(self.fifo) + len(self.held)
        return n + len(self.trace.packets) if self.trace is not None else n

    def next_due(self) -> Optional[float]:
        dues = [q[0][0] for q in (self.fifo, self.held) if q]
        if self.trace is not None and (t := self.trace.next_time()) is not None:
            dues.append(t)
        return min(dues) if dues else None

    def read(self, now: float) -> None:
        """Take up to READ_BATCH packets from the TUN."""
        for _ in range(READ_BATCH):
            try:
                packet = os.read(self.tun.fd, 65535)
            except BlockingIOError:
                return
            self.accept(packet, now)

    def accept(self, packet: bytes, now: float) -> None:
        """Drop ``packet`` or queue it (steps 1-4 of the module doc)."""
        self.stats.received += 1
        cause = self._loss_cause(now)
        if cause:
            self.stats.dropped[cause] += 1
        elif self.trace is None:
            self._delay(packet, now)
        elif not self.trace.enqueue(packet, now):
            self.stats.dropped["trace_queue"] += 1

    def _delay(self, packet: bytes, now: float) -> None:
        """Give ``packet``, leaving the loss checks or the trace queue at ``now``, its due time."""
        s = self.settings
        delay = s.delay_ms + self.rng.uniform(-s.jitter_ms, s.jitter_ms) if s.jitter_ms else s.delay_ms
        due = now + max(0.0, delay) / 1e3
        if s.reorder and self.rng.random() < s.reorder:
            self.stats.held_back += 1
            heapq.heappush(self.held, (due + s.reorder_gap_ms / 1e3, self.stats.received, packet))
        else:
            self.last_due = max(due, self.last_due)
            self.fifo.append((self.last_due, packet))

    def _loss_cause(self, now: float) -> Optional[str]:
        if self.in_outage(now):
            return "outage"
        ge = self.settings.burst
        if ge is not None:
            flip = ge.p_bad_to_good if self.bad else ge.p_good_to_bad
            if self.rng.random() < flip:
                self.bad = not self.bad
            loss = ge.loss_in_bad if self.bad else ge.loss_in_good
            if loss and self.rng.random() < loss:
                return "burst"
        if self.queued() >= MAX_QUEUE:
            return "queue"
        return None

    def release(self, now: float) -> None:
        """Serve the trace queue, then write back every packet due by ``now``, in due-time order."""
        if self.trace is not None:
            self.trace.serve(now, self._delay)
        fifo, held = self.fifo, self.held
        while True:
            if fifo and (not held or fifo[0][0] <= held[0][0]):
                if fifo[0][0] > now:
                    return
                due, packet = fifo.popleft()
            elif held and held[0][0] <= now:
                due, _, packet = heapq.heappop(held)
            else:
                return
            self._write(packet, due, now)

    def _write(self, packet: bytes, due: float, now: float) -> None:
        if self.in_outage(now):
            self.stats.dropped["outage"] += 1
            return
        try:
            os.write(self.tun.fd, packet)
        except OSError:
            self.stats.dropped["write"] += 1
            return
        self.stats.released(time.monotonic() - due)

    def close(self) -> None:
        self.tun.close()


class Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave the loop."""


class DelayLine:
    """The lines, the control channel and the select loop."""

    def __init__(self, control_in: Optional[int] = 0, control_out: int = 1,
                 seed: Optional[int] = None) -> None:
        self.lines: dict[str, Line] = {}
        self.schedule_start = time.monotonic()
        self.rng = random.Random(seed)
        self.control_in = control_in
        self.control_out = control_out
        self._control_buf = b""

    # -- control --------------------------------------------------------
    def configure(self, lines: dict[str, dict[str, Any]], schedule_start: Optional[float] = None) -> None:
        if schedule_start is not None:
            self.schedule_start = float(schedule_start)
        wanted = {name: LineSettings.from_json(obj) for name, obj in lines.items()}
        for settings in wanted.values():  # a bad trace fails the command before anything changes
            if settings.trace is not None:
                load_trace(settings.trace)
        for name in list(self.lines):
            if name not in wanted or wanted[name].tun != self.lines[name].settings.tun:
                self.lines.pop(name).close()
        for name, settings in wanted.items():
            if name not in self.lines:
                self.lines[name] = Line(name, settings, self.rng)
            self.lines[name].configure(settings, self.schedule_start, time.monotonic())

    def stats(self, reset: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        out = {}
        for name, line in self.lines.items():
            out[name] = line.stats.to_json(line.queued())
            if line.trace is not None:
                line.trace.catch_up(now)
                out[name]["trace"] = line.trace.counters()
        if reset:
            for line in self.lines.values():
                line.stats = LineStats()
                if line.trace is not None:
                    line.trace.reset_counters()
        return out

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Execute one control message and return the reply."""
        try:
            cmd = msg.get("cmd")
            if cmd == "configure":
                self.configure(msg.get("lines", {}), msg.get("schedule_start"))
                return {"ok": True, "lines": sorted(self.lines),
                        "schedule_start": self.schedule_start}
            if cmd == "stats":
                return {"ok": True, "stats": self.stats(bool(msg.get("reset")))}
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as exc:  # reported to the controller, the loop goes on
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _on_control(self) -> None:
        assert self.control_in is not None
        data = os.read(self.control_in, 65536)
        if not data:  # controller closed its end: keep running without control
            self.control_in = None
            return
        self._control_buf += data
        while b"\n" in self._control_buf:
            line, self._control_buf = self._control_buf.split(b"\n", 1)
            if line.strip():
                self.reply(self.handle(json.loads(line)))

    def reply(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.control_out, data):]

    # -- loop -------------------------------------------------------------
    def _timeout(self, now: float) -> Optional[float]:
        dues = [d for d in (line.next_due() for line in self.lines.values()) if d is not None]
        return max(0.0, min(dues) - now) if dues else None

    def run(self) -> None:
        """Serve until :class:`Stop` (raised by the signal handlers)."""
        while True:
            by_fd: dict[int, Line] = {line.tun.fd: line for line in self.lines.values()}
            watch = list(by_fd) + ([self.control_in] if self.control_in is not None else [])
            readable = select.select(watch, [], [], self._timeout(time.monotonic()))[0]
            now = time.monotonic()
            for fd in readable:
                if fd == self.control_in:
                    self._on_control()  # may close lines: look them up again below
                elif (line := self.lines.get(by_fd[fd].name)) is by_fd[fd]:
                    line.read(now)
            now = time.monotonic()
            for line in list(self.lines.values()):
                line.release(now)

    def close(self) -> None:
        for line in self.lines.values():
            line.close()
        self.lines.clear()


def _disable_ipv6(ifname: str) -> None:
    """Keep the kernel's IPv6 chatter (router solicitations, MLD) out of the line.

    Written to procfs like tunnel.io.netlink does, not imported from there: that
    would pull in pyroute2 and add 0.3 s to the start-up.
    """
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # no IPv6 here: nothing to silence


def _precise_timers() -> None:
    """Timer slack 1 ns: wake up when asked, not up to 50 us later."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise Stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunnel.lab.delayline",
                                     description="user-space delay line over TUN devices")
    parser.add_argument("--config", help="JSON file holding a 'configure' message")
    parser.add_argument("--stats", help="also write the final counters to this file")
    parser.add_argument("--seed", type=int, help="seed of the random choices (default: random)")
    args = parser.parse_args(argv)
    _precise_timers()
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    delay_line = DelayLine(seed=args.seed)
    try:
        if args.config:
            with open(args.config) as f:
                reply = delay_line.handle(json.load(f))
            if not reply["ok"]:
                print(reply["error"], file=sys.stderr)
                return 1
        delay_line.reply({"ok": True, "ready": True})
        delay_line.run()
    except Stop:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the report
            signal.signal(sig, signal.SIG_IGN)
        final = {"stats": delay_line.stats()}
        delay_line.close()
        delay_line.reply(final)
        if args.stats:
            with open(args.stats, "w") as f:
                json.dump(final, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
