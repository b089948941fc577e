"""Linux MPTCP across the paths of a MultipathTopology, as the aggregation reference.

Why: when mptun's ``balance`` mode spreads one TCP flow over two links, the
question is not only "how close to the sum of the links" but "how close to
what the kernel's own multipath transport gets on the very same links".
Linux MPTCP (RFC 8684) is that reference: the same iperf3, made MPTCP with
``mptcpize run`` (an LD_PRELOAD shim from Debian's ``mptcpize`` package that
turns the program's TCP sockets into MPTCP ones), on the same rate-limited
paths, with no tunnel at all.

Set-up (all inside the lab's namespaces, per-namespace settings):

- ``net.mptcp.enabled = 1`` on client and server;
- ``ip mptcp limits set subflow N add_addr_accepted N`` on both ends;
- on the client one endpoint per path, ``ip mptcp endpoint add <path addr>
  dev <path if> subflow``: the kernel's path manager opens an extra subflow
  from each address; the topology's source rules (``from 198.18.i.2 lookup
  100+i``) send each subflow out through its own path.

:func:`mib` reads the kernel's MPTcpExt counters (``/proc/net/netstat`` is
per namespace), so the benchmark can tell an MPTCP connection that really
joined a second subflow from one that quietly fell back to plain TCP.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Sequence

from tunnel.lab.netns import Host
from tunnel.lab.topology import MultipathTopology

SYSCTL = "/proc/sys/net/mptcp/enabled"


def available() -> str:
    """Why MPTCP cannot be used here, or "" if it can."""
    if shutil.which("mptcpize") is None:
        return "mptcpize is not installed"
    try:
        open(SYSCTL).close()
    except OSError:
        return f"the kernel has no MPTCP ({SYSCTL} missing)"
    return ""


def version() -> str:
    """The Debian version of the mptcpize package (the tool prints none)."""
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "mptcpize"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"mptcpize {res.stdout.strip()}" if res.returncode == 0 else "mptcpize not installed"


def enable(topo: MultipathTopology, paths: Sequence[int] | None = None) -> None:
    """Enable MPTCP on client and server with one subflow endpoint per path (default: all)."""
    indexes = list(range(len(topo.paths))) if paths is None else list(paths)
    limit = str(max(2, len(indexes)))
    for host in (topo.client, topo.server):
        host.sysctl("net.mptcp.enabled", 1)
        host.run(["ip", "mptcp", "limits", "set", "subflow", limit, "add_addr_accepted", limit])
    for i in indexes:
        path = topo.paths[i]
        topo.client.run(["ip", "mptcp", "endpoint", "add", path.client_addr, "dev", path.client_ifname,
                         "subflow"])


def disable(topo: MultipathTopology) -> None:
    """Remove the client's subflow endpoints again (what :func:`enable` added), so the lab
    that goes on after an MPTCP measurement is as it was for plain TCP."""
    topo.client.run(["ip", "mptcp", "endpoint", "flush"])


def argv(command: Sequence[str]) -> list[str]:
    """``command`` run with its TCP sockets turned into MPTCP ones."""
    return ["mptcpize", "run", *command]


def mib(host: Host) -> dict[str, int]:
    """The MPTcpExt counters of ``host``'s namespace."""
    lines = host.run(["cat", "/proc/net/netstat"]).stdout.splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("MPTcpExt:"):
            return {k: int(v) for k, v in zip(names.split()[1:], values.split()[1:])}
    return {}


def joined_subflows(before: dict[str, int], after: dict[str, int]) -> int:
    """Extra subflows the client saw established between two :func:`mib` readings."""
    key = "MPJoinSynAckRx"
    return after.get(key, 0) - before.get(key, 0)
