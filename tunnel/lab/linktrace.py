"""Trace-driven links: a cellular capacity trace (mahimahi's format) and the drop-tail queue it serves.

Why: a fixed tbf rate says nothing about a phone in a moving car, whose
capacity swings from nothing to tens of Mbit/s within seconds.  Recorded
traces replay that; the format is mahimahi's (Netravali et al., USENIX ATC
2015), so its published traces and any recorded with its tools work as they
are.  The delay line (:mod:`tunnel.lab.delayline`) owns one
:class:`TraceQueue` per line that has a trace; this module holds no I/O
beyond reading the file and takes the time as an argument, so the queue can
be tested with a manual clock.

Trace format: one integer per line, milliseconds from the start of the trace;
each line is one opportunity for :data:`OPPORTUNITY_BYTES` to leave the
bottleneck (a millisecond with room for several packets repeats its line).
The times never decrease; the trace repeats with a period of its last time;
an opportunity with nothing queued is lost (no credit builds up).  Blank
lines are ignored.

Serving, as mahimahi's LinkQueue does it: each opportunity carries
``scale * OPPORTUNITY_BYTES`` bytes.  The head packet takes what it still
needs; a packet bigger than what is left goes on in the next opportunity
(so x0.5 halves the rate for full-size packets too), and several small
packets share one opportunity.  The rate-scale factor therefore multiplies
*bytes per opportunity*, not the number of opportunities: x8 costs the
delay line no more wake-ups than x1.  Bytes an opportunity does not use are
lost.

Queue: drop-tail, sized in packets or in milliseconds.  A time limit becomes
a byte limit at the trace's scaled *mean* rate (a real modem buffers bytes,
not time): 200 ms of an ATT-LTE uplink at x8 (15.3 Mbit/s mean) is 382 kB.
When the rate dips below the mean, that queue holds more than 200 ms, as a
deep cellular buffer does.  The trace's clock starts at ``start`` (the delay
line's schedule start, shared with its outage windows).
"""
from __future__ import annotations

import os
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

OPPORTUNITY_BYTES = 1500  # bytes one trace line lets through (times the scale)
TRACE_QUEUE_MS = 200.0  # default queue: 200 ms at the trace's scaled mean rate (deep, like a modem's)
MIN_QUEUE_BYTES = 2 * OPPORTUNITY_BYTES  # a time limit never holds less than two full packets
TRACES_DIR = Path(__file__).resolve().parent / "traces"  # the traces shipped with the lab


class TraceError(ValueError):
    """A trace that cannot be used; str() names the file (and line)."""


@dataclass(frozen=True)
class Trace:
    """A parsed trace: opportunity times within one period, in ms and in seconds."""

    path: str
    times_ms: tuple[int, ...]

    @cached_property
    def times_s(self) -> list[float]:
        """The times in seconds, computed once per trace and shared by the queues that use it."""
        return [t / 1e3 for t in self.times_ms]

    @property
    def period_ms(self) -> int:
        return self.times_ms[-1]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def mean_mbit(self, scale: float = 1.0) -> float:
        """The long-run rate (Mbit/s) at full use of every opportunity."""
        return len(self.times_ms) * OPPORTUNITY_BYTES * 8 * scale / (self.period_ms * 1e3)

    def bytes_between(self, t0_ms: float, t1_ms: float, scale: float = 1.0) -> float:
        """Capacity (bytes) of the opportunities at times in ``[t0_ms, t1_ms)`` of the trace's clock."""
        return scale * OPPORTUNITY_BYTES * (self._count_before(t1_ms) - self._count_before(t0_ms))

    def _count_before(self, t_ms: float) -> int:
        """Opportunities at times < ``t_ms``.  The last line of each period lies at the
        period's end, so period ``q - 1`` reaches into ``[q * period, ...)``."""
        cycles, rest = divmod(t_ms, self.period_ms)
        q = int(cycles)
        if q == 0:
            return bisect_left(self.times_ms, rest)
        return ((q - 1) * len(self.times_ms) + bisect_left(self.times_ms, rest + self.period_ms)
                + bisect_left(self.times_ms, rest))


