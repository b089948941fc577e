"""The epoll event loop: readers, timers in order, cancellation, signals."""

import os
import signal
import socket
import time

from tunnel.io.loop import EventLoop


def test_timers_fire_in_order_and_cancelled_ones_do_not():
    loop = EventLoop()
    fired = []
    loop.call_later(0.02, lambda: fired.append("b"))
    loop.call_later(0.01, lambda: fired.append("a"))
    loop.call_later(0.015, lambda: fired.append("x")).cancel()
    loop.call_later(0.03, loop.stop)
    loop.run_forever()
    loop.close()
    assert fired == ["a", "b"]


def test_reader_gets_called_with_its_arguments_until_removed():
    loop = EventLoop()
    a, b = socket.socketpair()
    a.setblocking(False)
    got = []

    def on_read(tag):
        got.append((tag, a.recv(100)))
        if len(got) == 2:
            loop.remove_reader(a.fileno())
            loop.call_later(0.01, loop.stop)

    loop.add_reader(a.fileno(), on_read, "t")
    b.send(b"one")
    loop.call_later(0.01, lambda: b.send(b"two"))
    loop.call_later(2.0, loop.stop)  # deadline: the test fails on the assert, not by hanging
    loop.run_forever()
    loop.close()
    assert got == [("t", b"one"), ("t", b"two")]


