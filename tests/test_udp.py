"""GSO/GRO batching on real loopback sockets."""

import socket

import pytest

from tunnel.io.udp import BatchSocket, _runs


def _pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return BatchSocket(tx), BatchSocket(rx), rx.getsockname()


def test_runs_split_on_size_changes_and_limits():
    d = [b"a" * 100] * 3 + [b"b" * 50] + [b"c" * 100] * 2 + [b"d" * 200]
    assert [len(r) for r in _runs(d)] == [4, 2, 1]  # a shorter datagram ends a run
    assert [len(r) for r in _runs([b"x" * 1000] * 100)] == [64, 36]
    assert [len(r) for r in _runs([b"x" * 1400] * 50)] == [46, 4]  # 65000-byte cap


def test_gso_send_and_gro_receive_keep_datagram_boundaries():
    tx, rx, addr = _pair()
    sent = [bytes([i]) * 1200 for i in range(20)] + [b"tail"]
    errors = []
    tx.send_batch(sent, addr, errors.append)
    assert not errors and tx.gso
    got, calls = [], 0
    rx.sock.settimeout(0.5)
    while len(got) < len(sent):
        dgrams, _, _ = rx.recv_batch()
        got += dgrams
        calls += 1
    assert got == sent
    if rx.gro:
        assert calls < len(sent)  # GRO handed over a train of datagrams in one call


def test_unconnected_batch_of_one_and_connected_socket():
    tx, rx, addr = _pair()
    tx.sock.connect(addr)
    tx.send_batch([b"one"], None, pytest.fail)
    tx.send_batch([b"x" * 10, b"y" * 10], None, pytest.fail)
    got = []
    while len(got) < 3:
        got += rx.recv_batch()[0]
    assert got == [b"one", b"x" * 10, b"y" * 10]


def test_outer_tos_goes_out_with_each_batch_and_is_read_back():
    """The TOS byte travels as ancillary data on send and comes back via IP_RECVTOS."""
    tx, rx, addr = _pair()
    seen = {}
    tx.send_batch([b"ef"], addr, pytest.fail, tos=0xB8)
    tx.send_batch([b"a" * 100] * 5, addr, pytest.fail, tos=0x02)  # a GSO run, ECT(0)
    tx.send_batch([b"plain"], addr, pytest.fail)
    while sum(len(v) for v in seen.values()) < 7:
        dgrams, _, tos = rx.recv_batch()
        seen.setdefault(tos, []).extend(dgrams)
    assert seen == {0xB8: [b"ef"], 0x02: [b"a" * 100] * 5, 0: [b"plain"]}
