"""Control socket: a Unix socket where `mptun status` asks a running daemon for its state.

One request line ("status"), one JSON line back.  The socket is 0600: status
shows client names and addresses.
"""

from __future__ import annotations

import glob
import json
import os
import socket
from pathlib import Path
from typing import Callable

from tunnel.io.loopconn import Conn, LoopServer

DEFAULT_DIR = Path("/run/mptun")


def default_path(role: str, tun: str) -> Path:
    return DEFAULT_DIR / f"{role}-{tun}.sock"


class ControlServer(LoopServer):
    """Serves status requests from inside the shell's event loop, never blocking it.

    Everything is non-blocking: the request is read as it comes, the reply is sent as far
    as the socket takes it and the rest retried from a timer (the loop has no writable
    events), and every connection has a deadline (TIMEOUT) for the whole exchange: a client
    that never sends its request or never reads its reply holds a slot until then, no more.
    At most MAX_CONNS connections are served at once; more are closed when accepted (and
    counted), which keeps the listening socket from staying readable.  The counters come
    with every status reply (``control``).
    """

    MAX_REQUEST = 1024
    MAX_CONNS = 16  # connections served at once (`mptun status` uses one; a few for monitoring)
    ACCEPT_BATCH = MAX_CONNS + 8
    TIMEOUT = 5.0  # a connection must be done (request read, reply written) within this; query()'s too

    def __init__(self, path: Path, status: Callable[[], dict], timeout: float = TIMEOUT):
        super().__init__()
        self.path = Path(path)
        self._status = status
        self.timeout = timeout
        self.counters = {"served": 0, "refused": 0, "timed_out": 0}

    def start(self, loop) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(8)
        sock.setblocking(False)
        self._listen(sock, loop)

    def _refused(self) -> None:
        self.counters["refused"] += 1

    def _read(self, c: Conn) -> None:
        if self._conns.get(c.fd) is not c:
            return
        try:
            chunk = c.sock.recv(self.MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if c.out is not None:  # answered: input after the request is ignored (EOF too: it may still read)
            if not chunk:
                self._loop.remove_reader(c.fd)
            return
        c.buf += chunk
        if chunk and b"\n" not in c.buf and len(c.buf) < self.MAX_REQUEST:
            return
        if not chunk and not c.buf:  # closed without asking
            self._drop(c)
            return
        cmd = bytes(c.buf).split(b"\n", 1)[0].decode(errors="replace").strip()
        if cmd == "status":
            reply = {"ok": True, "status": {**self._status(), "control": dict(self.counters)}}
            self.counters["served"] += 1
        else:
            reply = {"ok": False, "error": f"unknown command {cmd[:64]!r}"}
        c.buf = bytearray()
        c.out = memoryview(json.dumps(reply).encode() + b"\n")
        self._write(c)

    def _expire(self, c: Conn) -> None:
        if self._conns.get(c.fd) is c:
            self.counters["timed_out"] += 1
            self._drop(c)

    def close(self) -> None:
        self._stop_listening()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except PermissionError:  # privileges dropped (tunnel.app.privs): the next start replaces it
            pass


def query(path: str | Path, command: str = "status", timeout: float = 5.0) -> dict:
    """Ask a running daemon; raises OSError if nobody listens at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise OSError(reply.get("error", "control request failed"))
    return reply["status"]


def find_sockets() -> list[str]:
    return sorted(glob.glob(str(DEFAULT_DIR / "*.sock")))
