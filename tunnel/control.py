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
from typing import Callable, Optional

DEFAULT_DIR = Path("/run/mptun")


def default_path(role: str, tun: str) -> Path:
    return DEFAULT_DIR / f"{role}-{tun}.sock"


class ControlServer:
    """Serves status requests from inside the shell's event loop (never blocks it)."""

    MAX_REQUEST = 1024

    def __init__(self, path: Path, status: Callable[[], dict]):
        self.path = Path(path)
        self._status = status
        self._loop = None
        self._sock: Optional[socket.socket] = None
        self._conns: dict[int, tuple[socket.socket, bytearray]] = {}

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
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self._conns[conn.fileno()] = (conn, bytearray())
        self._loop.add_reader(conn.fileno(), self._read, conn.fileno())

    def _read(self, fd: int) -> None:
        conn, buf = self._conns[fd]
        try:
            chunk = conn.recv(self.MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf += chunk
        if chunk and b"\n" not in buf and len(buf) < self.MAX_REQUEST:
            return
        cmd = bytes(buf).split(b"\n", 1)[0].decode(errors="replace").strip()
        if cmd == "status":
            reply = {"ok": True, "status": self._status()}
        else:
            reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)  # the reply is small; a reader that stalls loses it
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        conn, _ = self._conns.pop(fd)
        self._loop.remove_reader(fd)
        conn.close()

    def close(self) -> None:
        for fd in list(self._conns):
            self._drop(fd)
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except PermissionError:  # privileges dropped (tunnel.privs): the next start replaces it
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
