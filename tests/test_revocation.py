"""Revocation: CRL files (tunnel.app.certs.load_crl / revoke), the deny list, and the
server core refusing revoked clients at handshake and closing them on reload."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.corelab import Net, frames_seen
from tunnel.app import certs, cli
from tunnel.core import events
from tunnel.wire import frames
from tunnel.app.certs import CertError, load_crl, revoke
from tunnel.core.revocation import Revocation


def serial(pki: Path, name: str) -> int:
    return x509.load_pem_x509_certificate((pki / f"{name}.crt").read_bytes()).serial_number


# -- the decision --------------------------------------------------------------
def test_revocation_check() -> None:
    r = Revocation(frozenset({0xABC}), frozenset({"bob"}))
    assert r.check("alice", 0xABC) == "client 'alice' revoked (CRL serial abc)"
    assert r.check("bob", 1) == "client 'bob' denied by config"
    assert r.check("alice", 1) is None and r.check("carol", None) is None
    assert Revocation().check("alice", 0xABC) is None


# -- CRL files -----------------------------------------------------------------
def test_revoke_writes_a_crl_signed_by_the_ca_and_accumulates(tmp_path: Path) -> None:
    certs.create_ca(tmp_path)
    for n in ("alice", "bob"):
        certs.issue_client(tmp_path, n)
    path, added = revoke(tmp_path, [tmp_path / "alice.crt"])
    assert path == tmp_path / "ca.crl" and added == [serial(tmp_path, "alice")]
    assert load_crl(path, tmp_path / "ca.crt") == {serial(tmp_path, "alice")}
    _, again = revoke(tmp_path, [tmp_path / "alice.crt"])
    assert again == []  # already there
    revoke(tmp_path, [tmp_path / "bob.crt"], days=7)
    assert load_crl(path, tmp_path / "ca.crt") == {serial(tmp_path, n) for n in ("alice", "bob")}
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert dt.timedelta(days=6) < crl.next_update_utc - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(days=7)
    assert path.stat().st_mode & 0o777 == 0o644


def test_revoke_refuses_a_certificate_of_another_ca(tmp_path: Path) -> None:
    certs.create_ca(tmp_path / "a")
    certs.create_ca(tmp_path / "b", name="Other CA")
    certs.issue_client(tmp_path / "b", "mallory")
    with pytest.raises(CertError, match="not issued by the CA"):
        revoke(tmp_path / "a", [tmp_path / "b" / "mallory.crt"])


def test_crl_of_another_ca_refused(tmp_path: Path) -> None:
    certs.create_ca(tmp_path / "a")
    certs.create_ca(tmp_path / "b", name="Other CA")
    crl, _ = revoke(tmp_path / "b")
    with pytest.raises(CertError, match="issued by 'CN=Other CA', not by the CA"):
        load_crl(crl, tmp_path / "a" / "ca.crt")


def test_crl_with_the_same_issuer_name_but_another_key_refused(tmp_path: Path) -> None:
    certs.create_ca(tmp_path / "a")
    certs.create_ca(tmp_path / "b")  # same name "mptun CA", another key
    crl, _ = revoke(tmp_path / "b")
    with pytest.raises(CertError, match="signature does not verify"):
        load_crl(crl, tmp_path / "a" / "ca.crt")


def test_crl_der_accepted_and_garbage_refused(tmp_path: Path) -> None:
    certs.create_ca(tmp_path)
    certs.issue_client(tmp_path, "alice")
    crl, _ = revoke(tmp_path, [tmp_path / "alice.crt"])
    der = tmp_path / "ca.crl.der"
    der.write_bytes(x509.load_pem_x509_crl(crl.read_bytes()).public_bytes(serialization.Encoding.DER))
    assert load_crl(der, tmp_path / "ca.crt") == {serial(tmp_path, "alice")}
    bad = tmp_path / "bad.crl"
    bad.write_bytes(b"-----BEGIN X509 CRL-----\nnope\n-----END X509 CRL-----\n")
    with pytest.raises(CertError, match=f"CRL {bad} is not a valid"):
        load_crl(bad, tmp_path / "ca.crt")
    with pytest.raises(CertError, match="not found"):
        load_crl(tmp_path / "missing.crl", tmp_path / "ca.crt")


def test_cli_revoke(tmp_path: Path, capsys) -> None:
    certs.create_ca(tmp_path)
    certs.issue_client(tmp_path, "alice")
    assert cli.main(["certs", "revoke", "--dir", str(tmp_path), "--name", "alice"]) == 0
    out = capsys.readouterr().out
    assert f"revoked serial {serial(tmp_path, 'alice'):x}" in out and "ca.crl" in out
    assert cli.main(["certs", "revoke", "--dir", str(tmp_path), "--name", "nobody"]) == 2
    assert "nobody.crt not found" in capsys.readouterr().err


def test_key_mode_warning(tmp_path: Path) -> None:
    certs.create_ca(tmp_path)
    _, key = certs.issue_client(tmp_path, "alice")
    assert certs.key_mode_warning(key) is None  # written 0600
    key.chmod(0o640)
    w = certs.key_mode_warning(key)
    assert w is not None and str(key) in w and "0640" in w and "group" in w and "others" not in w
    key.chmod(0o604)
    assert "accessible by others" in certs.key_mode_warning(key)
    # group access for the daemon's own (non-root) group is fine: packaging/README.md's 0640 root:mptun
    os.chown(key, 0, 65534)
    key.chmod(0o640)
    assert certs.key_mode_warning(key, {65534}) is None
    assert "group" in certs.key_mode_warning(key, {1234})
    key.chmod(0o644)
    assert "accessible by others" in certs.key_mode_warning(key, {65534})
    os.chown(key, 0, 0)
    key.chmod(0o640)
    assert "0640" in certs.key_mode_warning(key, {0})  # group root is no excuse


# -- the server core -----------------------------------------------------------
def test_revoked_client_refused_at_handshake(pki: Path, plain) -> None:
    net = Net(pki)
    net.server.revocation = Revocation(frozenset({serial(pki, "alice")}))
    c = net.client()
    c.add("a")
    closes = frames_seen(plain, "client", frames.Close)
    assert [f.code for f in closes] == [frames.CLOSE_REFUSED]
    assert f"client 'alice' revoked (CRL serial {serial(pki, 'alice'):x})" == closes[0].reason
    (refused,) = net.sev(events.Refused)
    assert refused.addr == c.addr("a") and "revoked (CRL serial" in refused.reason
    assert net.server.tunnels == {} and net.server.paths == {}
    assert not net.sev(events.ClientConnected)
    assert net.server.counters["revoked"] == 1
    assert not c.evs(events.TunnelUp)
    bob = net.client("bob")  # someone else of the same CA is still welcome
    bob.add("b")
    assert bob.evs(events.TunnelUp) and list(net.server.by_name) == ["bob"]


def test_denied_client_refused_at_handshake(pki: Path, plain) -> None:
    net = Net(pki)
    net.server.revocation = Revocation(names=frozenset({"alice"}))
    c = net.client()
    c.add("a")
    closes = frames_seen(plain, "client", frames.Close)
    assert [(f.code, f.reason) for f in closes] == [(frames.CLOSE_REFUSED, "client 'alice' denied by config")]
    assert net.server.tunnels == {} and not c.evs(events.TunnelUp)


def test_reload_closes_every_path_of_a_revoked_connected_client(pki: Path, plain) -> None:
    net = Net(pki)
    alice, bob = net.client(), net.client("bob")
    alice.add("a")
    alice.add("b")
    bob.add("x")
    assert sorted(net.server.by_name) == ["alice", "bob"]
    assert len(net.server.by_name["alice"].paths) == 2
    before = len(frames_seen(plain, "client", frames.Close))
    # a reload that changes nothing for them closes nothing
    assert net.server.set_revocation(Revocation(names=frozenset({"carol"})), net.now) == []
    reasons = net.server.set_revocation(Revocation(frozenset({serial(pki, "alice")})), net.now)
    net.pump()
    assert reasons == [f"client 'alice' revoked (CRL serial {serial(pki, 'alice'):x})"]
    closes = frames_seen(plain, "client", frames.Close)[before:]
    assert [f.code for f in closes] == [frames.CLOSE_REFUSED] * 2  # both paths told
    assert list(net.server.by_name) == ["bob"] and len(net.server.by_name["bob"].paths) == 1
    assert all(p.name == "bob" for p in net.server.paths.values())
    (gone,) = net.sev(events.ClientGone)
    assert gone.name == "alice" and "revoked (CRL serial" in gone.reason
    assert net.server.counters["revoked"] == 1
    # alice's client tries again and is refused at the handshake
    net.advance(12.0)
    assert "alice" not in net.server.by_name
    assert net.server.counters["revoked"] >= 2


def test_bad_crl_or_deny_at_start_is_a_config_error(tmp_path: Path, capsys) -> None:
    from tunnel.lab.stack import make_pki, write_toml

    make_pki(tmp_path)
    certs.create_ca(tmp_path / "other", name="Other CA")
    revoke(tmp_path / "other")
    base = {"listen": "127.0.0.1:4433", "certificate": "mptun-server.crt", "key": "mptun-server.key",
            "ca": "ca.crt", "address": "100.64.0.1/24"}
    cfg = write_toml(tmp_path / "s.toml", {"server": {**base, "crl": "other/ca.crl"}})
    assert cli.main(["server", "-c", str(cfg), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: [server] crl: CRL {tmp_path}/other/ca.crl is issued by 'CN=Other CA'" in err
    cfg = write_toml(tmp_path / "s.toml", {"server": {**base, "crl": "missing.crl"}})
    assert cli.main(["server", "-c", str(cfg), "--check-config"]) == 2
    assert "[server] crl: file" in capsys.readouterr().err
    cfg = write_toml(tmp_path / "s.toml", {"server": {**base, "deny": ["alice", 3]}})
    assert cli.main(["server", "-c", str(cfg), "--check-config"]) == 2
    assert "[server] deny: 3 is not a client name" in capsys.readouterr().err
    revoke(tmp_path, [tmp_path / "alice.crt"])
    cfg = write_toml(tmp_path / "s.toml", {"server": {**base, "crl": "ca.crl", "deny": ["bob"]}})
    assert cli.main(["server", "-c", str(cfg), "--check-config"]) == 0


# -- a CRL past its nextUpdate (crl_expired) -------------------------------------------------
NEXT_UPDATE = 1_700_000_000.0


def stale(policy: str, now: float = NEXT_UPDATE + 1, **kw) -> Revocation:
    return Revocation(crl="ca.crl", next_update=NEXT_UPDATE, crl_expired=policy, clock=lambda: now, **kw)


def test_expired_crl_decision() -> None:
    fresh = stale("refuse", now=NEXT_UPDATE - 1)
    assert not fresh.expired() and fresh.check("alice", 1) is None
    assert stale("warn").expired() and stale("warn").check("alice", 1) is None  # warn: still used
    reason = stale("refuse").check("alice", 1)
    assert reason is not None and "past its nextUpdate (2023-11-14 22:13 UTC)" in reason and '"refuse"' in reason
    assert stale("refuse").check("alice", 1, handshake=False) is None  # connected clients are kept
    # a revocation says more than the expiry, for handshakes and connected clients alike
    r = stale("refuse", serials=frozenset({7}))
    assert "revoked (CRL serial 7)" in r.check("bob", 7) and "revoked" in r.check("bob", 7, handshake=False)
    assert Revocation(crl="ca.crl", crl_expired="refuse").check("a", 1) is None  # a CRL without nextUpdate
    with pytest.raises(ValueError):
        Revocation(crl_expired="ignore")
    assert stale("refuse").stats() == {"crl": {"file": "ca.crl", "revoked": 0, "next_update": NEXT_UPDATE,
                                               "expired": True, "on_expiry": "refuse"}, "denied": 0}
    assert Revocation().stats() == {"crl": None, "denied": 0}


def test_expired_crl_refuse_refuses_new_handshakes_and_keeps_connected_tunnels(pki: Path, plain) -> None:
    net = Net(pki)
    alice = net.client()
    alice.add("a")
    assert list(net.server.by_name) == ["alice"]
    # the CRL expires: a reload with crl_expired = "refuse" closes nobody connected ...
    assert net.server.set_revocation(stale("refuse"), net.now) == []
    assert list(net.server.by_name) == ["alice"]
    assert net.server.stats()["revocation"]["crl"]["expired"] is True
    # ... but every new handshake is refused: a second path of alice, and bob
    alice.add("b")
    bob = net.client("bob")
    bob.add("x")
    closes = frames_seen(plain, "client", frames.Close)
    assert [f.code for f in closes] == [frames.CLOSE_REFUSED] * 2
    assert all("past its nextUpdate" in f.reason for f in closes)
    assert len(net.server.by_name["alice"].paths) == 1 and "bob" not in net.server.by_name
    assert not bob.evs(events.TunnelUp)
    refused = net.sev(events.Refused)
    assert refused and all("past its nextUpdate" in e.reason for e in refused)
    # a re-signed CRL (and SIGHUP): handshakes are welcome again
    net.server.set_revocation(stale("refuse", now=NEXT_UPDATE - 60), net.now)
    bob2 = net.client("bob")
    bob2.add("y")
    assert bob2.evs(events.TunnelUp) and "bob" in net.server.by_name


def test_expired_crl_warn_admits(pki: Path, plain) -> None:
    net = Net(pki)
    net.server.revocation = stale("warn")
    c = net.client()
    c.add("a")
    assert c.evs(events.TunnelUp) and list(net.server.by_name) == ["alice"]
    assert not frames_seen(plain, "client", frames.Close)


def expired_crl(ca_dir: Path) -> Path:
    """A CRL signed by the CA whose nextUpdate passed an hour ago."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    now = dt.datetime.now(dt.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
           .last_update(now - dt.timedelta(days=2)).next_update(now - dt.timedelta(hours=1))
           .sign(key, hashes.SHA256()))
    path = ca_dir / "stale.crl"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def test_crl_expired_config_key(tmp_path: Path, capsys, caplog) -> None:
    from tunnel.app import server as server_app
    from tunnel.app.config import load_server_config
    from tunnel.lab.stack import make_pki, write_toml

    make_pki(tmp_path)
    expired_crl(tmp_path)
    base = {"listen": "127.0.0.1:4433", "certificate": "mptun-server.crt", "key": "mptun-server.key",
            "ca": "ca.crt", "address": "100.64.0.1/24"}
    cfg = write_toml(tmp_path / "s.toml", {"server": {**base, "crl": "stale.crl", "crl_expired": "ignore"}})
    assert cli.main(["server", "-c", str(cfg), "--check-config"]) == 2
    assert f"{cfg}: [server] crl_expired: 'ignore' is not one of warn, refuse" in capsys.readouterr().err
    cfg = write_toml(tmp_path / "s.toml", {"server": {**base, "crl_expired": "refuse"}})
    assert cli.main(["server", "-c", str(cfg), "--check-config"]) == 2
    assert f"{cfg}: [server] crl_expired: \"refuse\" needs a crl" in capsys.readouterr().err
    # the default is warn; refuse is taken, and the server's revocation (status, metrics) says so
    cfg = write_toml(tmp_path / "s.toml", {"server": {**base, "crl": "stale.crl"}})
    assert load_server_config(cfg).crl_expired == "warn"
    cfg = write_toml(tmp_path / "s.toml", {"server": {**base, "crl": "stale.crl", "crl_expired": "refuse"}})
    assert cli.main(["server", "-c", str(cfg), "--check-config"]) == 0
    assert "every new handshake is refused" in caplog.text
    core, _ = server_app.build(load_server_config(cfg))
    crl = core.stats()["revocation"]["crl"]
    assert crl["expired"] is True and crl["on_expiry"] == "refuse" and crl["file"].endswith("stale.crl")
    assert time_ago(crl["next_update"]) > 3000
    assert core.revocation.check("alice", 1) is not None


