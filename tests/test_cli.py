"""The `mptun` command's handling of bad input: one clear line, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.lab.stack import make_pki, write_toml


def mptun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("alice", "bob"))


def server_toml(pki: Path, **over) -> Path:
    table = {
        "listen": "127.0.0.1:4433",
        "certificate": str(pki / "mptun-server.crt"),
        "key": str(pki / "mptun-server.key"),
        "ca": str(pki / "ca.crt"),
        "address": "100.64.0.1/24",
    }
    table.update(over)
    return write_toml(pki / "server-test.toml", {"server": table})


def client_toml(pki: Path, **over) -> Path:
    table = {
        "server": "127.0.0.1:4433",
        "server_name": "mptun-server",
        "certificate": str(pki / "alice.crt"),
        "key": str(pki / "alice.key"),
        "ca": str(pki / "ca.crt"),
    }
    table.update(over)
    return write_toml(pki / "client-test.toml", {"client": table})


def test_check_config_accepts_good_configs(pki):
    for role, path in (("server", server_toml(pki)), ("client", client_toml(pki))):
        res = mptun(role, "-c", str(path), "--check-config")
        assert res.returncode == 0, res.stderr
        assert "ok" in res.stdout


@pytest.mark.parametrize(
    "over, expect",
    [
        ({"listn": "127.0.0.1:1"}, "[server] listn: unknown key"),
        ({"address": "100.64.0.1/33"}, "[server] address:"),
        ({"listen": "127.0.0.1"}, "[server] listen:"),
        ({"keepalive": "fast"}, "[server] keepalive:"),
        ({"key": "/nonexistent/server.key"}, "[server] key: file /nonexistent/server.key not found"),
    ],
)
def test_bad_server_config_names_file_and_key(pki, over, expect):
    path = server_toml(pki, **over)
    res = mptun("server", "-c", str(path), "--check-config")
    assert res.returncode == 2
    assert str(path) in res.stderr and expect in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_key_that_does_not_match_the_certificate(pki):
    path = client_toml(pki, key=str(pki / "bob.key"))
    res = mptun("client", "-c", str(path), "--check-config")
    assert res.returncode == 2
    assert "bob.key does not match certificate" in res.stderr and "alice.crt" in res.stderr


def test_garbage_in_a_certificate_file(pki, tmp_path):
    bad = tmp_path / "bad.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    res = mptun("client", "-c", str(client_toml(pki, certificate=str(bad))), "--check-config")
    assert res.returncode == 2
    assert f"certificate file {bad}: cannot load" in res.stderr


def test_missing_and_invalid_config_files(tmp_path):
    res = mptun("server", "-c", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "nope.toml: file not found" in res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nlisten = ")
    res = mptun("client", "-c", str(broken))
    assert res.returncode == 2 and "broken.toml: not valid TOML" in res.stderr


def test_netlink_trouble_is_one_line_not_a_traceback(monkeypatch, capsys):
    """A netlink failure while setting up the TUN (e.g. no such device, a route the kernel
    refuses) ends the command with one line and exit 1."""
    from tunnel.app import cli
    from tunnel.io import netlink

    def fail(args):
        netlink.configure_interface("mptun-no-such-dev", [], 1400)

    parser = cli.build_parser()
    args = parser.parse_args(["status"])
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    args.func = fail
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mptun status: error: ") and "mptun-no-such-dev" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_other_errors_are_not_swallowed(monkeypatch):
    from tunnel.app import cli

    parser = cli.build_parser()
    args = parser.parse_args(["status"])
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)

    def boom(args):
        raise RuntimeError("a bug")

    args.func = boom
    with pytest.raises(RuntimeError):
        cli.main([])
