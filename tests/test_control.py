"""The control socket (tunnel/app/control.py) served from a real EventLoop on a thread, over real
Unix sockets: slow or silent clients never block the loop, and connections are capped."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tunnel.app import control
from tunnel.app.control import ControlServer
from tunnel.io.loop import EventLoop

BIG = {"tunnels": [], "handshaking": 0, "counters": {}, "padding": "x" * 4_000_000}  # a reply no socket buffer holds


class Running:
    """A ControlServer in an EventLoop on a thread, with a heartbeat timer measuring the loop's
    longest gap between two wakeups (a blocked loop shows as a long gap)."""

    BEAT = 0.005

    def __init__(self, path: Path, status, **kw):
        self.loop = EventLoop()
        self.server = ControlServer(path, status, **kw)
        self.server.start(self.loop)
        self.stop_flag = threading.Event()
        self.longest_gap = 0.0
        self._last = None
        self.loop.call_later(self.BEAT, self._beat)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self.longest_gap = max(self.longest_gap, now - self._last)
        self._last = now
        if self.stop_flag.is_set():
            self.loop.stop()
        else:
            self.loop.call_later(self.BEAT, self._beat)

    def call(self, fn) -> None:
        """Run ``fn`` in the loop's thread (the loop is not thread-safe) and wait for it."""
        done = threading.Event()
        self.loop.call_later(0, lambda: (fn(), done.set()))
        assert done.wait(5)

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.server.close()
        assert self.loop.callback_errors == 0
        self.loop.close()


@pytest.fixture
def serve(tmp_path: Path):
    started: list[Running] = []

    def start(status, **kw) -> Running:
        r = Running(tmp_path / f"ctl{len(started)}.sock", status, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))  # blocking: waits while the listen backlog is full
    s.settimeout(5)
    return s


def wait_until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


def test_status_round_trip_and_counters(serve) -> None:
    r = serve(lambda: {"tunnels": [], "handshaking": 0, "counters": {"x": 1}})
    st = control.query(r.server.path)
    assert st["counters"] == {"x": 1}
    assert st["control"] == {"served": 0, "refused": 0, "timed_out": 0}  # as they were when asked
    assert control.query(r.server.path)["control"]["served"] == 1
    with pytest.raises(OSError, match="unknown command"):
        control.query(r.server.path, "reboot")


def test_slow_readers_do_not_block_the_loop(serve) -> None:
    """Three clients ask for a status bigger than any socket buffer and never read: the loop
    goes on (before: blocked up to 1 s per such client), a fourth client gets its answer at
    once, and the slow ones are dropped at their deadline."""
    r = serve(lambda: BIG, timeout=1.5)
    slow = []
    try:
        for _ in range(3):
            s = connect(r.server.path)
            s.sendall(b"status\n")
            slow.append(s)
        wait_until(lambda: r.server.counters["served"] == 3)
        t0 = time.monotonic()
        st = control.query(r.server.path, timeout=5)
        took = time.monotonic() - t0
        assert len(st["padding"]) == len(BIG["padding"])
        assert took < 0.5, f"the answer took {took:.2f} s behind slow readers"
        assert r.longest_gap < 0.3, f"the loop was blocked for {r.longest_gap * 1e3:.0f} ms"
        # the slow readers are cut off at their deadline: what they then read ends early
        wait_until(lambda: r.server.counters["timed_out"] == 3, timeout=5)
        for s in slow:
            got = b""
            while chunk := s.recv(1 << 20):
                got += chunk
            assert 0 < len(got) < len(BIG["padding"]) and not got.endswith(b"\n")
        assert r.longest_gap < 0.3
    finally:
        for s in slow:
            s.close()


def test_a_client_that_never_asks_is_dropped_at_its_deadline(serve) -> None:
    r = serve(lambda: {"tunnels": []}, timeout=0.3)
    s = connect(r.server.path)
    try:
        s.sendall(b"sta")  # no newline: an incomplete request
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
        assert 0.2 < time.monotonic() - t0 < 3
        assert r.server.counters["timed_out"] == 1
    finally:
        s.close()


def test_connections_over_the_cap_are_closed_and_counted(serve) -> None:
    r = serve(lambda: {"tunnels": []}, timeout=1.0)
    n = ControlServer.MAX_CONNS
    hogs = [connect(r.server.path) for _ in range(n + 3)]
    try:
        wait_until(lambda: r.server.counters["refused"] == 3)
        assert len(r.server._conns) == n
        closed = []
        for s in hogs:
            s.settimeout(0)
            try:
                if s.recv(1) == b"":
                    closed.append(s)
            except BlockingIOError:
                pass
        assert len(closed) == 3  # the three last ones: closed at once, not queued
        # the held ones time out and then there is room again
        wait_until(lambda: r.server.counters["timed_out"] == n, timeout=5)
        assert control.query(r.server.path)["control"]["refused"] == 3
    finally:
        for s in hogs:
            s.close()
