"""Tests for tunnel.app.certs: CA/server/client issuing, checks and the `certs` CLI."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from tunnel.app import certs
from tunnel.app.certs import CertError, create_ca, issue_client, issue_server, load_identity

UTC = dt.timezone.utc


def read(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, cls: type) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(cls).value


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    create_ca(d)
    return d


def test_create_ca(tmp_path: Path) -> None:
    d = tmp_path / "new" / "dir"
    crt, key = create_ca(d, name="Test CA")
    assert (crt, key) == (d / "ca.crt", d / "ca.key")
    ca = read(crt)
    assert cn(ca) == "Test CA" and ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(ca, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ext(ca, x509.SubjectKeyIdentifier)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= dt.timedelta(days=3650)


def test_server_and_client_chain(pki: Path) -> None:
    ca = read(pki / "ca.crt")
    s_crt, s_key = issue_server(pki, "mptun-server")
    c_crt, c_key = issue_client(pki, "alice")
    assert (s_crt, s_key, c_crt, c_key) == (
        pki / "mptun-server.crt", pki / "mptun-server.key", pki / "alice.crt", pki / "alice.key")
    server, client = read(s_crt), read(c_crt)
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
        assert not ext(cert, x509.BasicConstraints).ca
        ku = ext(cert, x509.KeyUsage)
        assert ku.digital_signature and ku.key_agreement and not ku.key_cert_sign
        aki = ext(cert, x509.AuthorityKeyIdentifier)
        assert aki.key_identifier == ext(ca, x509.SubjectKeyIdentifier).digest
        assert cert.serial_number != ca.serial_number
    assert cn(server) == "mptun-server" and cn(client) == "alice"
    assert list(ext(server, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(ext(client, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # no SANs given: the name is the SAN
    assert ext(server, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == ["mptun-server"]
    # validity starts a little in the past to tolerate clock skew
    now = dt.datetime.now(UTC)
    assert now - dt.timedelta(minutes=10) < server.not_valid_before_utc < now
    assert server.not_valid_after_utc - now > dt.timedelta(days=824)
    load_identity(s_crt, s_key)
    load_identity(c_crt, c_key)


def test_server_sans_dns_and_ip(pki: Path) -> None:
    crt, _ = issue_server(pki, "srv", sans=["vpn.example.org", "198.18.0.1", "2001:db8::1"])
    san = ext(read(crt), x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["vpn.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("198.18.0.1"), ipaddress.ip_address("2001:db8::1")]


def test_file_modes(pki: Path) -> None:
    crt, key = issue_client(pki, "bob")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pki / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(crt).st_mode) == 0o644
    assert [p.name for p in pki.iterdir() if p.name.endswith(".tmp")] == []


def test_key_mode_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _, key = create_ca(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_refuse_overwrite_unless_forced(pki: Path) -> None:
    crt, key = issue_client(pki, "alice")
    before = crt.read_bytes()
    with pytest.raises(CertError, match=r"alice\.(crt|key) exists; use --force to overwrite"):
        issue_client(pki, "alice")
    assert crt.read_bytes() == before
    with pytest.raises(CertError, match=r"ca\.(crt|key) exists; use --force"):
        create_ca(pki)
    issue_client(pki, "alice", force=True)
    assert crt.read_bytes() != before
    load_identity(crt, key)


def test_force_tightens_existing_key_mode(pki: Path) -> None:
    _, key = issue_client(pki, "alice")
    os.chmod(key, 0o644)
    issue_client(pki, "alice", force=True)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_missing_ca_names_path(tmp_path: Path) -> None:
    with pytest.raises(CertError) as e:
        issue_server(tmp_path, "srv")
    msg = str(e.value)
    assert str(tmp_path / "ca.crt") in msg
    assert f"mptun certs ca --dir {tmp_path}" in msg
    assert not (tmp_path / "srv.key").exists()
    with pytest.raises(CertError, match="not found"):
        issue_client(tmp_path / "new", "alice")
    assert not (tmp_path / "new").exists()  # nothing created on failure


def test_ca_dir_elsewhere(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    crt, key = issue_client(out, "carol", ca_dir=pki)
    read(crt).verify_directly_issued_by(read(pki / "ca.crt"))
    assert not (out / "ca.crt").exists()


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "../x", ".hidden", "-x", "a b", "ca", "x" * 65])
def test_bad_names_rejected(pki: Path, name: str) -> None:
    with pytest.raises(CertError):
        issue_client(pki, name)
    with pytest.raises(CertError):
        issue_server(pki, name)


def test_load_identity_mismatch_names_file(pki: Path) -> None:
    a_crt, _ = issue_client(pki, "alice")
    _, b_key = issue_client(pki, "bob")
    with pytest.raises(CertError, match="does not match") as e:
        load_identity(a_crt, b_key)
    assert str(b_key) in str(e.value) and str(a_crt) in str(e.value)


def test_load_identity_bad_pem_and_missing(pki: Path) -> None:
    crt, key = issue_client(pki, "alice")
    bad = pki / "garbage.crt"
    bad.write_text("not a certificate\n")
    with pytest.raises(CertError, match="not a valid PEM certificate") as e:
        load_identity(bad, key)
    assert str(bad) in str(e.value)
    with pytest.raises(CertError, match="not a valid PEM private key") as e:
        load_identity(crt, bad)
    assert str(bad) in str(e.value)
    with pytest.raises(CertError, match="not a valid PEM private key"):
        load_identity(crt, crt)  # cert given as key
    missing = pki / "nope.key"
    with pytest.raises(CertError, match="not found") as e:
        load_identity(crt, missing)
    assert str(missing) in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_load_identity_unreadable(pki: Path) -> None:
    crt, key = issue_client(pki, "alice")
    os.chmod(key, 0)
    with pytest.raises(CertError, match="not readable"):
        load_identity(crt, key)


def test_expired_and_not_yet_valid(pki: Path) -> None:
    now = dt.datetime.now(UTC)
    crt, key = issue_client(pki, "old", not_after=now - dt.timedelta(days=1))
    old = read(crt)
    assert old.not_valid_after_utc < now and old.not_valid_before_utc < old.not_valid_after_utc
    load_identity(crt, key)  # expiry is the handshake's business, not load_identity's
    crt, _ = issue_server(pki, "future", not_before=now + dt.timedelta(days=1))
    future = read(crt)
    assert future.not_valid_before_utc > now
    assert future.not_valid_after_utc > future.not_valid_before_utc
    with pytest.raises(CertError, match="must be after"):
        issue_client(pki, "x", not_before=now, not_after=now - dt.timedelta(hours=1))


def test_rsa_keys(tmp_path: Path) -> None:
    create_ca(tmp_path, key_type="rsa", rsa_bits=2048)
    crt, key = issue_server(tmp_path, "srv", key_type="rsa", rsa_bits=2048)
    cert = read(crt)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
    ku = ext(cert, x509.KeyUsage)
    assert ku.digital_signature and ku.key_encipherment
    cert.verify_directly_issued_by(read(tmp_path / "ca.crt"))
    load_identity(crt, key)


def test_pyopenssl_dtls_context_accepts_pair(pki: Path) -> None:
    crt, key = issue_server(pki, "srv")
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.use_certificate_file(str(crt))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()
    ctx.load_verify_locations(str(pki / "ca.crt"))


X509_V_ERR_CERT_HAS_EXPIRED = 10


def _dtls_handshake(pki: Path, server: str, client: str, verify_errors: list[int] | None = None
                    ) -> SSL.Connection:
    """Run an in-memory DTLS handshake with mutual auth; return the server side.

    Verification error numbers seen by either side are appended to verify_errors.
    """
    def verify(conn: SSL.Connection, cert: object, errnum: int, depth: int, ok: int) -> bool:
        if not ok and verify_errors is not None:
            verify_errors.append(errnum)
        return bool(ok)

    def ctx(name: str) -> SSL.Context:
        c = SSL.Context(SSL.DTLS_METHOD)
        c.use_certificate_file(str(pki / f"{name}.crt"))
        c.use_privatekey_file(str(pki / f"{name}.key"))
        c.load_verify_locations(str(pki / "ca.crt"))
        c.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return c

    srv = SSL.Connection(ctx(server), None)
    srv.set_accept_state()
    cli = SSL.Connection(ctx(client), None)
    cli.set_connect_state()
    for _ in range(20):
        done = 0
        for a, b in ((cli, srv), (srv, cli)):
            try:
                a.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            while True:
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    break
        if done == 2:
            return srv
    raise AssertionError("handshake did not finish")


def test_dtls_handshake_mutual_auth(pki: Path) -> None:
    issue_server(pki, "srv")
    issue_client(pki, "alice")
    srv = _dtls_handshake(pki, "srv", "alice")
    assert srv.get_protocol_version_name() == "DTLSv1.2"
    assert cn(srv.get_peer_certificate().to_cryptography()) == "alice"


def test_dtls_handshake_rejects_expired_client(pki: Path) -> None:
    issue_server(pki, "srv")
    issue_client(pki, "old", not_after=dt.datetime.now(UTC) - dt.timedelta(days=1))
    errors: list[int] = []
    with pytest.raises(SSL.Error):
        _dtls_handshake(pki, "srv", "old", errors)
    assert errors == [X509_V_ERR_CERT_HAS_EXPIRED]


# --------------------------------------------------------------------------
# CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mptun")
    certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_ca_server_client_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "c")
    assert run_cli(["certs", "ca", "--dir", d, "--name", "Lab CA", "--days", "30"]) == 0
    out = capsys.readouterr().out
    assert f"{d}/ca.crt" in out and f"{d}/ca.key" in out
    assert run_cli(["certs", "server", "--dir", d, "--name", "srv",
                    "--san", "vpn.example.org", "--san", "10.0.0.1"]) == 0
    assert f"{d}/srv.crt" in capsys.readouterr().out
    assert run_cli(["certs", "client", "--dir", d, "--name", "alice", "--days", "7"]) == 0
    assert f"{d}/alice.key" in capsys.readouterr().out
    assert cn(read(Path(d, "ca.crt"))) == "Lab CA"
    alice = read(Path(d, "alice.crt"))
    assert dt.timedelta(days=6) < alice.not_valid_after_utc - dt.datetime.now(UTC) <= dt.timedelta(days=7)

    assert run_cli(["certs", "show", f"{d}/srv.crt"]) == 0
    out = capsys.readouterr().out
    assert "CN=srv" in out and "CN=Lab CA" in out
    assert "vpn.example.org" in out and "10.0.0.1" in out and "serverAuth" in out


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert run_cli(["certs", "client", "--dir", d, "--name", "alice"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("mptun certs: error: ") and f"{d}/ca.crt" in err[0]

    assert run_cli(["certs", "ca", "--dir", d]) == 0
    capsys.readouterr()
    assert run_cli(["certs", "ca", "--dir", d]) == 2
    assert capsys.readouterr().err == (
        f"mptun certs: error: {d}/ca.crt exists; use --force to overwrite\n")
    assert run_cli(["certs", "ca", "--dir", d, "--force"]) == 0
    capsys.readouterr()

    assert run_cli(["certs", "show", f"{d}/ca.key"]) == 2
    assert "is not a valid PEM certificate" in capsys.readouterr().err
