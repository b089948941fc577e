"""Control socket: a Unix socket where `mptun status` asks a running daemon for its state.

One request line ("status"), one JSON line back.  The socket is 0600: status
shows client names and addresses.
"""

from __future__ import annotations

import asyncio
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
    def __init__(self, path: Path, status: Callable[[], dict]):
        self.path = Path(path)
        self._status = status
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            cmd = line.decode(errors="replace").strip()
            if cmd == "status":
                reply = {"ok": True, "status": self._status()}
            else:
                reply = {"ok": False, "error": f"unknown command {cmd!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
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
