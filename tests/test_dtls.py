"""Tests for tunnel.wire.dtls: the sans-IO DTLS 1.2 layer, driven entirely in memory."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from tunnel.wire import dtls, frames
from tunnel.app.certs import create_ca, issue_client, issue_server
from tunnel.wire.dtls import (
    CLOSED,
    ESTABLISHED,
    FAILED,
    HANDSHAKING,
    CookieFactory,
    DtlsError,
    DtlsListener,
    DtlsSession,
    make_context,
    pack_datagrams,
    split_records,
)

ADDR = ("198.18.0.2", 40000)
OTHER = ("198.18.0.3", 40000)
MTU = 1472
CT_HANDSHAKE, CT_ALERT, CT_APPDATA = 22, 21, 23
HELLO_VERIFY_REQUEST = 3
DTLS_HEADER_LEN = dtls.DTLS_HEADER


# -- PKI -----------------------------------------------------------------------
def _extra_cert(pki: Path, name: str, eku: list | None) -> None:
    """A client cert signed by the CA with an arbitrary EKU (None: no EKU extension)."""
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    (pki / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    create_ca(d)
    issue_server(d, "srv", sans=["srv", "vpn.example.org", "*.wild.example.org", "198.18.0.1"])
    issue_client(d, "alice")
    issue_client(d, "old", not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    _extra_cert(d, "noeku", None)
    _extra_cert(d, "mailer", [ExtendedKeyUsageOID.EMAIL_PROTECTION])
    other = d / "other"
    create_ca(other, name="Other CA")
    issue_client(other, "mallory")
    issue_server(other, "srv")
    return d


def server_ctx(pki: Path, name: str = "srv", ca: Path | None = None) -> SSL.Context:
    return make_context("server", pki / f"{name}.crt", pki / f"{name}.key", ca or pki / "ca.crt")


def client_ctx(pki: Path, name: str = "alice", server_name: str | None = "srv", ca: Path | None = None):
    return make_context("client", pki / f"{name}.crt", pki / f"{name}.key", ca or pki / "ca.crt", server_name)


class Wire:
    """Moves datagrams between one client session and a listener/its session; logs sizes."""

    def __init__(self, client: DtlsSession, listener: DtlsListener, addr=ADDR):
        self.client, self.listener, self.addr = client, listener, addr
        self.server: DtlsSession | None = None
        self.c2s: list[bytes] = []
        self.s2c: list[bytes] = []

    def run(self, now: float = 0.0, rounds: int = 12) -> "Wire":
        for _ in range(rounds):
            moved = False
            for d in self.client.datagrams_to_send():
                moved = True
                self.c2s.append(d)
                if self.server is None:
                    self.server, replies = self.listener.accept(d, self.addr, now)
                    for r in replies:
                        self.s2c.append(r)
                        self.client.receive_datagram(r, now)
                else:
                    self.server.receive_datagram(d, now)
            if self.server is not None:
                for d in self.server.datagrams_to_send():
                    moved = True
                    self.s2c.append(d)
                    self.client.receive_datagram(d, now)
            if not moved:
                break
        return self


def connect(cctx, sctx, mtu: int = MTU) -> Wire:
    return Wire(DtlsSession.client(cctx, mtu, 0.0), DtlsListener(sctx, mtu)).run()


@pytest.fixture
def pair(pki: Path) -> tuple[DtlsSession, DtlsSession]:
    w = connect(client_ctx(pki), server_ctx(pki))
    assert w.client.state == w.server.state == ESTABLISHED
    return w.client, w.server


# -- handshake -------------------------------------------------------------------
def test_handshake_dtls12_ecdhe_aead(pki: Path) -> None:
    w = connect(client_ctx(pki), server_ctx(pki))
    c, s = w.client, w.server
    assert c.state == s.state == ESTABLISHED
    assert c.error == s.error == ""
    assert c._conn.get_protocol_version_name() == s._conn.get_protocol_version_name() == "DTLSv1.2"
    assert c.cipher == s.cipher
    assert c.cipher.startswith("ECDHE-") and ("GCM" in c.cipher or "CHACHA20-POLY1305" in c.cipher)
    assert dtls.common_name(s.peer_certificate) == "alice"
    assert dtls.common_name(c.peer_certificate) == "srv"
    assert c.get_timer() is None and s.get_timer() is None
    assert s.receive_datagram(c.send(b"ping"), 0.0) == [b"ping"]
    assert c.receive_datagram(s.send(b"pong"), 0.0) == [b"pong"]
    # every handshake datagram starts with a DTLS 1.x handshake/ccs record
    assert all(d[0] in (CT_HANDSHAKE, 20) and d[1] == 0xFE for d in w.c2s + w.s2c)


def test_first_client_hello_gets_stateless_hello_verify_request(pki: Path) -> None:
    client = DtlsSession.client(client_ctx(pki), MTU, 0.0)
    assert client.state == HANDSHAKING and client.get_timer() is not None
    (hello,) = client.datagrams_to_send()
    cookies = CookieFactory(b"k" * 32)
    listener = DtlsListener(server_ctx(pki), MTU, cookies)
    session, replies = listener.accept(hello, ADDR, 0.0)
    assert session is None
    (hvr,) = replies
    assert hvr[0] == CT_HANDSHAKE and hvr[DTLS_HEADER_LEN] == HELLO_VERIFY_REQUEST
    # the listener remembered nothing: the same ClientHello gets the same answer again
    assert listener.accept(hello, ADDR, 0.0) == (None, [hvr])
    client.receive_datagram(hvr, 0.0)
    (hello2,) = client.datagrams_to_send()
    # stateless: a different listener with the same cookie secret accepts the cookie
    other = DtlsListener(server_ctx(pki), MTU, CookieFactory(b"k" * 32))
    session, replies = other.accept(hello2, ADDR, 0.0)
    assert isinstance(session, DtlsSession) and session.state == HANDSHAKING and replies
    for r in replies:
        client.receive_datagram(r, 0.0)
    for d in client.datagrams_to_send():
        session.receive_datagram(d, 0.0)
    for d in session.datagrams_to_send():
        client.receive_datagram(d, 0.0)
    assert client.state == session.state == ESTABLISHED



def test_cookie_for_another_address_gets_no_session(pki: Path) -> None:
    client = DtlsSession.client(client_ctx(pki), MTU, 0.0)
    listener = DtlsListener(server_ctx(pki), MTU)
    _, (hvr,) = listener.accept(client.datagrams_to_send()[0], ADDR, 0.0)
    client.receive_datagram(hvr, 0.0)
    (hello2,) = client.datagrams_to_send()
    session, replies = listener.accept(hello2, OTHER, 0.0)
    assert session is None
    assert all(r[0] == CT_HANDSHAKE and r[DTLS_HEADER_LEN] == HELLO_VERIFY_REQUEST for r in replies)
    # the owner of the address gets its session
    session, _ = listener.accept(hello2, ADDR, 0.0)
    assert session is not None


def test_cookie_factory_rotation() -> None:
    f = CookieFactory(b"s" * 32)
    cookie = f.make(ADDR)
    assert len(cookie) == 20 and f.check(ADDR, cookie)
    assert not f.check(OTHER, cookie) and not f.check(("198.18.0.2", 40001), cookie)
    assert f.make(ADDR) == CookieFactory(b"s" * 32).make(ADDR) != CookieFactory(b"t" * 32).make(ADDR)
    f.rotate(100.0)  # first call only starts the clock
    f.rotate(100.0 + dtls.COOKIE_LIFETIME - 1)
    assert f.make(ADDR) == cookie
    f.rotate(100.0 + dtls.COOKIE_LIFETIME)
    assert f.make(ADDR) != cookie
    assert f.check(ADDR, cookie)  # the previous secret is still accepted
    f.rotate(100.0 + 2 * dtls.COOKIE_LIFETIME)
    assert not f.check(ADDR, cookie)


def _fail_handshake(cctx, sctx) -> Wire:
    w = connect(cctx, sctx)
    assert w.server is not None, "the cookie exchange must succeed"
    return w


def test_client_from_other_ca_refused(pki: Path) -> None:
    w = _fail_handshake(client_ctx(pki / "other", "mallory", ca=pki / "ca.crt"), server_ctx(pki))
    assert w.server.state == FAILED
    assert "unable to get local issuer certificate" in w.server.error
    assert "mallory" in w.server.error
    assert w.client.state == FAILED  # it got the alert
    assert w.client.send(b"x") is None and w.server.send(b"x") is None


def test_server_from_other_ca_refused(pki: Path) -> None:
    w = _fail_handshake(client_ctx(pki), server_ctx(pki / "other", ca=pki / "ca.crt"))
    assert w.client.state == FAILED
    assert "unable to get local issuer certificate" in w.client.error
    assert w.server.state != ESTABLISHED


def test_client_refuses_server_not_named_server_name(pki: Path) -> None:
    w = _fail_handshake(client_ctx(pki, server_name="other.example.org"), server_ctx(pki))
    assert w.client.state == FAILED
    assert "not the expected server_name 'other.example.org'" in w.client.error
    assert "vpn.example.org" in w.client.error  # it says what the certificate does name
    assert w.server.state == FAILED


@pytest.mark.parametrize("name", ["srv", "VPN.example.org", "vpn.example.org.", "x.wild.example.org", "198.18.0.1"])
def test_client_accepts_server_names_in_san(pki: Path, name: str) -> None:
    w = connect(client_ctx(pki, server_name=name), server_ctx(pki))
    assert w.client.state == ESTABLISHED, w.client.error


@pytest.mark.parametrize("name", ["wild.example.org", "a.b.wild.example.org", "198.18.0.2", "example.org"])
def test_client_refuses_near_miss_names(pki: Path, name: str) -> None:
    w = connect(client_ctx(pki, server_name=name), server_ctx(pki))
    assert w.client.state == FAILED and "server_name" in w.client.error


def test_client_cert_without_client_auth_refused(pki: Path) -> None:
    # the server's own certificate has only serverAuth
    w = _fail_handshake(client_ctx(pki, "srv"), server_ctx(pki))
    assert w.server.state == FAILED
    assert "'srv'" in w.server.error and _wrong_purpose(w.server.error, "clientAuth")
    w = _fail_handshake(client_ctx(pki, "mailer"), server_ctx(pki))
    assert w.server.state == FAILED and _wrong_purpose(w.server.error, "clientAuth")


def _wrong_purpose(error: str, usage: str) -> bool:
    # OpenSSL's own purpose check ("unsuitable certificate purpose") may fire before
    # mptun's verify callback gets to say "lacks the <usage> key usage"
    return f"lacks the {usage} key usage" in error or "unsuitable certificate purpose" in error


def test_client_cert_without_eku_extension_accepted(pki: Path) -> None:
    w = connect(client_ctx(pki, "noeku"), server_ctx(pki))
    assert w.server.state == ESTABLISHED and dtls.common_name(w.server.peer_certificate) == "noeku"


def test_server_cert_without_server_auth_refused(pki: Path) -> None:
    w = _fail_handshake(client_ctx(pki, server_name="alice"), server_ctx(pki, "alice"))
    assert w.client.state == FAILED
    assert "'alice'" in w.client.error and _wrong_purpose(w.client.error, "serverAuth")


def test_expired_client_refused(pki: Path) -> None:
    w = _fail_handshake(client_ctx(pki, "old"), server_ctx(pki))
    assert w.server.state == FAILED and "certificate has expired" in w.server.error


def test_client_without_certificate_refused(pki: Path) -> None:
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.load_verify_locations(str(pki / "ca.crt"))
    w = Wire(DtlsSession.client(ctx, MTU, 0.0), DtlsListener(server_ctx(pki), MTU)).run()
    assert w.server.state == FAILED and w.server.error.startswith("handshake failed")


@pytest.mark.parametrize("ciphers", [b"ECDHE-ECDSA-AES128-SHA", b"ECDHE-ECDSA-AES256-SHA384", b"AES128-GCM-SHA256"])
def test_non_ecdhe_or_non_aead_cipher_refused(pki: Path, ciphers: bytes) -> None:
    cctx = client_ctx(pki)
    cctx.set_cipher_list(ciphers)
    w = _fail_handshake(cctx, server_ctx(pki))
    assert w.server.state == FAILED and "no shared cipher" in w.server.error
    assert w.client.state == FAILED


def test_dtls10_client_refused(pki: Path) -> None:
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(0xFEFF)
    ctx.set_max_proto_version(0xFEFF)  # DTLS 1.0
    ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
    w = Wire(DtlsSession.client(ctx, MTU, 0.0), DtlsListener(server_ctx(pki), MTU)).run()
    assert w.client.state == FAILED
    assert w.server is None or w.server.state == FAILED


def test_cipher_policy_constant() -> None:
    names = dtls.CIPHERS.decode().split(":")
    assert names and all(n.startswith("ECDHE-") for n in names)
    assert all(n.endswith(("GCM-SHA256", "GCM-SHA384", "CHACHA20-POLY1305")) for n in names)


# -- records -----------------------------------------------------------------------
def test_flipped_byte_dropped_and_counted(pair) -> None:
    c, s = pair
    good = c.send(b"hello")
    assert good[0] == CT_APPDATA
    for i in (DTLS_HEADER_LEN + 2, len(good) - 1):  # ciphertext and tag
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert s.receive_datagram(bytes(bad), 0.0) == []
    assert s.records_dropped == 2
    assert s.state == ESTABLISHED and s.error == ""
    # the genuine record (same sequence number) still gets through, and later ones too
    assert s.receive_datagram(good, 0.0) == [b"hello"]
    assert s.receive_datagram(c.send(b"next"), 0.0) == [b"next"]
    assert c.receive_datagram(s.send(b"back"), 0.0) == [b"back"]
    assert s.records_dropped == 2


def test_replayed_record_dropped(pair) -> None:
    c, s = pair
    d1, d2 = c.send(b"one"), c.send(b"two")
    assert s.receive_datagram(d2, 0.0) == [b"two"]
    assert s.receive_datagram(d1, 0.0) == [b"one"]  # reordering is fine
    assert s.receive_datagram(d1, 0.0) == []
    assert s.receive_datagram(d2, 0.0) == []
    assert s.records_dropped == 2 and s.state == ESTABLISHED
    assert s.receive_datagram(c.send(b"three"), 0.0) == [b"three"]


def test_junk_application_record_dropped(pair) -> None:
    c, s = pair
    junk = bytes([CT_APPDATA, 0xFE, 0xFD, 0, 1]) + bytes(6) + (40).to_bytes(2, "big") + bytes(40)
    assert s.receive_datagram(junk, 0.0) == []
    assert s.records_dropped == 1 and s.state == ESTABLISHED
    assert s.receive_datagram(c.send(b"ok"), 0.0) == [b"ok"]


def test_one_frame_per_record_and_several_records_per_datagram(pair) -> None:
    c, s = pair
    d = c.send(frames.encode(frames.Ping(7))) + c.send(frames.encode_data(1, b"\x45" * 20))
    assert s.receive_datagram(d, 0.0) == [frames.encode(frames.Ping(7)), frames.encode_data(1, b"\x45" * 20)]


def test_close_sends_close_notify(pair) -> None:
    c, s = pair
    c.close()
    assert c.state == CLOSED and c.error == "closed locally"
    out = c.datagrams_to_send()
    assert out and all(d[0] == CT_ALERT for d in out)
    for d in out:
        assert s.receive_datagram(d, 0.0) == []
    assert s.state == CLOSED and s.error == "peer sent close_notify"
    assert s.records_dropped == 0
    assert s.send(b"x") is None and c.send(b"x") is None
    c.close()  # idempotent
    assert c.datagrams_to_send() == [] and c.error == "closed locally"
    assert s.receive_datagram(b"\x17" * 30, 0.0) == []  # input after close is ignored


def test_close_during_handshake(pki: Path) -> None:
    c = DtlsSession.client(client_ctx(pki), MTU, 0.0)
    c.datagrams_to_send()
    c.close()
    assert c.state == CLOSED and c.get_timer() is None and c.datagrams_to_send() == []


def test_send_before_established_is_none(pki: Path) -> None:
    c = DtlsSession.client(client_ctx(pki), MTU, 0.0)
    assert c.send(b"too early") is None


def test_handshake_timer_is_relative_to_now(pki: Path) -> None:
    c = DtlsSession.client(client_ctx(pki), MTU, 1000.0)
    t = c.get_timer()
    assert t is not None and 1000.0 < t <= 1000.0 + 60
    c.datagrams_to_send()
    c.handle_timer(t - 0.5)  # not due: nothing happens
    assert c.datagrams_to_send() == [] and c.state == HANDSHAKING


def test_empty_datagram_ignored_when_established(pair) -> None:
    c, s = pair
    assert s.receive_datagram(b"", 0.0) == []
    assert c.receive_datagram(b"", 0.0) == []
    assert s.state == c.state == ESTABLISHED
    assert s.receive_datagram(c.send(b"still up"), 0.0) == [b"still up"]


def test_empty_datagram_ignored_while_handshaking(pki: Path) -> None:
    c = DtlsSession.client(client_ctx(pki), MTU, 0.0)
    c.datagrams_to_send()
    assert c.receive_datagram(b"", 0.0) == []
    assert c.state == HANDSHAKING


# -- listener input filtering ------------------------------------------------------------
@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x16",
        b"\x16" * 12,
        b"\x16" * 13,
        b"\x17" * 100,  # application data from nobody
        b"\x15\xfe\xfd" + bytes(10) + b"\x00\x02\x02\x28",  # an alert
        b"\x16\xfe\xfd" + bytes(10) + b"\x00\x10" + b"\x01" * 16,  # handshake-typed garbage
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_listener_ignores_junk(pki: Path, junk: bytes) -> None:
    listener = DtlsListener(server_ctx(pki), MTU)
    assert listener.accept(junk, ADDR, 0.0) == (None, [])


def test_listener_ignores_truncated_client_hello(pki: Path) -> None:
    (hello,) = DtlsSession.client(client_ctx(pki), MTU, 0.0).datagrams_to_send()
    listener = DtlsListener(server_ctx(pki), MTU)
    for n in (13, 20, len(hello) // 2, len(hello) - 1):
        assert listener.accept(hello[:n], ADDR, 0.0) == (None, [])


# -- record splitting and MTU ----------------------------------------------------------------
def _record(ctype: int, body: bytes) -> bytes:
    return bytes([ctype, 0xFE, 0xFD]) + bytes(8) + len(body).to_bytes(2, "big") + body


def test_split_records() -> None:
    recs = [_record(22, b"a" * 100), _record(20, b"\x01"), _record(22, b""), _record(23, b"z" * 1400)]
    assert split_records(b"".join(recs)) == recs
    assert split_records(b"") == []
    assert split_records(recs[0] + b"\x16\xfe\xfd") == [recs[0]]  # trailing partial header dropped


def test_pack_datagrams_respects_mtu() -> None:
    recs = [_record(22, bytes(n)) for n in (487, 487, 487, 100, 1200, 10)]  # 500, 500, 500, 113, 1213, 23 bytes
    out = pack_datagrams(recs, 1200)
    assert b"".join(out) == b"".join(recs)  # order and content kept, records never split
    assert [len(d) for d in out] == [1000, 613, 1213, 23]
    assert all(len(d) <= 1200 for d in out if len(split_records(d)) > 1)
    assert pack_datagrams(recs, 100000) == [b"".join(recs)]
    assert pack_datagrams([], 1200) == []
    assert [len(d) for d in pack_datagrams(recs[:3], 1000)] == [1000, 500]


@pytest.mark.parametrize("mtu", [400, 576, 1232])
def test_handshake_flights_fit_small_mtu(pki: Path, mtu: int) -> None:
    w = connect(client_ctx(pki), server_ctx(pki), mtu)
    assert w.client.state == w.server.state == ESTABLISHED
    assert max(len(d) for d in w.c2s + w.s2c) <= mtu
    # the certificate flight did need several datagrams
    assert len(w.s2c) > 2


def test_cleartext_mtu(pair) -> None:
    c, s = pair
    assert c.mtu == s.mtu == MTU
    assert c.cleartext_mtu >= MTU - dtls.RECORD_OVERHEAD


# -- contexts ------------------------------------------------------------------------
def test_make_context_missing_file(pki: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(DtlsError, match=f"certificate file {missing}: not found"):
        make_context("server", missing, pki / "srv.key", pki / "ca.crt")
    with pytest.raises(DtlsError, match="CA file .*: not found"):
        make_context("client", pki / "alice.crt", pki / "alice.key", missing, "srv")


def test_make_context_bad_files(pki: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("garbage\n")
    with pytest.raises(DtlsError, match=f"key file {junk}: cannot load"):
        make_context("server", pki / "srv.crt", junk, pki / "ca.crt")
    key = pki / "alice.key"
    with pytest.raises(DtlsError, match=rf"key file {key}.*(mismatch|does not match)"):
        make_context("server", pki / "srv.crt", key, pki / "ca.crt")
