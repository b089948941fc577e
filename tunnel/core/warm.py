"""keep_warm: run the packet path on a dummy packet just before a periodic one is due.

Measured in this project's lab: a packet that arrives after ~20 ms of idleness
(media at 50 packets/s) spends 2-3x longer in the Python packet path than one
that follows another closely, because the interpreter's code and data, and
OpenSSL's, have left the CPU caches in between -- and on a shared machine they
leave within a millisecond.  Media is periodic, so the next packet's arrival can
be predicted from the last interval; a short train of dummy passes over the same
code (:data:`TRAIN`: 1.2, 0.6 and 0.1 ms before it is due) brings that code back
into cache just in time.  The shell runs the passes on a timerfd
(tunnel/io/timerfd.py): epoll's millisecond timeouts are too coarse for this.

:class:`Warmer` predicts and plans (sans-IO, the shell feeds it arrivals and
runs the timer); :func:`warm_pass` is the core's part of one pass (the shell
also drains its fds, which runs its own read code).  Nothing a pass does is
visible outside the process: the dummy record is encrypted and thrown away (a
gap in the DTLS sequence numbers, which DTLS allows), a forged record fails
authentication, and no counter, scheduler or window state changes.  Cost: at
most len(TRAIN) passes per real wakeup, only for flows between MIN_INTERVAL and
MAX_INTERVAL apart (bulk traffic keeps the caches warm by itself and gets none).
"""

from __future__ import annotations

from typing import Hashable, Optional

from tunnel.wire import frames
from tunnel.core.dedup import DedupWindow
from tunnel.core.path import Path
from tunnel.core.policy import Policy

# An IPv4/UDP packet between two documentation addresses (never sent anywhere).
PACKET = (
    bytes([0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2])
    + bytes([0x13, 0x88, 0x13, 0x88, 0, 40, 0, 0])
    + bytes(32)
)
# Passes this long before the predicted arrival.  Measured (docs/LATENCY.md): one pass
# 1.5 ms ahead on epoll's timer, one 1.0 ms ahead, two, three or four passes on a timerfd
# with the last one 0.1 to 0.45 ms ahead: these three did best.  A single pass closer
# than ~0.6 ms is worse (a packet that comes a little early gets no pass at all).
TRAIN = (0.0012, 0.0006, 0.0001)
SKIP = 0.0002  # no pass if real I/O ran the code this recently
MIN_INTERVAL = 0.003  # closer packets keep the caches warm themselves
MAX_INTERVAL = 0.25  # longer gaps are not a periodic flow worth a pass
_scratch = DedupWindow(64)  # private: exercises the window's code, not a tunnel's state


def warm_pass(policy: Policy, path: Path) -> None:
    """One pass over the send and receive code (crypto included) for ``path``."""
    c = policy.classify(PACKET)
    policy.outer_tos(c, PACKET)
    record = frames.encode_data(1, PACKET)
    path.dtls.warm(record)
    frames.parse_data(record)
    _scratch.accept(1)


class Warmer:
    """When to warm: the next arrival from a source is predicted one interval
    (the last one) after this one, and a pass is planned :data:`TRAIN` ahead of it."""

    __slots__ = ("_last", "_due")

    def __init__(self) -> None:
        self._last: dict[Hashable, float] = {}  # source -> time of its last wakeup with data
        self._due: list[float] = []  # planned passes, earliest first

    def arrival(self, source: Hashable, now: float) -> bool:
        """Data arrived from ``source`` (a TUN or a socket).  True if that planned a
        new train of passes (replacing the one before)."""
        last = self._last.get(source)
        self._last[source] = now
        if last is None:
            return False
        interval = now - last
        if MIN_INTERVAL <= interval <= MAX_INTERVAL:
            due = now + interval
            self._due = [due - lead for lead in TRAIN]
            return True
        return False

    def next_pass(self) -> Optional[float]:
        """When the next planned pass is due, or None."""
        return self._due[0] if self._due else None

    def take(self, now: float) -> bool:
        """Called when the timer fires: drop the passes due by ``now``; True if there was one."""
        due = self._due
        n = 0
        while n < len(due) and due[n] <= now:
            n += 1
        if n:
            del due[:n]
        return n > 0

    def forget(self, source: Hashable) -> None:
        self._last.pop(source, None)
