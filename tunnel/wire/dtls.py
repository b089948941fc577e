"""Sans-IO DTLS 1.2 over pyOpenSSL memory BIOs.

Datagrams go in, datagrams and plaintext records come out; no socket is touched.
Timers are relative (``DTLSv1_get_timeout``) and turned into absolute deadlines
with the ``now`` the caller passes, so the shell owns the clock.  OpenSSL itself
still reads the real clock inside ``DTLSv1_handle_timeout`` (retransmission of a
handshake flight); that is the one place where time is not injected.

Policy enforced here, in one place:
- DTLS 1.2 only, ECDHE key exchange with AEAD ciphers only, renegotiation off;
- mutual authentication: the server requires a client certificate from its CA
  with the clientAuth usage, the client checks the server's CA, serverAuth usage
  and that the certificate names ``server_name``;
- the server answers a ClientHello with a stateless HMAC cookie
  (HelloVerifyRequest) and keeps no state before the cookie comes back.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi, lib as _lib  # error strings and the fast record path

from tunnel.wire.frames import printable

DTLS1_2_VERSION = 0xFEFD
CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
)
# Worst-case bytes a DTLS 1.2 AEAD record adds: 13 header + 8 explicit nonce + 16 tag (AES-GCM).
RECORD_OVERHEAD = 37
DTLS_HEADER = 13
CT_APPLICATION_DATA = 23
COOKIE_LIFETIME = 60.0  # seconds a cookie secret stays current (the previous one is also accepted)

HANDSHAKING, ESTABLISHED, CLOSED, FAILED = "handshaking", "established", "closed", "failed"

# The record path calls OpenSSL through pyOpenSSL's cffi binding directly: the
# Python wrappers (Connection.send/recv/bio_read/bio_write) allocate and check per
# call, ~2 us per record.  Everything else goes through the public API.
_SSL_read, _SSL_write = _lib.SSL_read, _lib.SSL_write
_BIO_read, _BIO_write = _lib.BIO_read, _lib.BIO_write
_unpack = _ffi.unpack
_RBUF = _ffi.new("char[]", 65536)  # 128 KiB per session if each had its own
_WBUF = _ffi.new("char[]", 65536)


class DtlsError(Exception):
    """Configuration of the DTLS layer is wrong (bad key, certificate or CA file)."""


def _verify_error_string(errno: int) -> str:
    return _ffi.string(_lib.X509_verify_cert_error_string(errno)).decode()


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(n) for n in san.get_values_for_type(x509.IPAddress)
    ]


def _has_usage(cert: x509.Certificate, oid) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no EKU extension means any usage (RFC 5280 4.2.1.12)
    return oid in eku


def _name_matches(cert: x509.Certificate, name: str) -> bool:
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    want = name.lower().rstrip(".")
    for dns in san.get_values_for_type(x509.DNSName):
        dns = dns.lower().rstrip(".")
        if dns == want:
            return True
        if dns.startswith("*.") and "." in want and want.split(".", 1)[1] == dns[2:]:
            return True
    return False


def common_name(cert: x509.Certificate) -> str:
    """The certificate's CN ("" if it has none), with anything unprintable escaped: it names
    the client in logs, status and the config, and a CA need not have vetted every byte."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return printable(str(attrs[0].value)) if attrs else ""