def resolve_trace(name: str, base: Optional[Path] = None) -> Path:
    """The file a trace setting names: a path (relative to ``base``, else the working
    directory), or else the name of a trace shipped in :data:`TRACES_DIR`.

    Raises :class:`TraceError` if neither exists.
    """
    given = Path(name).expanduser()
    candidate = given if given.is_absolute() else (base or Path.cwd()) / given
    if candidate.exists():
        return candidate.resolve()
    if given.name == name and (TRACES_DIR / name).exists():
        return TRACES_DIR / name
    shipped = ", ".join(sorted(p.name for p in TRACES_DIR.glob("*.*") if p.suffix in (".up", ".down")))
    raise TraceError(f"trace {name!r} not found (looked for {candidate} and among the shipped "
                     f"traces: {shipped})")


def load_trace(path: str | Path) -> Trace:
    """Read and check a trace file (cached while the file is unchanged).

    Raises :class:`TraceError` naming the file: unreadable, empty, a line that
    is not a non-negative integer, times that go backwards, or a last time of
    0 (a trace must last for some time, or it would repeat forever at one instant).
    """
    p = os.path.abspath(path)
    try:
        stat = os.stat(p)
    except OSError as exc:
        raise TraceError(f"{p}: cannot read the trace: {exc.strerror}") from None
    return _load(p, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int) -> Trace:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    try:
        times = tuple(int(word) for word in text.split())
        bad = next((t for t in times if t < 0), None)
    except ValueError:
        bad = True
    if bad is not None:
        lineno, line = next((i, ln) for i, ln in enumerate(text.splitlines(), 1)
                            if ln.strip() and not ln.strip().isdigit())
        raise TraceError(f"{path}: line {lineno}: {line.strip()[:40]!r} is not a time in ms "
                         "(a non-negative integer)")
    if not times:
        raise TraceError(f"{path}: the trace is empty (expected one time in ms per line)")
    back = next((i for i in range(1, len(times)) if times[i] < times[i - 1]), None)
    if back is not None:
        raise TraceError(f"{path}: entry {back + 1}: time {times[back]} goes back "
                         f"(after {times[back - 1]}); times must not decrease")
    if times[-1] == 0:
        raise TraceError(f"{path}: the trace lasts 0 ms (its last time must be > 0)")
    return Trace(path, times)


def queue_limit_bytes(trace: Trace, scale: float, queue_ms: float) -> int:
    """A ``queue_ms`` limit as bytes at the trace's scaled mean rate (see the module doc)."""
    return max(MIN_QUEUE_BYTES, int(trace.mean_mbit(scale) * 1e6 / 8 * queue_ms / 1e3))


