"""A minimal epoll event loop: fd readers, timers, signals.

Why not asyncio: each asyncio wakeup runs ~55 us more Python than a bare
epoll loop on this machine class (UDP echo at 50 packets/s: p50 415 us with
asyncio against 356 us with epoll), and a tunnel pays it twice per hop.  With
batching both are equal for bulk traffic, so the difference is pure latency,
which is what live media through mptun cares about.  The loop does only what
the shell needs.

The loop also notes its *stalls*: time the OS (or a hypervisor taking the
vCPU away, or a SIGSTOP) did not run the process, and every packet through it
waited as long.  A stop can land in two places, and both are seen:

- while the loop waits in epoll: the wakeup comes later than the timeout it
  asked for (nothing in mptun runs meanwhile).  This is seen only as lateness
  past the next timer (at most a probe interval away while traffic flows, an
  idle probe interval on an idle tunnel), so it can show less than it held, or
  nothing;
- while callbacks run: the wakeup's callbacks (readers and timers) take wall
  time, and the thread's CPU time (CLOCK_THREAD_CPUTIME_ID, read once per
  wakeup) says how much of it was mptun's own work.  The CPU part is *busy*
  time, counted apart and never excused; the rest, when it reaches STALL, is a
  stall (so is time a callback spent blocked, e.g. on a page fault or a full
  log pipe: it should not happen, every descriptor is non-blocking).

Operators see the count and the longest in ``status`` and /metrics; tests use
the recent ones to tell a tunnel that held packets from a machine that held
the tunnel.  The CPU clock read costs about 0.18 us per wakeup (a bare loop
iteration: 600 ns before, 775 ns with it, on the 2-core lab machine).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections import deque
from typing import Callable, Optional

from tunnel.io import timerfd


log = logging.getLogger("mptun")

STALL = 0.02  # a wakeup this much later than asked, or callbacks not run (or on the CPU) this long, is noted
STALL_WARN = 0.2  # ... and logged (at most every STALL_WARN_EVERY seconds)
STALL_WARN_EVERY = 60.0
RECENT_STALLS = 64


class TimerHandle:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, tuple[Callable, tuple]] = {}
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._running = False
        self._signals: dict[int, Callable[[], None]] = {}
        self._sig_r: Optional[int] = None
        self.callback_errors = 0
        self.time = time.monotonic
        self.cpu_time = time.thread_time  # this thread's CPU time: callbacks' own work vs time not run
        self._precise: Optional[TimerHandle] = None  # the one pending call_precise
        self._timerfd: Optional[timerfd.Timerfd] = None
        self._timerfd_tried = False
        self.stalls = 0  # late wakeups, or callbacks not run for STALL or more (the OS did not run us)
        self.stall_longest = 0.0
        self.stall_total = 0.0
        self.recent_stalls: deque[tuple[float, float]] = deque(maxlen=RECENT_STALLS)  # (woke at, late by)
        self.busy = 0  # wakeups whose callbacks used STALL or more of CPU time (our own work)
        self.busy_longest = 0.0
        self._stall_warned = -STALL_WARN_EVERY

    # -- readers ------------------------------------------------------
    def add_reader(self, fd: int, callback: Callable, *args) -> None:
        if fd in self._readers:
            self._epoll.modify(fd, select.EPOLLIN)
        else:
            self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = (callback, args)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    # -- timers -------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(self.time() + delay, callback)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    def call_precise(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Like :meth:`call_later`, but to the tens of microseconds (a timerfd) where
        epoll's timeouts would round up to the next millisecond.  There is one such
        timer per loop: a new call replaces the pending one.  Without a timerfd this
        is :meth:`call_later`."""
        if self._precise is not None:
            self._precise.cancel()
        if not self._timerfd_tried:
            self._timerfd_tried = True
            self._timerfd = timerfd.create()
            if self._timerfd is not None:
                self.add_reader(self._timerfd.fileno(), self._on_timerfd)
        if self._timerfd is None:
            return self.call_later(delay, callback)
        handle = TimerHandle(self.time() + delay, callback)
        self._precise = handle
        self._timerfd.arm(handle.when)
        return handle

    def _on_timerfd(self) -> None:
        if not self._timerfd.clear():  # type: ignore[union-attr]
            return
        handle = self._precise
        if handle is None or handle.cancelled:
            self._precise = None
            return
        if self.time() < handle.when:  # an expiry of the timer this one replaced: not yet
            self._timerfd.arm(handle.when)  # type: ignore[union-attr]
            return
        self._precise = None
        self._call(handle.callback)

    # -- signals ------------------------------------------------------
    def add_signal_handler(self, sig: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` from the loop (not from the signal handler) when ``sig`` arrives."""
        if self._sig_r is None:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._sig_r, self._sig_w = r, w
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self.add_reader(r, self._on_signal_pipe)
        self._signals[sig] = callback
        signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number

    def _on_signal_pipe(self) -> None:
        try:
            data = os.read(self._sig_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            cb = self._signals.get(signum)
            if cb is not None:
                cb()

    # -- running ------------------------------------------------------
    def stop(self) -> None:
        self._running = False

    def run_forever(self) -> None:
        self._running = True
        poll, readers, timers = self._epoll.poll, self._readers, self._timers
        clock, cpu_clock = self.time, self.cpu_time
        t, cpu = clock(), cpu_clock()
        while self._running:
            timeout = -1.0
            if timers:
                asked = timers[0][0]  # when poll must return at the latest
                if asked < t:
                    asked = t
                timeout = asked - t
            events = poll(timeout)
            woke = clock()
            if timeout >= 0.0 and woke - asked >= STALL:
                self._stalled(woke, woke - asked)
            for fd, _ in events:
                entry = readers.get(fd)
                if entry is not None:
                    try:  # inline rather than self._call: one frame less per wakeup
                        entry[0](*entry[1])
                    except Exception as exc:
                        self._failed(entry[0], exc)
            if timers:
                now = clock()
                while timers and timers[0][0] <= now:
                    handle = heapq.heappop(timers)[2]
                    if not handle.cancelled:
                        self._call(handle.callback)
            # the callbacks' time: its CPU part is ours, the rest the OS did not run us.  One
            # clock read more per wakeup: the CPU time, read once, also starts the next span
            # (which then includes the poll syscall's few microseconds of CPU).
            t, was = clock(), cpu
            cpu = cpu_clock()
            if t - woke >= STALL:
                self._ran_long(t, t - woke, cpu - was)

    def _ran_long(self, end: float, wall: float, cpu: float) -> None:
        """The callbacks of one wakeup took ``wall`` seconds, ``cpu`` of them on the CPU.  A
        stall found here is recorded as ending at ``end``: where in the callbacks it fell is
        not known (``wall`` is at most ``cpu`` more than the stall)."""
        if cpu >= STALL:
            self.busy += 1
            self.busy_longest = max(self.busy_longest, cpu)
        if wall - cpu >= STALL:
            self._stalled(end, wall - cpu)

    def _stalled(self, woke: float, late: float) -> None:
        """epoll returned ``late`` seconds after the timeout it was given: the process was not run."""
        self.stalls += 1
        self.stall_total += late
        self.stall_longest = max(self.stall_longest, late)
        self.recent_stalls.append((woke, late))
        if late >= STALL_WARN and woke - self._stall_warned >= STALL_WARN_EVERY:
            self._stall_warned = woke
            log.warning("mptun was not run for %.0f ms (the machine was busy or the vCPU was taken away); "
                        "packets through the tunnel waited as long (%d such stalls so far, see status)",
                        late * 1e3, self.stalls)

    def stall_stats(self) -> dict:
        """For status and /metrics: the stalls so far and the recent ones (monotonic times)."""
        return {
            "stalls": self.stalls,
            "stall_longest_ms": round(self.stall_longest * 1e3, 1),
            "stall_total_ms": round(self.stall_total * 1e3, 1),
            "busy": self.busy,
            "busy_longest_ms": round(self.busy_longest * 1e3, 1),
            "now": self.time(),
            "recent_stalls": [[round(t, 4), round(late * 1e3, 1)] for t, late in self.recent_stalls],
        }

    def _call(self, callback: Callable, *args) -> None:
        """Run one callback; a bug in one must not take the tunnel down (it is logged and counted)."""
        try:
            callback(*args)
        except Exception as exc:
            self._failed(callback, exc)

    def _failed(self, callback: Callable, exc: Exception) -> None:
        self.callback_errors += 1
        log.error("internal error in %s: %s: %s", getattr(callback, "__qualname__", callback), type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)

    def close(self) -> None:
        if self._sig_r is not None:
            signal.set_wakeup_fd(-1)
            for sig in self._signals:
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._sig_r)
            os.close(self._sig_w)
            self._sig_r = None
        if self._timerfd is not None:
            self._timerfd.close()
            self._timerfd = None
        self._epoll.close()
