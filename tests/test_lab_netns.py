"""The namespace lab itself: links work, and close() leaves nothing behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

from tunnel.lab.netns import NETNS_DIR, Lab, _netns_pids, unique_prefix, wait_for

pytestmark = pytest.mark.netns


def _netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ping_both_ways(two_hosts) -> None:
    assert two_hosts.client.ping(two_hosts.server_addr)
    assert two_hosts.server.ping(two_hosts.client_addr)
    assert not two_hosts.client.ping("198.19.255.254", timeout=0.2)  # no route: no answer


def test_link_addresses_and_mtu(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    link = lab.link(a, b, "198.18.1.8/29", mtu=1400)
    assert (link.a_addr, link.b_addr, link.prefixlen) == ("198.18.1.9", "198.18.1.10", 29)
    assert len(link.a_ifname) <= 15 and link.a_ifname != link.b_ifname
    out = b.run(["ip", "-o", "addr", "show", "dev", link.b_ifname]).stdout
    assert "198.18.1.10/29" in out
    assert "mtu 1400" in b.run(["ip", "link", "show", link.b_ifname]).stdout
    with pytest.raises(ValueError):
        lab.link(a, b, "10.0.0.0/30")  # outside 198.18.0.0/15


def test_routing_through_a_router(lab: Lab) -> None:
    a, r, b = lab.add_host("a"), lab.add_host("r"), lab.add_host("b")
    left, right = lab.link(r, a, "198.18.2.0/30"), lab.link(r, b, "198.18.2.4/30")
    a.add_route("default", left.a_addr)
    b.add_route("default", right.a_addr)
    assert not a.ping(right.b_addr, timeout=0.2)  # forwarding is off by default
    r.sysctl("net.ipv4.ip_forward", 1)
    assert r.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    assert a.ping(right.b_addr)
    r.set_link(right.a_ifname, up=False)
    assert not a.ping(right.b_addr, timeout=0.2)


def test_close_kills_processes_and_removes_namespaces() -> None:
    lab = Lab(unique_prefix("close"), kill_timeout=0.5)
    with lab:
        host = lab.add_host("h")
        polite = host.popen(["sleep", "1000"])
        # Ignores SIGTERM (and so does its child): only SIGKILL ends it.
        stubborn = host.popen(["sh", "-c", "trap '' TERM; sleep 1000; :"])
        # 3 = sleep, sh (trap set) and sh's sleep child
        wait_for(lambda: len(_netns_pids(host.netns)) == 3, timeout=5,
                 message="processes did not start")
        netns_name = host.netns
    assert not _netns_exists(netns_name)
    assert (polite.returncode, stubborn.returncode) == (-signal.SIGTERM, -signal.SIGKILL)
    assert not _pid_alive(polite.pid) and not _pid_alive(stubborn.pid)
    lab.close()  # idempotent


def test_close_after_exception_inside_with() -> None:
    prefix = unique_prefix("exc")
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(prefix) as lab:
            a, b = lab.add_host("a"), lab.add_host("b")
            lab.link(a, b, "198.18.0.4/30")
            proc = a.popen(["sleep", "1000"])
            raise RuntimeError("boom")
    assert not any(n.startswith(prefix + "-") for n in os.listdir(NETNS_DIR))
    assert proc.returncode is not None


def test_half_built_lab_closes_cleanly() -> None:
    lab = Lab(unique_prefix("half"))
    a, b = lab.add_host("a"), lab.add_host("b")
    a.run(["ip", "link", "add", "veth0a", "type", "veth", "peer", "name", "x"])  # the name link() will want
    with pytest.raises(Exception):
        lab.link(a, b, "198.18.0.8/30")
    subprocess.run(["ip", "netns", "delete", b.netns], check=True)  # gone behind the lab's back
    lab.close()
    assert not _netns_exists(a.netns)


def test_two_labs_coexist(lab: Lab) -> None:
    with Lab(unique_prefix("other")) as other:
        hosts = [(l.add_host("x"), l.add_host("y")) for l in (lab, other)]
        # Same host names, same interface names and even the same subnet: isolated.
        for x, y in hosts:
            lab_link = x.lab.link(x, y, "198.18.0.0/30")
            assert x.ping(lab_link.b_addr)
        assert hosts[0][0].netns != hosts[1][0].netns
    assert _netns_exists(hosts[0][0].netns) and not _netns_exists(hosts[1][0].netns)


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed")
def test_iperf3_tcp(two_hosts) -> None:
    port = 5201
    server = two_hosts.server.popen(["iperf3", "-s", "-1", "-p", str(port)])
    wait_for(lambda: two_hosts.server.is_listening(port), timeout=10,
             message="iperf3 server did not listen")
    res = two_hosts.client.run(
        ["iperf3", "-c", two_hosts.server_addr, "-p", str(port), "-t", "1", "-J"], timeout=30)
    report = json.loads(res.stdout)
    assert report["end"]["sum_received"]["bits_per_second"] > 0
    server.wait(timeout=10)  # -1: serves one client, then exits
