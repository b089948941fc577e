"""A one-shot timer with microsecond precision that epoll can wait on (Linux timerfd).

Why: ``epoll.poll`` takes its timeout in whole milliseconds, rounded up, so a
timer of the event loop fires up to 1 ms late.  keep_warm (tunnel/core/warm.py) must
run its passes a few hundred microseconds before a packet is due; a timerfd in
the same epoll set fires on time.  Python 3.13 has ``os.timerfd_create``; on
older Pythons the three libc calls go through ctypes (written by hand: there is
no maintained package for three syscalls).  :func:`create` returns None where
neither works, and the caller falls back to the loop's millisecond timers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

CLOCK_MONOTONIC = 1  # the clock of time.monotonic() on Linux
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Timerfd:
    """One timer: :meth:`arm` at an absolute ``time.monotonic()`` instant; the fd
    turns readable then; :meth:`clear` reads it back to not readable."""

    def __init__(self, fd: int, settime) -> None:
        self._fd = fd
        self._settime = settime

    def fileno(self) -> int:
        return self._fd

    def arm(self, when: float) -> None:
        """Fire at ``when`` (seconds of CLOCK_MONOTONIC); a past instant fires at once."""
        self._settime(max(when, 1e-9))

    def disarm(self) -> None:
        self._settime(0.0)

    def clear(self) -> bool:
        """Consume an expiration; False if the timer had not fired."""
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _with_os() -> Optional[Timerfd]:
    fd = os.timerfd_create(CLOCK_MONOTONIC, flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC)  # type: ignore[attr-defined]

    def settime(when: float) -> None:
        os.timerfd_settime(fd, flags=os.TFD_TIMER_ABSTIME, initial=when)  # type: ignore[attr-defined]

    return Timerfd(fd, settime)


def _with_ctypes() -> Optional[Timerfd]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    create, settime_c = libc.timerfd_create, libc.timerfd_settime
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    settime_c.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    fd = create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
    if fd < 0:
        return None
    spec = _Itimerspec()
    value, ref = spec.it_value, ctypes.byref(spec)

    def settime(when: float) -> None:
        sec = int(when)
        value.tv_sec, value.tv_nsec = sec, int((when - sec) * 1e9)
        if settime_c(fd, TFD_TIMER_ABSTIME, ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return Timerfd(fd, settime)


def create() -> Optional[Timerfd]:
    """A new timer, or None where the platform has no timerfd."""
    try:
        return _with_os() if hasattr(os, "timerfd_create") else _with_ctypes()
    except (OSError, AttributeError, TypeError):
        return None
