"""A WireGuard pair (wireguard-go, user space) inside a Lab, as a benchmark peer.

Why: WireGuard is the tunnel people reach for first, so ``scripts/bench``
shows where mptun stands against it on the same lab link.  The kernel module
would compare a kernel data path with mptun's user-space one; wireguard-go is
WireGuard in user space on a TUN device, like mptun (and like OpenVPN with
data-channel offload disabled), so that is the one measured.

How it is run, and why:

- ``wireguard-go -f IFNAME`` in the foreground inside each namespace, so the
  Lab owns the process and kills it on any failure.  It refuses to start on a
  kernel with WireGuard support unless
  ``WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1`` is in its environment;
- its control socket is ``/var/run/wireguard/IFNAME.sock``, on the file
  system every namespace shares, so interface names carry this process's
  pid and a counter (``wg<pid><n>s`` / ``wg<pid><n>c``): two labs, or a
  WireGuard on the machine itself, cannot answer for each other.  ``wg`` is
  run inside the namespace all the same;
- keys are made with ``wg genkey`` / ``wg pubkey`` into a 0700 temporary
  directory; the configuration is ``wg set`` (no config file, no wg-quick:
  wg-quick would touch DNS and routing of the namespace's host);
- the tunnel is 100.67.0.0/24 (server .1, client .2), with the defaults
  otherwise (MTU 1420, no keepalive).  The data cipher is fixed by the
  protocol: ChaCha20-Poly1305 with a Noise IK handshake.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tunnel.lab.procs import stop_processes
from tunnel.lab.netns import Host, wait_for

PORT = 51820
SUBNET_PREFIX = "100.67.0"  # inside 100.64.0.0/10 like mptun's, a different /24
SERVER_INNER = f"{SUBNET_PREFIX}.1"
CLIENT_INNER = f"{SUBNET_PREFIX}.2"
PREFIXLEN = 24
CIPHER = "ChaCha20-Poly1305 (Noise IK)"
SOCKET_DIR = Path("/var/run/wireguard")
ENV_FLAG = "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"

_names = itertools.count()


def versions() -> str:
    """"wireguard-go vX, wireguard-tools vY" (or what is missing)."""
    parts = []
    for argv in (["wireguard-go", "--version"], ["wg", "--version"]):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            parts.append(f"{argv[0]} not installed")
            continue
        words = (res.stdout or res.stderr).split()
        parts.append(" ".join(words[:2]) if words else f"{argv[0]} unknown")
    return ", ".join(parts)


def _keypair() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout.strip()
    return private, public


@dataclass
class WireGuardPair:
    """wireguard-go in ``server_host`` (listening on ``server_addr``) and in ``client_host``."""

    server_host: Host
    client_host: Host
    server_addr: str
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mptun-wg-")))
    port: int = PORT
    server_proc: Optional[subprocess.Popen] = None
    client_proc: Optional[subprocess.Popen] = None

    def __post_init__(self) -> None:
        n = next(_names)
        self.server_ifname = f"wg{os.getpid()}{n}s"[-15:]
        self.client_ifname = f"wg{os.getpid()}{n}c"[-15:]

    server_inner = SERVER_INNER

    def log(self, side: str) -> Path:
        return self.workdir / f"wireguard-go-{side}.log"

    def _spawn(self, host: Host, ifname: str, side: str) -> subprocess.Popen:
        env = {**os.environ, ENV_FLAG: "1", "LOG_LEVEL": "error"}
        with open(self.log(side), "ab") as out:
            proc = host.popen(["wireguard-go", "-f", ifname], env=env, stdout=out,
                              stderr=subprocess.STDOUT)
        sock = SOCKET_DIR / f"{ifname}.sock"
        wait_for(lambda: sock.exists() or proc.poll() is not None, 10,
                 message=f"wireguard-go {side} did not open {sock}")
        if proc.poll() is not None:
            raise RuntimeError(f"wireguard-go {side} exited with {proc.returncode}:\n"
                               + self.log(side).read_text(errors="replace")[-2000:])
        return proc

    def start(self, timeout: float = 15.0) -> WireGuardPair:
        """Start both ends, configure them, and return once a ping crosses the tunnel."""
        server_key, server_pub = _keypair()
        client_key, client_pub = _keypair()
        for name, key in (("server.key", server_key), ("client.key", client_key)):
            path = self.workdir / name
            path.write_text(key + "\n")
            path.chmod(0o600)
        self.server_proc = self._spawn(self.server_host, self.server_ifname, "server")
        self.client_proc = self._spawn(self.client_host, self.client_ifname, "client")
        self.server_host.run(["wg", "set", self.server_ifname,
                              "private-key", str(self.workdir / "server.key"), "listen-port", str(self.port),
                              "peer", client_pub, "allowed-ips", f"{CLIENT_INNER}/32"])
        self.client_host.run(["wg", "set", self.client_ifname,
                              "private-key", str(self.workdir / "client.key"),
                              "peer", server_pub, "allowed-ips", f"{SUBNET_PREFIX}.0/{PREFIXLEN}",
                              "endpoint", f"{self.server_addr}:{self.port}"])
        for host, ifname, addr in ((self.server_host, self.server_ifname, SERVER_INNER),
                                   (self.client_host, self.client_ifname, CLIENT_INNER)):
            host.run(["ip", "addr", "add", f"{addr}/{PREFIXLEN}", "dev", ifname])
            host.run(["ip", "link", "set", ifname, "up"])
        wait_for(lambda: self.client_host.ping(SERVER_INNER, timeout=0.5), timeout,
                 message="no ping through wireguard-go")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        stop_processes((self.client_proc, self.server_proc), timeout)
        # A killed wireguard-go leaves its socket behind; a clean exit removes it.
        for ifname in (self.server_ifname, self.client_ifname):
            (SOCKET_DIR / f"{ifname}.sock").unlink(missing_ok=True)

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