def time_ago(t: float) -> float:
    import time

    return time.time() - t


def test_status_shows_the_crl_and_its_expiry() -> None:
    from tunnel.app.status import format_status

    st = {"tunnels": [], "handshaking": 0, "counters": {}, "revocation": stale("refuse").stats()}
    text = format_status("s.sock", st)
    assert "crl ca.crl: 0 revoked, next update 2023-11-14 22:13 UTC, EXPIRED: new handshakes refused" in text
    st["revocation"] = stale("warn", now=NEXT_UPDATE - 1).stats()
    assert "EXPIRED" not in format_status("s.sock", st) and "crl ca.crl" in format_status("s.sock", st)


def test_sighup_reloads_crl_expired_and_a_fresh_crl(tmp_path: Path) -> None:
    from tunnel.app import server as server_app
    from tunnel.app.config import load_server_config
    from tunnel.lab.stack import make_pki, write_toml

    make_pki(tmp_path)
    expired_crl(tmp_path)
    base = {"listen": "127.0.0.1:4433", "certificate": "mptun-server.crt", "key": "mptun-server.key",
            "ca": "ca.crt", "address": "100.64.0.1/24", "crl": "stale.crl"}
    path = write_toml(tmp_path / "s.toml", {"server": base})
    cfg = load_server_config(path)
    core, _ = server_app.build(cfg)
    reload = server_app.revocation_reloader(cfg, core, lambda: 0.0)
    assert core.revocation.expired() and core.revocation.check("alice", 1) is None  # warn
    write_toml(path, {"server": {**base, "crl_expired": "refuse"}})
    reload()
    assert core.revocation.crl_expired == "refuse" and core.revocation.check("alice", 1) is not None
    revoke(tmp_path, crl_path=tmp_path / "stale.crl")  # re-signed in place: a fresh nextUpdate
    reload()
    assert not core.revocation.expired() and core.revocation.check("alice", 1) is None
