"""End to end (real mptun processes in namespaces): certificates the server or the
client refuses, each with a log line that says why; revocation (CRL and deny list)
at the handshake and on SIGHUP; the key-file mode warning."""

from __future__ import annotations

import datetime as dt
import os
import signal

import pytest
from cryptography import x509

from tunnel.app import certs
from tunnel.lab.netns import wait_for
from tunnel.lab.procs import tail
from tunnel.lab.stack import SERVER_INNER, SERVER_NAME

pytestmark = pytest.mark.netns

NOW = dt.datetime.now(dt.timezone.utc)


def lines_with(path, text: str) -> list[str]:
    return [l for l in path.read_text().splitlines() if text in l]


def wait_log(path, text: str, timeout: float = 15.0, other=None) -> str:
    wait_for(lambda: lines_with(path, text), timeout,
             message=f"no {text!r} in {path}:\n{tail(path)}" + (f"\nother log:\n{tail(other)}" if other else ""))
    return lines_with(path, text)[0]


def serial_hex(path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("expired", "certificate has expired"),
        ("not-yet-valid", "certificate is not yet valid"),
        # OpenSSL's own purpose check usually speaks first; mptun's verify callback otherwise
        ("server-cert-as-client", ("unsuitable certificate purpose", "lacks the clientAuth key usage")),
    ],
)
def test_bad_client_certificate_refused_with_a_log_line_saying_why(tunnel_stack, case, expected):
    wd = tunnel_stack.workdir
    if case == "expired":
        certs.issue_client(wd, case, not_after=NOW - dt.timedelta(hours=1))
    elif case == "not-yet-valid":
        certs.issue_client(wd, case, not_before=NOW + dt.timedelta(days=1))
    else:  # a certificate of our CA, but for a server (serverAuth only)
        certs.issue_server(wd, case, [case])
    tunnel_stack.client_name = case
    tunnel_stack.start_server()
    tunnel_stack.start_client()
    line = wait_log(tunnel_stack.server_log, "refused", other=tunnel_stack.client_log)
    assert "198.18.0.2" in line and f"'{case}'" in line
    assert any(e in line for e in ((expected,) if isinstance(expected, str) else expected)), line
    assert tunnel_stack.server_status()["tunnels"] == []
    assert "tunnel up" not in tunnel_stack.client_log.read_text()


def test_not_yet_valid_server_certificate_refused_by_the_client(tunnel_stack):
    wd = tunnel_stack.workdir
    certs.issue_server(wd, SERVER_NAME, [SERVER_NAME], force=True, not_before=NOW + dt.timedelta(days=1))
    tunnel_stack.start_server()
    tunnel_stack.start_client()
    line = wait_log(tunnel_stack.client_log, "certificate is not yet valid", other=tunnel_stack.server_log)
    assert f"'{SERVER_NAME}'" in line
    assert "tunnel up" not in tunnel_stack.client_log.read_text()


def test_revoked_client_disconnected_on_sighup_and_refused_after(tunnel_stack):
    wd = tunnel_stack.workdir
    crl, _ = certs.revoke(wd)  # an empty CRL to start with
    tunnel_stack.server_overrides["crl"] = "ca.crl"
    # keys readable by the group: a warning at start (not an error)
    os.chmod(wd / f"{SERVER_NAME}.key", 0o640)
    os.chmod(wd / "alice.key", 0o604)
    tunnel_stack.start()
    line = wait_log(tunnel_stack.server_log, "WARNING key file")
    assert f"{wd / SERVER_NAME}.key has mode 0640" in line and "group" in line
    line = wait_log(tunnel_stack.client_log, "WARNING key file")
    assert f"{wd}/alice.key has mode 0604" in line and "others" in line
    assert [t["name"] for t in tunnel_stack.server_status()["tunnels"]] == ["alice"]

    certs.revoke(wd, [wd / "alice.crt"])
    tunnel_stack.server_proc.send_signal(signal.SIGHUP)
    serial = serial_hex(wd / "alice.crt")
    line = wait_log(tunnel_stack.server_log, "disconnected")
    assert f"client 'alice' revoked (CRL serial {serial})" in line
    assert lines_with(tunnel_stack.server_log, "revocation reloaded: 1 revoked serials")
    wait_for(lambda: tunnel_stack.server_status()["tunnels"] == [], 5, message="tunnel not closed")
    wait_log(tunnel_stack.client_log, f"server closed the path: client 'alice' revoked (CRL serial {serial})")
    assert not tunnel_stack.client_host.ping(SERVER_INNER, timeout=0.5)

    # a bad CRL file: the old one stays (and the log says why)
    crl.write_text("not a CRL\n")
    tunnel_stack.server_proc.send_signal(signal.SIGHUP)
    line = wait_log(tunnel_stack.server_log, "CRL not reloaded")
    assert "keeping the old one (1 serials)" in line and str(crl) in line
    # the client retries (after its 10 s back-off) and is refused at the handshake
    line = wait_log(tunnel_stack.server_log, "refused 198.18.0.2", timeout=25)
    assert f"client 'alice' revoked (CRL serial {serial})" in line
    assert tunnel_stack.server_status()["tunnels"] == []
    assert tunnel_stack.server_proc.poll() is None


def test_denied_client_disconnected_on_sighup(tunnel_stack):
    tunnel_stack.start()
    tunnel_stack.server_overrides["deny"] = ["bob", "alice"]
    tunnel_stack.server_config()  # rewrite the file with the deny list
    tunnel_stack.server_proc.send_signal(signal.SIGHUP)
    line = wait_log(tunnel_stack.server_log, "disconnected")
    assert "client 'alice' denied by config" in line
    assert lines_with(tunnel_stack.server_log, "0 revoked serials, 2 denied names")
    wait_for(lambda: tunnel_stack.server_status()["tunnels"] == [], 5, message="tunnel not closed")
    wait_log(tunnel_stack.client_log, "server closed the path: client 'alice' denied by config")
    # a broken config on the next SIGHUP keeps the deny list
    tunnel_stack.server_overrides["deny"] = "alice"
    tunnel_stack.server_config()
    tunnel_stack.server_proc.send_signal(signal.SIGHUP)
    line = wait_log(tunnel_stack.server_log, "revocation not reloaded")
    assert "[server] deny: expected a list of client names" in line
    assert tunnel_stack.server_proc.poll() is None
