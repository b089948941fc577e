"""OpenConnect (client) against ocserv (server) inside a Lab, as a benchmark peer.

Why: OpenConnect/ocserv is the other widely deployed VPN whose data channel
is DTLS 1.2, like mptun's, so it is the closest yardstick for what DTLS in
user space costs.  ``scripts/bench`` runs it on the same lab link as mptun.

How it is run, and why:

- certificate authentication with the same ECDSA PKI as mptun
  (:func:`tunnel.lab.stack.make_pki`): ocserv takes the user name from the
  client certificate's CN (``cert-user-oid = 2.5.4.3``), no PAM, no password
  file; the client pins the server's public key (``--servercert
  pin-sha256:...``), because the certificate names "mptun-server", not the
  lab address, and is non-interactive (``--non-inter``);
- ``ocserv -f`` in the foreground with its whole configuration, its
  ``socket-file`` and pid file in a temporary directory, and ``openconnect``
  in the foreground too, so the Lab owns both and kills them on any failure;
- the client's ``--script`` is a tiny shell script that only puts the
  address on the TUN device and routes the tunnel subnet into it.
  vpnc-script would also rewrite /etc/resolv.conf, which namespaces share
  with the machine;
- ``dtls-legacy = true`` and defaults otherwise: openconnect 9 and ocserv 1.1
  then agree on DTLS 1.2 (PSK-NEGOTIATE: a DTLS 1.2 session keyed from the
  TLS session, AES-256-GCM here).

Caveat that matters for any figure: an AnyConnect-style tunnel has two data
channels, DTLS over UDP and the TLS (CSTP) connection over TCP it was set
up on, and openconnect sends packets over TLS whenever DTLS is not
established or cannot take them.  So :class:`ChannelCounters` counts the
bytes on each channel (nftables counters in the server namespace) and the
benchmark reports the share carried by DTLS beside each OpenConnect figure.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tunnel.lab.procs import check_alive, read_log, stop_processes, tail
from tunnel.lab.netns import Host, wait_for
from tunnel.lab.stack import SERVER_NAME, DaemonPair

PORT = 4443  # TCP (TLS/CSTP) and UDP (DTLS)
NETWORK, NETMASK = "100.66.0.0", "255.255.255.0"  # inside 100.64.0.0/10, a different /24
SERVER_DEVICE = "vpns"  # ocserv names its TUN devices vpns0, vpns1, ...
CONFIGURED = "Configured as"  # "Configured as A, with SSL connected and DTLS <connected|established|in progress>"
NFT_TABLE = "mptunbenchoc"

_names = itertools.count()

_SCRIPT = """#!/bin/sh
# openconnect --script for the lab: address and subnet route on the TUN, nothing else.
case "$reason" in
connect)
    ip link set dev "$TUNDEV" up mtu "$INTERNAL_IP4_MTU"
    ip addr add "$INTERNAL_IP4_ADDRESS/32" dev "$TUNDEV"
    ip route replace "$INTERNAL_IP4_NETADDR/$INTERNAL_IP4_NETMASKLEN" dev "$TUNDEV"
    ;;
esac
exit 0
"""


def versions() -> str:
    """"OpenConnect vX, ocserv Y" (or what is missing)."""
    parts = []
    for argv, pick in ((["openconnect", "--version"], lambda w: f"OpenConnect {w[2]}"),
                       (["ocserv", "--version"], lambda w: f"ocserv {w[1]}")):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            words = (res.stdout or res.stderr).split()
            parts.append(pick(words))
        except (OSError, subprocess.TimeoutExpired, IndexError):
            parts.append(f"{argv[0]} not installed")
    return ", ".join(parts)


def spki_pin(cert_path: Path) -> str:
    """openconnect's ``--servercert`` pin of a certificate: pin-sha256:<base64 SHA-256 of its SPKI>."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return "pin-sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


