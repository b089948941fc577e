"""A running mptun server + client inside a Lab, with throwaway certificates.

Used by the end-to-end tests, `mptun lab` and `scripts/bench`, so all three
start the tunnel the same way: real `mptun server` / `mptun client` processes
in their namespaces, configs written to a temporary directory.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from tunnel.app import certs, control
from tunnel.lab.procs import stop_processes, tail
from tunnel.lab.netns import Host, wait_for

SERVER_NAME = "mptun-server"
SERVER_INNER = "100.64.0.1"
INNER_PREFIX = 24
PORT = 4433


def make_pki(directory: Path, clients=("alice",), server_name: str = SERVER_NAME) -> Path:
    certs.create_ca(directory)
    certs.issue_server(directory, server_name, [server_name])
    for name in clients:
        certs.issue_client(directory, name)
    return directory


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, tables: dict[str, dict]) -> Path:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def mptun_argv(*args: str) -> list[str]:
    """Run the mptun of this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "tunnel", *args]


@dataclass
class DaemonPair:
    """A server daemon in ``server_host`` listening on ``server_addr`` and its client in
    ``client_host``, sharing ``workdir``: a throwaway PKI (made there unless it holds one,
    e.g. a TunnelStack's), their configuration files and their logs.

    The common ground of the lab's tunnel pairs (mptun, OpenVPN, OpenConnect), so each of
    them only says how its daemons are configured and started.
    """

    server_host: Host
    client_host: Host
    server_addr: str
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mptun-lab-")))
    client_name: str = "alice"
    server_proc: Optional[subprocess.Popen] = None
    client_proc: Optional[subprocess.Popen] = None
    log_names: ClassVar[tuple[str, str]] = ("server.log", "client.log")  # in workdir

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.workdir / "ca.crt").exists():
            make_pki(self.workdir, clients=(self.client_name,))

    @property
    def server_log(self) -> Path:
        return self.workdir / self.log_names[0]

    @property
    def client_log(self) -> Path:
        return self.workdir / self.log_names[1]


@dataclass
class TunnelStack(DaemonPair):
    """mptun: ``mptun server`` in ``server_host`` listening on ``server_addr``, ``mptun client``
    in ``client_host``; ``*_overrides`` are added to (or replace) their config settings."""

    server_overrides: dict = field(default_factory=dict)
    client_overrides: dict = field(default_factory=dict)

    @property
    def server_socket(self) -> Path:
        return self.workdir / "server.sock"

    @property
    def client_socket(self) -> Path:
        return self.workdir / f"client-{self.client_name}.sock"

    def server_status(self) -> dict:
        return control.query(self.server_socket)

    def client_status(self) -> dict:
        return control.query(self.client_socket)

    def stalls(self, since: float) -> list[tuple[float, float, str]]:
        """(start, end, "client"|"server") in monotonic seconds: the stalls of both daemons
        that began after ``since``, time the OS did not run one of them (tunnel/io/loop.py).
        Packets through the tunnel waited meanwhile, whatever mptun does."""
        out = []
        for who, query in (("client", self.client_status), ("server", self.server_status)):
            for woke, late_ms in query().get("loop", {}).get("recent_stalls", []):
                if woke - late_ms / 1e3 >= since:
                    out.append((woke - late_ms / 1e3, woke, who))
        return sorted(out)

    def server_config(self) -> Path:
        table = {
            "listen": f"{self.server_addr}:{PORT}",
            "certificate": f"{SERVER_NAME}.crt",
            "key": f"{SERVER_NAME}.key",
            "ca": "ca.crt",
            "address": f"{SERVER_INNER}/{INNER_PREFIX}",
            "tun": "mptun0",
            "log_level": "debug",
            "control": str(self.server_socket),
        }
        table.update(self.server_overrides)
        return write_toml(self.workdir / "server.toml", {"server": table})

    def client_config(self) -> Path:
        table = {
            "server": f"{self.server_addr}:{PORT}",
            "server_name": SERVER_NAME,
            "certificate": f"{self.client_name}.crt",
            "key": f"{self.client_name}.key",
            "ca": "ca.crt",
            "tun": "mptun0",
            "log_level": "debug",
            "control": str(self.client_socket),
        }
        table.update(self.client_overrides)
        return write_toml(self.workdir / f"client-{self.client_name}.toml", {"client": table})

    def start_server(self) -> subprocess.Popen:
        cfg = self.server_config()
        self.server_proc = self.server_host.popen(
            mptun_argv("server", "-c", str(cfg)), stdout=subprocess.DEVNULL, stderr=open(self.server_log, "ab")
        )
        wait_for(  # the log line comes before the control socket: wait for both
            lambda: ("listening on" in self.server_log.read_text() and self.server_socket.exists())
            or self.server_proc.poll() is not None,
            10,
            message=f"server did not start; log: {self.server_log}",
        )
        if self.server_proc.poll() is not None:
            raise RuntimeError(f"server exited: {self.server_log.read_text()}")
        return self.server_proc

    def start_client(self) -> subprocess.Popen:
        cfg = self.client_config()
        self.client_proc = self.client_host.popen(
            mptun_argv("client", "-c", str(cfg)), stdout=subprocess.DEVNULL, stderr=open(self.client_log, "ab")
        )
        return self.client_proc

    def wait_up(self, timeout: float = 15.0) -> None:
        """Wait until a ping from the client reaches the server's inner address."""
        wait_for(
            lambda: self.client_host.ping(SERVER_INNER, timeout=0.5),
            timeout,
            message=f"tunnel did not come up; client log:\n{tail(self.client_log)}\nserver log:\n{tail(self.server_log)}",
        )

    def start(self, timeout: float = 15.0) -> "TunnelStack":
        self.start_server()
        self.start_client()
        self.wait_up(timeout)
        return self

    def client_inner(self) -> str:
        """The client's inner address, read from its log line 'tunnel up: ... address A/P'."""
        for line in reversed(self.client_log.read_text().splitlines()):
            if "tunnel up:" in line:
                return line.split(" address ", 1)[1].split("/", 1)[0]
        raise LookupError("client has no tunnel address yet")

    def stop(self, timeout: float = 5.0) -> None:
        stop_processes((self.client_proc, self.server_proc), timeout)