def key_id(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo: what binds a tunnel to its owner
    (a second certificate with the same CN but another key is another client)."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


@dataclass
class VerifyResult:
    """Why the peer certificate was refused (filled in by the verify callback)."""

    reason: str = ""


def make_context(
    role: str,
    certificate: str | Path,
    key: str | Path,
    ca: str | Path,
    server_name: str | None = None,
) -> SSL.Context:
    """Build a DTLS 1.2 context for ``role`` ("client" or "server").

    Raises DtlsError with the offending file named.
    """
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_max_proto_version(DTLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    ctx.set_cipher_list(CIPHERS)
    for what, path, load in (
        ("certificate", certificate, ctx.use_certificate_chain_file),
        ("key", key, lambda p: ctx.use_privatekey_file(p)),
        ("CA", ca, ctx.load_verify_locations),
    ):
        p = str(path)
        if not os.path.exists(p):
            raise DtlsError(f"{what} file {p}: not found")
        try:
            load(p)
        except (SSL.Error, OSError) as exc:
            reason = _first_error(exc)
            if what == "key" and "mismatch" in reason:
                raise DtlsError(f"key file {p} does not match certificate {certificate}") from None
            raise DtlsError(f"{what} file {p}: cannot load ({reason})") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise DtlsError(f"key file {key} does not match certificate {certificate}") from None
    if role == "server":
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_callback)
    ctx._mptun_role = role  # type: ignore[attr-defined]
    ctx._mptun_server_name = server_name  # type: ignore[attr-defined]
    return ctx


def _first_error(exc: Exception) -> str:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        return str(args[0][0][-1])
    return str(exc) or type(exc).__name__


def _verify_callback(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    result: VerifyResult = conn.get_app_data().verify
    leaf = cert.to_cryptography()
    if not ok:
        subject = common_name(leaf) or "?"
        result.reason = f"certificate '{subject}' (depth {depth}): {_verify_error_string(errno)}"
        return False
    if depth != 0:
        return True
    ctx = conn.get_context()
    if ctx._mptun_role == "server":
        if not _has_usage(leaf, ExtendedKeyUsageOID.CLIENT_AUTH):
            result.reason = f"client certificate '{common_name(leaf)}' lacks the clientAuth key usage"
            return False
    else:
        if not _has_usage(leaf, ExtendedKeyUsageOID.SERVER_AUTH):
            result.reason = f"server certificate '{common_name(leaf)}' lacks the serverAuth key usage"
            return False
        want = ctx._mptun_server_name
        if want and not _name_matches(leaf, want):
            result.reason = (
                f"server certificate names {_names(leaf) or [common_name(leaf)]}, "
                f"not the expected server_name '{want}'"
            )
            return False
    return True


def split_records(blob: bytes) -> list[bytes]:
    """Split concatenated DTLS records (what a memory BIO hands out for a flight)."""
    out, i, n = [], 0, len(blob)
    while i + DTLS_HEADER <= n:
        end = i + DTLS_HEADER + int.from_bytes(blob[i + 11 : i + 13], "big")
        out.append(blob[i:end])
        i = end
    return out


def pack_datagrams(records: list[bytes], mtu: int) -> list[bytes]:
    """Pack whole records into datagrams of at most ``mtu`` bytes."""
    out: list[bytes] = []
    cur = b""
    for rec in records:
        if cur and len(cur) + len(rec) > mtu:
            out.append(cur)
            cur = b""
        cur += rec
    if cur:
        out.append(cur)
    return out


class _ConnState:
    """Per-connection data the OpenSSL callbacks need (stored as app data)."""

    __slots__ = ("verify", "addr")

    def __init__(self, addr=None):
        self.verify = VerifyResult()
        self.addr = addr


class DtlsSession:
    """One DTLS 1.2 association, client or server side, without I/O.

    Feed it with :meth:`receive_datagram`; write with :meth:`send` (returns the
    datagram for one record); collect handshake output with
    :meth:`datagrams_to_send`; drive retransmission with :meth:`get_timer` and
    :meth:`handle_timer`.
    """

    def __init__(self, conn: SSL.Connection, is_client: bool, mtu: int, now: float):
        self._conn = conn
        self.is_client = is_client
        self.mtu = mtu  # ciphertext datagram size limit (UDP payload)
        self.state = HANDSHAKING
        self.error = ""  # why the session failed or closed
        self.records_dropped = 0  # records that decrypted to nothing (bad MAC, replays, junk)
        self.out: list[bytes] = []
        self._timer: Optional[float] = None
        self._ssl = conn._ssl  # type: ignore[attr-defined]
        self._wbio = conn._from_ssl  # type: ignore[attr-defined]
        self._rbio = conn._into_ssl  # type: ignore[attr-defined]
        self._rbuf = _RBUF  # shared: every session runs on the shell's one thread, and a
        self._wbuf = _WBUF  # buffer is only used between one OpenSSL call and the copy out of it
        conn.set_ciphertext_mtu(mtu)
        if is_client:
            self._handshake(now)

    # -- construction -------------------------------------------------
    @classmethod
    def client(cls, ctx: SSL.Context, mtu: int, now: float) -> "DtlsSession":
        conn = SSL.Connection(ctx, None)
        conn.set_app_data(_ConnState())
        conn.set_connect_state()
        return cls(conn, True, mtu, now)

    # -- properties ---------------------------------------------------
    @property
    def peer_certificate(self) -> Optional[x509.Certificate]:
        cert = self._conn.get_peer_certificate()
        return cert.to_cryptography() if cert is not None else None

    @property
    def cipher(self) -> str:
        return self._conn.get_cipher_name() or ""

    @property
    def cleartext_mtu(self) -> int:
        return self._conn.get_cleartext_mtu()

    def get_timer(self) -> Optional[float]:
        return self._timer

    # -- input --------------------------------------------------------
    def receive_datagram(self, data: bytes, now: float) -> list[bytes]:
        """Process one datagram; return the application records it carried."""
        if not data:
            return []
        if self.state is ESTABLISHED:
            size = len(data)
            _BIO_write(self._rbio, data, size)
            # Fast path: a datagram that is exactly one application-data record (what
            # mptun peers send after the handshake) needs one SSL_read, not a second
            # one to see WANT_READ, and cannot make OpenSSL write anything.
            if data[0] == CT_APPLICATION_DATA and size >= DTLS_HEADER and size == DTLS_HEADER + (
                (data[11] << 8) | data[12]
            ):
                n = _SSL_read(self._ssl, self._rbuf, 65536)
                if n > 0:
                    return [_unpack(self._rbuf, n)]
                out = self._read_error(n)
            else:
                out = self._read_records()
                self._collect()  # a retransmitted flight or an alert may need an answer
            if not out and (data[0] == CT_APPLICATION_DATA or not 20 <= data[0] <= 23):
                self.records_dropped += 1  # bad MAC, replay or junk (no DTLS content type): dropped silently
            return out
        if self.state != HANDSHAKING:
            return []
        _BIO_write(self._rbio, data, len(data))
        self._handshake(now)
        if self.state != ESTABLISHED:
            return []
        return self._read_records()

    def _read_records(self) -> list[bytes]:
        out = []
        ssl, buf = self._ssl, self._rbuf
        while True:
            n = _SSL_read(ssl, buf, 65536)
            if n <= 0:
                self._read_error(n)
                return out
            out.append(_unpack(buf, n))

    def _read_error(self, n: int) -> list:
        err = _lib.SSL_get_error(self._ssl, n)
        if err == _lib.SSL_ERROR_ZERO_RETURN:
            self._fail(CLOSED, "peer sent close_notify")
        elif err != _lib.SSL_ERROR_WANT_READ:
            self._fail(FAILED, f"DTLS error: {self._ssl_error_text()}")
        return []

    def _handshake(self, now: float) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            reason = self._conn.get_app_data().verify.reason or _first_error(exc)
            self._collect()  # the alert, if any
            self._fail(FAILED, f"handshake failed: {reason}")
            return
        else:
            self.state = ESTABLISHED
        self._collect()
        self._update_timer(now)

    def _ssl_error_text(self) -> str:
        code = _lib.ERR_get_error()
        _lib.ERR_clear_error()
        if not code:
            return "unknown"
        return _ffi.string(_lib.ERR_reason_error_string(code) or _ffi.new("char[]", b"?")).decode()

    # -- output -------------------------------------------------------
    def send(self, data: bytes) -> Optional[bytes]:
        """Encrypt one record; return the datagram to send (None if not possible)."""
        if self.state is not ESTABLISHED:
            return None
        if _SSL_write(self._ssl, data, len(data)) <= 0:
            _lib.ERR_clear_error()
            return None
        n = _BIO_read(self._wbio, self._wbuf, 65536)
        return _unpack(self._wbuf, n) if n > 0 else None

    def warm(self, data: bytes) -> None:
        """Run the record layer's send and receive code so the next real record
        finds it in cache (keep_warm, tunnel/core/warm.py); nothing reaches the peer.

        Send: ``data`` is encrypted and the record thrown away.  That uses up one
        write sequence number; the peer sees a gap, which DTLS allows.  Receive: a
        record with the highest sequence number of epoch 1 and a wrong tag is
        decrypted, fails authentication and is discarded; DTLS drops such records
        without an alert and without marking their sequence number as seen, so
        real records are unaffected (tests/test_warm.py checks it on live sessions).
        """
        if self.state is not ESTABLISHED:
            return
        if _SSL_write(self._ssl, data, len(data)) > 0:
            _BIO_read(self._wbio, self._wbuf, 65536)
        forged = _forged_record(len(data))
        _BIO_write(self._rbio, forged, len(forged))
        if _SSL_read(self._ssl, self._rbuf, 65536) > 0:  # cannot happen (no key makes that tag)
            raise AssertionError("a forged record authenticated")
        _lib.ERR_clear_error()

    def datagrams_to_send(self) -> list[bytes]:
        out, self.out = self.out, []
        return out

    def _collect(self) -> None:
        chunks = []
        while True:
            n = _BIO_read(self._wbio, self._wbuf, 65536)
            if n <= 0:
                break
            chunks.append(_unpack(self._wbuf, n))
        if chunks:
            self.out.extend(pack_datagrams(split_records(b"".join(chunks)), self.mtu))

    # -- timers -------------------------------------------------------
    def _update_timer(self, now: float) -> None:
        if self.state != HANDSHAKING:
            self._timer = None
            return
        t = self._conn.DTLSv1_get_timeout()
        self._timer = None if t is None else now + t

    def handle_timer(self, now: float) -> None:
        if self.state != HANDSHAKING or self._timer is None or now < self._timer:
            return
        try:
            self._conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._fail(FAILED, f"handshake failed: {_first_error(exc)}")
            return
        self._collect()
        self._update_timer(now)

    # -- teardown -----------------------------------------------------
    def close(self) -> None:
        """Send close_notify (collected by datagrams_to_send) and stop."""
        if self.state == ESTABLISHED:
            try:
                self._conn.shutdown()
            except SSL.Error:
                pass
            self._collect()
        if self.state not in (CLOSED, FAILED):
            self._fail(CLOSED, "closed locally")

    def _fail(self, state: str, reason: str) -> None:
        if self.state not in (CLOSED, FAILED):
            self.state = state
            self.error = reason
        self._timer = None


class CookieFactory:
    """Stateless HelloVerifyRequest cookies: HMAC(secret, peer address), secret rotated."""

    def __init__(self, secret: bytes | None = None):
        self._secrets = [secret or os.urandom(32)] * 2
        self._rotated_at: Optional[float] = None

    def rotate(self, now: float) -> None:
        if self._rotated_at is None:
            self._rotated_at = now
        elif now - self._rotated_at >= COOKIE_LIFETIME:
            self._secrets = [os.urandom(32), self._secrets[0]]
            self._rotated_at = now

    def make(self, addr, secret: bytes | None = None) -> bytes:
        msg = f"{addr[0]}|{addr[1]}".encode()
        return hmac.new(secret or self._secrets[0], msg, hashlib.sha256).digest()[:20]

    def check(self, addr, cookie: bytes) -> bool:
        return any(hmac.compare_digest(self.make(addr, s), cookie) for s in self._secrets)


def client_hello_cookie(data: bytes) -> Optional[tuple[bytes, bytes]]:
    """(cookie, epoch and record sequence number) of a datagram that starts with a whole,
    unfragmented DTLS ClientHello record; None for anything else.

    Read by hand (RFC 6347 4.1 and 4.2.1 layouts) so that a ClientHello without a valid
    cookie costs a few microseconds instead of an OpenSSL connection (~200 us): under a
    flood of ClientHellos that difference is the server's CPU.
    """
    n = len(data)
    if n < 61 or data[0] != 22 or data[13] != 1 or data[3:5] != b"\0\0":  # handshake, ClientHello, epoch 0
        return None
    end = 13 + ((data[11] << 8) | data[12])  # record end
    body = (data[14] << 16) | (data[15] << 8) | data[16]
    if end > n or data[19:22] != b"\0\0\0" or (data[22] << 16) | (data[23] << 8) | data[24] != body:
        return None  # truncated, or a fragment
    if 25 + body > end:
        return None
    i = 25 + 2 + 32 + 1 + data[59]  # version, random, session id
    if data[59] > 32 or i >= 25 + body:
        return None
    clen = data[i]
    if i + 1 + clen > 25 + body:
        return None
    return data[i + 1 : i + 1 + clen], data[3:11]


def hello_verify_request(record_seq: bytes, cookie: bytes) -> bytes:
    """The HelloVerifyRequest record OpenSSL's DTLSv1_listen sends (RFC 6347 4.2.1): version
    0xFEFF in the record and the message, message_seq 0, the ClientHello's record sequence."""
    body = b"\xfe\xff" + bytes([len(cookie)]) + cookie
    n = len(body).to_bytes(3, "big")
    hs = b"\x03" + n + b"\0\0\0\0\0" + n + body
    return b"\x16\xfe\xff" + record_seq + len(hs).to_bytes(2, "big") + hs


class DtlsListener:
    """Server side: turns the first datagrams from an address into a session.

    :meth:`accept` keeps no state for an address until its ClientHello carries
    a valid cookie; until then it only returns the HelloVerifyRequest.
    """

    def __init__(self, ctx: SSL.Context, mtu: int, cookies: CookieFactory | None = None):
        self._ctx = ctx
        self.mtu = mtu
        self.cookies = cookies or CookieFactory()
        ctx.set_cookie_generate_callback(lambda conn: self.cookies.make(conn.get_app_data().addr))
        ctx.set_cookie_verify_callback(
            lambda conn, cookie: self.cookies.check(conn.get_app_data().addr, cookie)
        )

    def accept(self, data: bytes, addr, now: float,
               admit: Optional[Callable[[], bool]] = None) -> tuple[Optional[DtlsSession], list[bytes]]:
        """Return (session or None, datagrams to send back to ``addr``).

        ``admit``, if given, is asked once the cookie is known to be valid and before
        OpenSSL does any work; False drops the ClientHello without an answer.
        """
        # Only a DTLS handshake record (content type 22) can start a session.
        if len(data) < DTLS_HEADER or data[0] != 22:
            return None, []
        self.cookies.rotate(now)
        hello = client_hello_cookie(data)
        if hello is None:
            return None, []  # not a whole ClientHello: OpenSSL would drop it too
        cookie, record_seq = hello
        if not self.cookies.check(addr, cookie):  # stateless answer without OpenSSL
            return None, [hello_verify_request(record_seq, self.cookies.make(addr))]
        if admit is not None and not admit():
            return None, []
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(_ConnState(addr))
        conn.set_accept_state()
        conn.bio_write(data)
        try:
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            try:
                reply = conn.bio_read(65536)
            except SSL.Error:
                reply = b""
            return None, [reply] if reply else []
        except SSL.Error:
            return None, []
        session = DtlsSession(conn, False, self.mtu, now)
        session._handshake(now)
        return session, session.datagrams_to_send()


_forged: dict[int, bytes] = {}


def _forged_record(size: int) -> bytes:
    """An application-data record of epoch 1 and sequence number 2**48-1 carrying
    ``size`` bytes of AES-GCM ciphertext whose tag is wrong (zeros)."""
    rec = _forged.get(size)
    if rec is None:
        body = bytes(8 + size + 16)  # explicit nonce, ciphertext, tag
        rec = _forged[size] = bytes([CT_APPLICATION_DATA, 0xFE, 0xFD, 0, 1]) + b"\xff" * 6 + len(body).to_bytes(2, "big") + body
    return rec