class ChannelCounters:
    """Bytes on ocserv's DTLS (UDP) and TLS (TCP) port, both directions, counted by nftables.

    The table lives in the server namespace and dies with it.
    """

    CHANNELS = ("dtls", "tls")

    def __init__(self, host: Host, addr: str, port: int = PORT) -> None:
        self.host = host
        rules = [f"table inet {NFT_TABLE} {{"]
        rules += [f"  counter {c}_{d} {{}}" for c in self.CHANNELS for d in ("up", "down")]
        for chain, hook, match in (("input", "input", f"ip daddr {addr} {{}} dport {port}"),
                                   ("output", "output", f"ip saddr {addr} {{}} sport {port}")):
            direction = "up" if hook == "input" else "down"
            rules += [f"  chain {chain} {{", f"    type filter hook {hook} priority -10; policy accept;",
                      f"    {match.format('udp')} counter name dtls_{direction}",
                      f"    {match.format('tcp')} counter name tls_{direction}", "  }"]
        rules.append("}")
        host.run(["nft", "-f", "-"], stdin=None, input="\n".join(rules) + "\n")

    def read(self, reset: bool = False) -> dict[str, int]:
        """{"dtls": bytes, "tls": bytes}, both directions summed; ``reset`` zeroes them."""
        verb = "reset" if reset else "list"
        out = json.loads(self.host.run(["nft", "-j", verb, "counters", "table", "inet", NFT_TABLE]).stdout)
        totals = dict.fromkeys(self.CHANNELS, 0)
        for item in out.get("nftables", []):
            counter = item.get("counter")
            if counter:
                totals[counter["name"].split("_")[0]] += counter["bytes"]
        return totals