class TraceQueue:
    """A drop-tail queue served at a trace's opportunities; the caller supplies the time.

    :meth:`enqueue` at arrival; :meth:`serve` hands every packet whose last
    byte leaves by ``now`` to ``emit(packet, departure_time)``;
    :meth:`next_time` says when to call :meth:`serve` again (None: empty).
    The cursor (the next opportunity) only moves while packets wait; an
    arrival to an empty queue skips to the first opportunity at or after it,
    counting those passed as wasted.
    """

    def __init__(self, trace: Trace, scale: float, start: float, *,
                 queue_ms: Optional[float] = TRACE_QUEUE_MS,
                 queue_packets: Optional[int] = None) -> None:
        if scale <= 0:
            raise ValueError(f"trace scale must be positive, not {scale}")
        self.trace = trace
        self.scale = scale
        self._times = trace.times_s
        self._n = len(self._times)
        self._period = trace.period_ms / 1e3
        self._op_bytes = scale * OPPORTUNITY_BYTES
        self.limit_packets = queue_packets if queue_packets is not None else 1 << 62
        self.limit_bytes = (1 << 62 if queue_packets is not None or queue_ms is None
                            else queue_limit_bytes(trace, scale, queue_ms))
        self.packets: deque[bytes] = deque()
        self.bytes = 0
        self._head_left = 0.0  # bytes of the head packet not yet sent
        self.start = start
        self._cycle = 0  # the cursor: opportunity _index of period _cycle ...
        self._index = 0
        self._next = start + self._times[0]  # ... at this time
        # counters
        self.dropped = 0
        self.used = 0
        self.wasted = 0
        self.sent_bytes = 0
        self.max_packets = 0

    def reset_counters(self) -> None:
        self.dropped = self.used = self.wasted = self.sent_bytes = 0
        self.max_packets = len(self.packets)

    def take_over(self, old: TraceQueue, now: float) -> None:
        """Keep ``old``'s waiting packets and counters (a reconfigured line loses neither)."""
        self.packets, self.bytes, self._head_left = old.packets, old.bytes, old._head_left
        self.dropped, self.used, self.wasted = old.dropped, old.used, old.wasted
        self.sent_bytes, self.max_packets = old.sent_bytes, old.max_packets
        if self.packets:
            self._seek(now)

    def enqueue(self, packet: bytes, now: float) -> bool:
        """Queue ``packet`` arriving at ``now``; False if the queue is full (tail drop)."""
        size = len(packet)
        packets = self.packets
        if len(packets) >= self.limit_packets or self.bytes + size > self.limit_bytes:
            self.dropped += 1
            return False
        if not packets:
            self._seek(now)
            self._head_left = size
        packets.append(packet)
        self.bytes += size
        if len(packets) > self.max_packets:
            self.max_packets = len(packets)
        return True

    def next_time(self) -> Optional[float]:
        return self._next if self.packets else None

    def serve(self, now: float, emit: Callable[[bytes, float], Any]) -> None:
        """Use every opportunity up to ``now`` while packets wait."""
        packets = self.packets
        while packets and self._next <= now:
            t = self._next
            budget = self._op_bytes
            while packets and budget > 0:
                if self._head_left > budget:
                    self._head_left -= budget
                    self.sent_bytes += budget
                    break
                budget -= self._head_left
                self.sent_bytes += self._head_left
                packet = packets.popleft()
                self.bytes -= len(packet)
                emit(packet, t)
                if packets:
                    self._head_left = len(packets[0])
            self.used += 1
            self._advance()

    def catch_up(self, now: float) -> None:
        """Count the opportunities an idle queue has let pass by ``now`` as wasted."""
        if not self.packets:
            self._seek(now)

    def _advance(self) -> None:
        self._index += 1
        if self._index == self._n:
            self._index = 0
            self._cycle += 1
        self._next = self.start + self._cycle * self._period + self._times[self._index]

    def _seek(self, now: float) -> None:
        """Move the cursor to the first opportunity at or after ``now``; the skipped ones are wasted."""
        if self._next >= now:
            return
        cycle, rest = divmod(now - self.start, self._period)
        index = bisect_left(self._times, rest)
        if index == 0 and rest == 0 and cycle >= 1:  # the last line(s) of the previous period lie at now
            cycle, index = cycle - 1, bisect_left(self._times, self._period)
        elif index == self._n:
            cycle, index = cycle + 1, 0
        cycle = int(cycle)
        skipped = (cycle - self._cycle) * self._n + index - self._index
        if skipped > 0:
            self.wasted += skipped
            self._cycle, self._index = cycle, index
            self._next = self.start + cycle * self._period + self._times[index]

    def counters(self) -> dict[str, Any]:
        """What the delay line reports under ``"trace"``."""
        return {"file": self.trace.name, "scale": self.scale,
                "queued_packets": len(self.packets), "queued_bytes": self.bytes,
                "max_queued_packets": self.max_packets,
                "limit_packets": self.limit_packets if self.limit_packets < 1 << 62 else None,
                "limit_bytes": self.limit_bytes if self.limit_bytes < 1 << 62 else None,
                "dropped": self.dropped, "opportunities_used": self.used,
                "opportunities_wasted": self.wasted, "sent_bytes": round(self.sent_bytes)}