def test_signal_runs_its_callback_from_the_loop():
    loop = EventLoop()
    seen = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: (seen.append("usr1"), loop.stop()))
    loop.call_later(0.01, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    loop.call_later(2.0, loop.stop)
    loop.run_forever()
    loop.close()
    assert seen == ["usr1"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_precise_timer_fires_once_not_early_and_a_new_one_replaces_it():
    loop = EventLoop()
    fired = []

    def at(tag):
        return lambda: fired.append((tag, loop.time()))

    start = loop.time()
    first = loop.call_precise(0.002, at("replaced"))
    second = loop.call_precise(0.003, at("second"))
    assert first.cancelled and not second.cancelled
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert [tag for tag, _ in fired] == ["second"]
    assert fired[0][1] >= second.when >= start + 0.003  # never before its time
    cancelled = loop.call_precise(0.001, at("cancelled"))
    cancelled.cancel()
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert [tag for tag, _ in fired] == ["second"]
    assert loop._timerfd is not None  # Linux: a timerfd, not the millisecond timers
    loop.close()


def test_timerfd_is_readable_only_after_it_fired():
    import select
    import time

    from tunnel.io import timerfd

    t = timerfd.create()
    assert t is not None
    ep = select.epoll()
    ep.register(t.fileno(), select.EPOLLIN)
    try:
        assert not t.clear()  # not armed: nothing to read
        t.arm(time.monotonic() - 1.0)  # in the past: fires at once
        assert ep.poll(1.0) and t.clear()
        t.arm(time.monotonic() + 0.05)
        t.disarm()
        assert ep.poll(0.1) == [] and not t.clear()
        when = time.monotonic() + 0.004
        t.arm(when)
        assert ep.poll(1.0) and time.monotonic() >= when and t.clear()
    finally:
        ep.close()
        t.close()


def test_precise_timer_ignores_an_expiry_that_is_not_its_own():
    loop = EventLoop()
    fired = []
    handle = loop.call_precise(0.05, lambda: fired.append(loop.time()))
    loop._timerfd.arm(loop.time() - 1.0)  # a stale expiry (e.g. of the timer it replaced)
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert fired == []  # not run early
    loop.call_later(0.1, loop.stop)
    loop.run_forever()
    loop.close()
    assert len(fired) == 1 and fired[0] >= handle.when  # re-armed, and run at its time


class _ScriptedClock:
    """Monotonic seconds that jump where the script says (the loop's clock is injectable)."""

    def __init__(self, start: float):
        self.t = start
        self.jumps: dict[int, float] = {}  # call number -> seconds added before answering
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        self.t += self.jumps.pop(self.calls, 0.0)
        return self.t


def test_a_late_wakeup_is_a_stall_and_a_timely_one_is_not():
    loop = EventLoop()
    clock = _ScriptedClock(100.0)
    loop.time = clock
    fired = []
    loop.call_later(0.01, lambda: fired.append(clock.t))  # due at 100.01
    loop.call_later(0.02, loop.stop)  # due at 100.02
    # run_forever: call 3 is "before poll", call 4 "poll returned": epoll came back 0.3 s past 100.01
    clock.jumps[4] = 0.31
    loop.run_forever()
    st = loop.stall_stats()
    loop.close()
    assert fired == [100.31]
    assert st["stalls"] == 1, st
    assert st["stall_longest_ms"] == st["stall_total_ms"] == 300.0, st
    assert st["recent_stalls"] == [[100.31, 300.0]], st
    assert st["busy"] == 0, st


def test_callbacks_that_run_long_are_busy_not_stalls():
    loop = EventLoop()
    a, b = socket.socketpair()
    a.setblocking(False)
    wall = []

    def slow_reader():
        a.recv(10)
        t0, end = time.monotonic(), time.thread_time() + 0.03
        while time.thread_time() < end:  # 30 ms of our own work (CPU time: a noisy machine may preempt us)
            pass
        wall.append(time.monotonic() - t0)
        loop.stop()

    loop.add_reader(a.fileno(), slow_reader)
    loop.call_later(2.0, loop.stop)
    b.send(b"x")
    loop.run_forever()
    st = loop.stall_stats()
    loop.close()
    assert st["busy"] == 1 and st["busy_longest_ms"] >= 30.0, st
    # the work is never a stall; only time we were preempted meanwhile can be one
    assert st["stall_total_ms"] <= (wall[0] - 0.03) * 1e3 + 1.0, (st, wall)


class _ManualClock:
    def __init__(self, start: float):
        self.t = start

    def __call__(self) -> float:
        return self.t


def _one_wakeup(what: str, wall: float, cpu: float) -> dict:
    """One wakeup whose reader (or timer) callback takes ``wall`` seconds of which ``cpu``
    on the CPU (injected clocks); the loop's stall/busy figures after it."""
    loop = EventLoop()
    clock, cpu_clock = _ManualClock(100.0), _ManualClock(5.0)
    loop.time, loop.cpu_time = clock, cpu_clock
    a, b = socket.socketpair()
    a.setblocking(False)

    def callback():
        if what == "reader":
            a.recv(10)
        clock.t += wall
        cpu_clock.t += cpu
        loop.stop()

    if what == "reader":
        loop.add_reader(a.fileno(), callback)
        b.send(b"x")
        loop.call_later(30.0, loop.stop)  # not reached: the clock is manual
    else:
        loop.call_later(0.0, callback)
    loop.run_forever()
    st = loop.stall_stats()
    loop.close()
    a.close()
    b.close()
    return st


def test_a_stop_while_a_reader_runs_is_a_stall_not_busy_time():
    # SIGSTOP (a busy host, a taken vCPU) lands inside a callback: 1 s passes, no CPU time
    st = _one_wakeup("reader", 1.0, 0.0)
    assert st["stalls"] == 1 and st["stall_longest_ms"] == st["stall_total_ms"] == 1000.0, st
    assert st["recent_stalls"] == [[101.0, 1000.0]], st  # (when it ended, how long)
    assert st["busy"] == 0 and st["busy_longest_ms"] == 0.0, st


def test_a_stop_while_a_timer_runs_is_a_stall():
    st = _one_wakeup("timer", 0.5, 0.001)
    assert st["stalls"] == 1 and st["stall_longest_ms"] == 499.0, st
    assert st["busy"] == 0, st


def test_cpu_time_in_callbacks_is_busy_and_the_rest_a_stall():
    st = _one_wakeup("reader", 0.05, 0.05)  # all of it our own work
    assert (st["busy"], st["busy_longest_ms"], st["stalls"]) == (1, 50.0, 0), st
    st = _one_wakeup("reader", 0.5, 0.1)  # 100 ms of work, preempted for 400 ms meanwhile
    assert (st["busy"], st["busy_longest_ms"]) == (1, 100.0), st
    assert (st["stalls"], st["stall_longest_ms"]) == (1, 400.0), st
    st = _one_wakeup("reader", 0.015, 0.01)  # short: neither
    assert (st["busy"], st["stalls"]) == (0, 0), st
