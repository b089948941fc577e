"""What the lab reads off the kernel to measure the cost of a tunnel: the CPU time of processes
(/proc/PID/stat) and the packet counters.  Used by the benchmark and by
:mod:`tunnel.lab.fleetpps`, which is why it is not part of either."""

from __future__ import annotations

import os
from typing import Iterable

from tunnel.lab.netns import Host

CLK_TCK = os.sysconf("SC_CLK_TCK")  # ticks per second of /proc/PID/stat times


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of ``pids`` (all their threads) from /proc/PID/stat, in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # skip "pid (comm)": comm may hold spaces
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def tun_counter(host: Host, ifname: str, counter: str) -> int:
    """A packet counter of ``ifname`` in ``host`` (e.g. "tx_packets").

    On a TUN device, tx_packets counts packets the tunnel process read from it
    and rx_packets those it wrote into it.
    """
    with host.ipr() as ipr:
        links = ipr.get_links(ifname=ifname)
        if not links:
            raise RuntimeError(f"{ifname} is gone in {host.name}: the tunnel process exited or restarted")
        return int(links[0].get_attr("IFLA_STATS64")[counter])
