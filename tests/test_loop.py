"""The epoll event loop: readers, timers in order, cancellation, signals."""

import os
import signal
import socket

from tunnel.loop import EventLoop


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
