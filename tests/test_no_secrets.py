"""No secret in the logs: a server and a client at debug level through a connect, a
second path joining, a client restart and a server restart; their logs must hold no
private-key material and no tunnel id.  The server runs with a known tunnel-id
generator (a wrapper replaces ServerCore's random source), so the test knows
what to look for."""

from __future__ import annotations

import base64
import hashlib
import signal
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization

from tunnel.lab.netns import wait_for
from tunnel.lab.procs import tail
from tunnel.lab.stack import SERVER_INNER

pytestmark = pytest.mark.netns

SEED = b"mptun-no-secrets-test-%d"
WRAPPER = f'''
import hashlib, itertools, sys
from tunnel.core import server as server_core
_n = itertools.count()
def known_random(n):
    return hashlib.sha256({SEED!r} % next(_n)).digest()[:n]
_init = server_core.ServerCore.__init__
def init(self, *a, **kw):
    kw["random_bytes"] = known_random
    _init(self, *a, **kw)
server_core.ServerCore.__init__ = init
from tunnel.app import cli
sys.exit(cli.main(sys.argv[1:]))
'''


def tunnel_ids(n: int, length: int = 16) -> list[bytes]:
    return [hashlib.sha256(SEED % i).digest()[:length] for i in range(n)]


def forms_of_bytes(b: bytes) -> list[bytes]:
    """The ways a byte string could end up in a log line."""
    out = [b, b.hex().encode(), b.hex().upper().encode(), b.hex(":").encode(), repr(b).encode(),
           base64.b64encode(b), base64.b64encode(b).rstrip(b"="), base64.urlsafe_b64encode(b).rstrip(b"="),
           str(int.from_bytes(b, "big")).encode()]
    return [f for f in out if len(f) >= 8]


def key_material(path) -> list[bytes]:
    pem = path.read_bytes()
    key = serialization.load_pem_private_key(pem, None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    body = [l for l in pem.splitlines() if l and not l.startswith(b"-----")]
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    return body + [b"PRIVATE KEY"] + forms_of_bytes(der) + forms_of_bytes(scalar)


def test_logs_hold_no_private_key_and_no_tunnel_id(multipath):
    mp = multipath(2, "duplicate")
    stack = mp.stack

    def start_server():
        stack.server_proc = stack.server_host.popen(
            [sys.executable, "-c", WRAPPER, "server", "-c", str(stack.server_config())],
            stdout=subprocess.DEVNULL, stderr=open(stack.server_log, "ab"))
        wait_for(lambda: "listening on" in stack.server_log.read_text() or stack.server_proc.poll() is not None,
                 10, message=tail(stack.server_log))
        assert stack.server_proc.poll() is None, stack.server_log.read_text()

    mp.server.run(["ip", "addr", "add", "198.18.8.1/32", "dev", "lo"])  # as Multipath.start does
    start_server()
    stack.start_client()
    stack.wait_up()
    mp.wait_paths(2, timeout=15)  # connect, and a second path JOINs with the tunnel id
    assert mp.client.ping(SERVER_INNER)
    # the client restarts: a new tunnel
    stack.client_proc.send_signal(signal.SIGTERM)
    stack.client_proc.wait(10)
    stack.start_client()
    stack.wait_up()
    mp.wait_paths(2, timeout=15)
    # the server restarts: the client reconnects (JOIN of an unknown tunnel, then a new one)
    stack.server_proc.send_signal(signal.SIGTERM)
    stack.server_proc.wait(10)
    start_server()
    wait_for(lambda: mp.client.ping(SERVER_INNER, timeout=0.5), 20, message=tail(stack.client_log))
    mp.wait_paths(2, timeout=15)
    stack.stop()

    logs = {p.name: p.read_bytes() for p in (stack.server_log, stack.client_log)}
    assert b" DEBUG " in logs["client.log"]  # really at debug level (the server has little to say there)
    assert 'log_level = "debug"' in (stack.workdir / "server.toml").read_text()
    assert logs["server.log"].count(b"connected from") >= 3  # three tunnels were made
    secrets = {f"tunnel id {i}": forms_of_bytes(tid) for i, tid in enumerate(tunnel_ids(6))}
    for name in ("mptun-server", "alice", "ca"):
        secrets[f"{name}.key"] = key_material(stack.workdir / f"{name}.key")
    for log_name, text in logs.items():
        for what, forms in secrets.items():
            for form in forms:
                assert form not in text, f"{log_name} contains {what} as {form[:40]!r}"
