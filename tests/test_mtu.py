"""Tests for tunnel.wire.mtu: the arithmetic, checked against real DTLS records."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel.wire import frames, mtu
from tunnel.wire.dtls import ESTABLISHED, RECORD_OVERHEAD, DtlsListener, DtlsSession, make_context

MAX_SEQ = 2**62 - 1  # the largest DATA header (9 bytes)


def test_constants() -> None:
    assert mtu.UDP_HEADER == 8 and mtu.IP_HEADER == {4: 20, 6: 40}
    assert RECORD_OVERHEAD == 13 + 8 + 16  # DTLS header + explicit nonce + GCM tag
    assert frames.DATA_OVERHEAD == 1 + 8 + 4
    assert mtu.MIN_INNER_MTU == 576


def test_ipv4_underlay() -> None:
    assert mtu.datagram_mtu(1500) == mtu.datagram_mtu(1500, 4) == 1472
    assert mtu.inner_mtu(1500) == mtu.inner_mtu(1500, 4) == 1422


def test_ipv6_underlay() -> None:
    assert mtu.datagram_mtu(1500, 6) == 1452
    assert mtu.inner_mtu(1500, 6) == 1402


@pytest.mark.parametrize("link", [576, 1280, 1420, 1500, 9000, 65535])
@pytest.mark.parametrize("family", [4, 6])
def test_inner_mtu_is_link_minus_all_headers(link: int, family: int) -> None:
    assert mtu.inner_mtu(link, family) == link - {4: 20, 6: 40}[family] - 8 - 37 - 13
    assert mtu.inner_mtu(link, family) + frames.DATA_OVERHEAD + RECORD_OVERHEAD == mtu.datagram_mtu(link, family)


def test_unknown_family() -> None:
    with pytest.raises(KeyError):
        mtu.datagram_mtu(1500, 5)


# -- checked with real DTLS records (the pki fixture is conftest.py's) ----------------------
def session_pair(pki: Path, datagram_mtu: int, ciphers: bytes | None) -> tuple[DtlsSession, DtlsSession]:
    sctx = make_context("server", pki / "srv.crt", pki / "srv.key", pki / "ca.crt")
    cctx = make_context("client", pki / "alice.crt", pki / "alice.key", pki / "ca.crt", "srv")
    if ciphers is not None:
        for ctx in (sctx, cctx):
            ctx.set_cipher_list(ciphers)
    listener = DtlsListener(sctx, datagram_mtu)
    client = DtlsSession.client(cctx, datagram_mtu, 0.0)
    server = None
    for _ in range(10):
        for d in client.datagrams_to_send():
            if server is None:
                server, replies = listener.accept(d, ("192.0.2.1", 1), 0.0)
                for r in replies:
                    client.receive_datagram(r, 0.0)
            else:
                server.receive_datagram(d, 0.0)
        if server is not None:
            for d in server.datagrams_to_send():
                client.receive_datagram(d, 0.0)
        if client.state == ESTABLISHED and server is not None and server.state == ESTABLISHED:
            return client, server
    raise AssertionError(f"handshake failed: {client.error} / {server and server.error}")


CIPHERS = [
    (b"ECDHE-ECDSA-AES128-GCM-SHA256", "AES128-GCM", True),
    (b"ECDHE-ECDSA-AES256-GCM-SHA384", "AES256-GCM", True),
    (b"ECDHE-ECDSA-CHACHA20-POLY1305", "CHACHA20-POLY1305", False),
]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("ciphers,name,gcm", CIPHERS, ids=[c[1] for c in CIPHERS])
def test_largest_data_record_fits_underlay(pki: Path, ciphers: bytes, name: str, gcm: bool, family: int) -> None:
    limit = mtu.datagram_mtu(1500, family)
    client, server = session_pair(pki, limit, ciphers)
    assert name in client.cipher and client.cipher == server.cipher
    inner = mtu.inner_mtu(1500, family)
    packet = b"\x45" + b"x" * (inner - 1)
    record = frames.encode_data_ordered(MAX_SEQ, 255, 65535, 255, packet)  # the larger DATA header
    assert len(record) == inner + frames.DATA_OVERHEAD
    for sender, receiver in ((client, server), (server, client)):
        datagram = sender.send(record)
        assert datagram is not None
        assert len(datagram) <= limit
        if gcm:  # AES-GCM is the worst case the constant was made for: an exact fit
            assert len(datagram) == limit
        else:  # ChaCha20-Poly1305 has no explicit nonce: 8 bytes to spare
            assert len(datagram) == limit - 8
        assert receiver.receive_datagram(datagram, 0.0) == [record]
        assert frames.parse(record) == frames.DataOrdered(MAX_SEQ, 255, 65535, 1020, packet)
    assert client.cleartext_mtu >= len(record)


def test_default_cipher_choice_fits(pki: Path) -> None:
    client, server = session_pair(pki, mtu.datagram_mtu(1500), None)
    d = client.send(frames.encode_data(MAX_SEQ, b"x" * mtu.inner_mtu(1500)))
    assert d is not None and len(d) <= mtu.datagram_mtu(1500)


@pytest.mark.parametrize("link", [1280, 1420, 9000])
def test_other_link_mtus_fit(pki: Path, link: int) -> None:
    client, server = session_pair(pki, mtu.datagram_mtu(link), b"ECDHE-ECDSA-AES256-GCM-SHA384")
    record = frames.encode_data_ordered(MAX_SEQ, 1, 2, 3, b"x" * mtu.inner_mtu(link))
    d = client.send(record)
    assert d is not None and len(d) == mtu.datagram_mtu(link)
    assert server.receive_datagram(d, 0.0) == [record]