@dataclass
class OpenConnectPair(DaemonPair):
    """ocserv in ``server_host`` listening on ``server_addr``; openconnect in ``client_host``."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mptun-oc-")))
    port: int = PORT
    counters: Optional[ChannelCounters] = None
    log_names: ClassVar[tuple[str, str]] = ("ocserv.log", "openconnect.log")

    def __post_init__(self) -> None:
        super().__post_init__()
        # ocserv's workers run as nobody and must reach the sec-mod socket in here.
        self.workdir.chmod(0o755)
        self.client_ifname = f"oc{os.getpid()}{next(_names)}"[-15:]
        self._server_inner: Optional[str] = None

    def server_config(self) -> Path:
        w = self.workdir
        options = {
            "auth": '"certificate"',
            "listen-host": self.server_addr,
            "tcp-port": self.port,
            "udp-port": self.port,
            "run-as-user": "nobody",
            "run-as-group": "nogroup",
            "socket-file": w / "ocserv.sock",
            "pid-file": w / "ocserv.pid",
            "server-cert": w / f"{SERVER_NAME}.crt",
            "server-key": w / f"{SERVER_NAME}.key",
            "ca-cert": w / "ca.crt",
            "cert-user-oid": "2.5.4.3",
            "isolate-workers": "false",
            "use-occtl": "false",
            "max-clients": 4,
            "max-same-clients": 4,
            "keepalive": 32400,
            "dpd": 90,
            "mobile-dpd": 1800,
            "switch-to-tcp-timeout": 25,
            "try-mtu-discovery": "false",
            "auth-timeout": 240,
            "cookie-timeout": 300,
            "deny-roaming": "false",
            "rekey-time": 172800,
            "rekey-method": "ssl",
            "device": SERVER_DEVICE,
            "predictable-ips": "true",
            "ipv4-network": NETWORK,
            "ipv4-netmask": NETMASK,
            "ping-leases": "false",
            "dtls-legacy": "true",
            "cisco-client-compat": "true",
            "log-level": 1,
        }
        path = w / "ocserv.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in options.items()))
        return path

    def _client_argv(self) -> list[str]:
        script = self.workdir / "openconnect-script.sh"
        script.write_text(_SCRIPT)
        script.chmod(0o755)
        # stdbuf: openconnect's stdout is block-buffered into a file, so its progress lines
        # would only show up when it exits.
        return ["stdbuf", "-oL", "-eL", "openconnect", "--non-inter", "--interface", self.client_ifname,
                "--certificate", str(self.workdir / f"{self.client_name}.crt"),
                "--sslkey", str(self.workdir / f"{self.client_name}.key"),
                "--servercert", spki_pin(self.workdir / f"{SERVER_NAME}.crt"),
                "--script", str(script),
                f"https://{self.server_addr}:{self.port}/"]

    def start(self, timeout: float = 20.0) -> OpenConnectPair:
        """Start ocserv and openconnect; return once a ping crosses the tunnel over DTLS."""
        with open(self.server_log, "ab") as out:
            self.server_proc = self.server_host.popen(["ocserv", "-f", "-c", str(self.server_config())],
                                                      stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: (self.server_host.is_listening(self.port)
                          and self.server_host.is_listening(self.port, udp=True))
                 or self.server_proc.poll() is not None,
                 10, message=f"ocserv did not start; log:\n{tail(self.server_log)}")
        check_alive(self.server_proc, self.server_log, "ocserv")
        self.counters = ChannelCounters(self.server_host, self.server_addr, self.port)
        with open(self.client_log, "ab") as out:
            self.client_proc = self.client_host.popen(self._client_argv(), stdout=out,
                                                      stderr=subprocess.STDOUT)
        wait_for(lambda: CONFIGURED in read_log(self.client_log) or self.client_proc.poll() is not None,
                 timeout, message=f"openconnect did not connect; log:\n{tail(self.client_log)}")
        check_alive(self.client_proc, self.client_log, "openconnect")
        wait_for(self._ping_over_dtls, timeout,
                 message=f"no ping through openconnect over DTLS; log:\n{tail(self.client_log)}")
        return self

    def _ping_over_dtls(self) -> bool:
        """One ping through the tunnel, answered, with its bytes on the DTLS channel only."""
        assert self.counters is not None
        self.counters.read(reset=True)
        if not self.client_host.ping(self.server_inner, timeout=0.5):
            return False
        carried = self.counters.read()
        return carried["dtls"] > 0 and carried["tls"] == 0

    @property
    def server_inner(self) -> str:
        """The local address ocserv put on its TUN device (the same for every client)."""
        if self._server_inner is None:
            def local() -> Optional[str]:
                with self.server_host.ipr() as ipr:
                    for msg in ipr.get_addr(family=2):
                        if (msg.get_attr("IFA_LABEL") or "").startswith(SERVER_DEVICE):
                            return msg.get_attr("IFA_LOCAL")
                return None
            self._server_inner = wait_for(local, 10, message="ocserv configured no TUN device")
        return self._server_inner

    def server_ifname(self) -> str:
        """The TUN device of the (only) client's worker."""
        with self.server_host.ipr() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                if name.startswith(SERVER_DEVICE):
                    return name
        raise LookupError("ocserv has no TUN device")

    def server_pids(self) -> list[int]:
        """ocserv's main process and its descendants (sec-mod, the client's worker)."""
        if self.server_proc is None:
            return []
        return [self.server_proc.pid, *_descendants(self.server_proc.pid)]

    def cipher(self) -> str:
        """From openconnect's "Established DTLS connection ... Ciphersuite (DTLS1.2)-(PSK)-(AES-256-GCM)."."""
        for line in read_log(self.client_log).splitlines():
            if "Established DTLS connection" in line and "Ciphersuite" in line:
                return line.split("Ciphersuite", 1)[1].strip().rstrip(".")
        return "unknown"

    def stop(self, timeout: float = 5.0) -> None:
        stop_processes((self.client_proc, self.server_proc), timeout)

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)




def _descendants(pid: int) -> list[int]:
    """Pids of all live descendants of ``pid`` (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
