"""An OpenVPN server + client pair inside a Lab, as the benchmark's yardstick.

Why: mptun's performance targets are stated relative to OpenVPN on the same
machine and link (the shared test machine is too noisy for absolute numbers),
so ``scripts/bench`` needs a comparable OpenVPN tunnel started the same way as
:class:`tunnel.lab.stack.TunnelStack`: real processes in the lab's
namespaces, throwaway configuration in a temporary directory, the same
ECDSA certificates (``make_pki``), torn down by the Lab on any failure.

The configuration is chosen to be comparable to mptun, not tuned:
UDP, ``dev tun``, TLS with certificates on both sides, AES-256-GCM for the
data channel, ``dh none`` (ECDHE).  Data-channel offload is disabled so
OpenVPN runs entirely in user space like mptun (and the figures do not depend
on whether the running kernel happens to have a compatible DCO module).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tunnel.lab.procs import check_alive, read_log, stop_processes, tail
from tunnel.lab.netns import Host, wait_for
from tunnel.lab.stack import SERVER_NAME, DaemonPair

PORT = 1194
SUBNET = "100.65.0.0/24"  # inside 100.64.0.0/10 like mptun's, but a different /24
TUN = "tun0"
CIPHER = "AES-256-GCM"
READY_LINE = "Initialization Sequence Completed"


def openvpn_version() -> str:
    """First line of ``openvpn --version`` (e.g. "OpenVPN 2.6.14 x86_64-pc-linux-gnu ...")."""
    res = subprocess.run(["openvpn", "--version"], capture_output=True, text=True)
    # openvpn --version exits with status 1 on 2.x; the text is what matters.
    lines = (res.stdout or res.stderr).splitlines()
    return lines[0].strip() if lines else "unknown"


def _common_options() -> list[str]:
    """Options both ends share (one line per option, config-file syntax)."""
    return [
        f"dev {TUN}",
        "dev-type tun",
        "proto udp4",
        f"cipher {CIPHER}",
        f"data-ciphers {CIPHER}",
        "disable-dco",
        "verb 1",
        "ca ca.crt",
    ]


@dataclass
class OpenVpnPair(DaemonPair):
    """OpenVPN server in ``server_host`` listening on ``server_addr``, client in ``client_host``.

    ``workdir`` may already hold a PKI made by ``make_pki`` (e.g. the one of a
    TunnelStack); otherwise one is created there.
    """

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mptun-ovpn-")))
    subnet: str = SUBNET
    port: int = PORT
    log_names: ClassVar[tuple[str, str]] = ("openvpn-server.log", "openvpn-client.log")

    @property
    def server_inner(self) -> str:
        """The server's tunnel address: the first host of ``subnet`` (OpenVPN's ``server`` rule)."""
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    def server_config(self) -> Path:
        net = ipaddress.ip_network(self.subnet)
        lines = _common_options() + [
            f"local {self.server_addr}",
            f"port {self.port}",
            f"server {net.network_address} {net.netmask}",
            "topology subnet",
            f"cert {SERVER_NAME}.crt",
            f"key {SERVER_NAME}.key",
            "dh none",
        ]
        return self._write("openvpn-server.conf", lines)

    def client_config(self) -> Path:
        lines = _common_options() + [
            "client",
            "nobind",
            f"remote {self.server_addr} {self.port}",
            f"cert {self.client_name}.crt",
            f"key {self.client_name}.key",
            "remote-cert-tls server",
            f"verify-x509-name {SERVER_NAME} name",
        ]
        return self._write(f"openvpn-client-{self.client_name}.conf", lines)

    def _write(self, name: str, lines: list[str]) -> Path:
        path = self.workdir / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, host: Host, config: Path, log: Path) -> subprocess.Popen:
        """Run openvpn in the foreground (no --daemon) so the Lab owns and kills it."""
        with open(log, "ab") as out:
            return host.popen(["openvpn", "--cd", str(self.workdir), "--config", str(config)],
                              stdout=out, stderr=subprocess.STDOUT)

    def start_server(self) -> subprocess.Popen:
        self.server_proc = self._spawn(self.server_host, self.server_config(), self.server_log)
        wait_for(lambda: self.server_host.is_listening(self.port, udp=True) or self.server_proc.poll() is not None,
                 10, message=f"openvpn server did not start; log: {self.server_log}")
        check_alive(self.server_proc, self.server_log, "openvpn server")
        return self.server_proc

    def start_client(self) -> subprocess.Popen:
        self.client_proc = self._spawn(self.client_host, self.client_config(), self.client_log)
        return self.client_proc

    def wait_up(self, timeout: float = 20.0) -> None:
        """Wait for the client's "Initialization Sequence Completed", then for a ping through the tunnel."""
        assert self.client_proc is not None
        wait_for(lambda: READY_LINE in read_log(self.client_log) or self.client_proc.poll() is not None,
                 timeout, message=f"openvpn client did not connect; log:\n{tail(self.client_log)}")
        check_alive(self.client_proc, self.client_log, "openvpn client")
        wait_for(lambda: self.client_host.ping(self.server_inner, timeout=0.5), timeout,
                 message=f"no ping through openvpn; server log:\n{tail(self.server_log)}")

    def start(self, timeout: float = 20.0) -> OpenVpnPair:
        self.start_server()
        self.start_client()
        self.wait_up(timeout)
        return self

    def client_inner(self) -> str:
        """The address the server pushed to the client, read from the client's TUN device."""
        with self.client_host.ipr() as ipr:
            index = ipr.link_lookup(ifname=TUN)[0]
            for msg in ipr.get_addr(index=index, family=2):
                return msg.get_attr("IFA_ADDRESS")
        raise LookupError("openvpn client has no tunnel address yet")

    def stop(self, timeout: float = 5.0) -> None:
        stop_processes((self.client_proc, self.server_proc), timeout)

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


