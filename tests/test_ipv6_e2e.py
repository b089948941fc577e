"""IPv6 inside the tunnel, end to end: real mptun processes in namespaces, real DTLS."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunnel.lab.netns import wait_for
from tunnel.lab.stack import mptun_argv

pytestmark = pytest.mark.netns

POOL6 = "fd00:6d70::/64"
SERVER6 = "fd00:6d70::1"

FORGE6 = """
import socket, struct, sys
src, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IPV6_HDRINCL: we write the header
for i in range(n):
    payload = b"forged%03d" % i
    udp = struct.pack(">HHHH", 40000, port, 8 + len(payload), 0) + payload  # checksum 0: never delivered anyway
    ip = struct.pack(">IHBB", 6 << 28, len(udp), 17, 64) + socket.inet_pton(socket.AF_INET6, src) \\
        + socket.inet_pton(socket.AF_INET6, dst)
    s.sendto(ip + udp, (dst, 0))
"""

RECEIVE6 = """
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(("::", 6000)); s.settimeout(3)
n = 0
try:
    while True:
        s.recv(100); n += 1
except socket.timeout:
    pass
print(n)
"""

SEND6 = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"honest%d" % i, (sys.argv[1], 6000))
"""


def test_ping6_both_ways_and_forged_ipv6_source_dropped(tunnel_stack):
    stack = tunnel_stack
    stack.server_overrides["pool6"] = POOL6
    stack.server_overrides["routes"] = ["10.9.0.0/16", "fd00:99::/48"]  # pushed to the client, IPv6 too
    stack.start()
    client, server = stack.client_host, stack.server_host
    wait_for(lambda: stack.client_status().get("address6"), 10, message="client has no IPv6 address")
    client6 = stack.client_status()["address6"].split("/")[0]
    assert client6 == "fd00:6d70::2"
    (tunnel,) = stack.server_status()["tunnels"]
    assert tunnel["address6"] == "fd00:6d70::2/64"
    out = subprocess.run(mptun_argv("status", "-s", str(stack.server_socket)), capture_output=True, text=True)
    assert "fd00:6d70::2/64" in out.stdout, out
    # the address is on the TUN device, and IPv6 has no link-local address there
    shown = client.run(["ip", "-6", "addr", "show", "dev", "mptun0"]).stdout
    assert "fd00:6d70::2/64" in shown and "fe80:" not in shown
    assert "fd00:99::/48 dev mptun0" in client.run(["ip", "-6", "route", "show"]).stdout
    assert "10.9.0.0/16 dev mptun0" in client.run(["ip", "route", "show"]).stdout
    assert client.ping(SERVER6, count=3, timeout=2.0)
    assert server.ping(client6, count=3, timeout=2.0)

    recv = server.popen([sys.executable, "-c", RECEIVE6], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: server.is_listening(6000, udp=True), 5, message="receiver")
    client.run([sys.executable, "-c", FORGE6, "fd00:6d70::99", SERVER6, "6000", "20"])
    client.run([sys.executable, "-c", SEND6, SERVER6, "5"])
    out, _ = recv.communicate(timeout=15)
    assert int(out) == 5  # only the honest ones
    assert stack.server_status()["tunnels"][0]["spoofed"] == 20
    # IPv4 is unaffected
    assert client.ping("100.64.0.1", timeout=2.0)


def test_without_pool6_the_tun_has_no_ipv6(tunnel_stack):
    stack = tunnel_stack
    stack.start()
    assert stack.client_status()["address6"] is None
    flag = stack.client_host.run(["cat", "/proc/sys/net/ipv6/conf/mptun0/disable_ipv6"]).stdout.strip()
    assert flag == "1"
