"""Socket and TUN write errors are survived and counted (issue #8 part 5).

The shell pieces run with real sockets and a real TUN device inside a lab
namespace (a helper script, so nothing touches the test's own namespace):

- a UDP socket with a tiny SO_SNDBUF behind a slow token bucket (tbf) queue
  fills up: sends fail with EAGAIN;
- the same with a tiny tbf queue and IP_RECVERR: the qdisc drops and the
  send fails with ENOBUFS (without IP_RECVERR, as on mptun's own sockets,
  Linux drops such datagrams silently and counts them in /proc/net/snmp
  Udp SndbufErrors);
- a TUN write of a packet that is not IP (EINVAL) or while the TUN link is
  down (EIO).

End to end, the daemons keep running and their ``io`` counters rise
(``mptun status``, ``mptun_io_*_total`` in the metrics).
"""

from __future__ import annotations

import json
import sys

import pytest

from tunnel.lab.netns import wait_for
from tunnel.lab.stack import SERVER_INNER

pytestmark = pytest.mark.netns

SEND_SCRIPT = r"""
import errno, json, socket, sys
from collections import Counter
from tunnel.io.shell import ClientShell
from tunnel.io.udp import BatchSocket

IP_RECVERR = 11
dst, recverr = (sys.argv[1], 9), sys.argv[2] == "1"


class Core:  # the shell only takes datagrams from it here
    def __init__(self):
        self.out = []

    def datagrams_to_send(self):
        out, self.out = self.out, []
        return out


s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
if recverr:
    s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
s.connect(dst)
s.setblocking(False)
core = Core()
shell = ClientShell(core, None, None, lambda: {}, lambda ev: None)
shell.socks["p"] = sock = BatchSocket(s)
seen = Counter()
orig = shell._send_error
shell._send_error = lambda exc: (seen.update([errno.errorcode[exc.errno]]), orig(exc))
for gso in (True, False):  # a GSO run of equal datagrams, and one datagram per call
    sock.gso = gso
    for _ in range(30):
        core.out = [("p", bytes(1200), 0)] * 8 + [("p", bytes(1200), 0x10)]
        shell.send_out()
print(json.dumps({"counters": shell.counters, "errnos": seen}))
"""

TUN_SCRIPT = r"""
import json, os, subprocess
from tunnel.io.shell import Shell
from tunnel.io.tun import TunDevice

def ipv4(payload=b"x" * 20):
    total = 20 + len(payload)
    return (bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(4) + bytes([64, 17, 0, 0])
            + bytes([100, 64, 0, 2]) + bytes([100, 64, 0, 1]) + payload)

class Core:
    to_tun = []

tun = TunDevice("mptf%d")
shell = Shell(Core(), tun.fd)
ip = lambda *a: subprocess.run(["ip", *a], check=True)
ip("link", "set", tun.name, "up")
result = {}
shell.core.to_tun = [bytes(40), b"\x00", ipv4()]  # not IP, one byte, a good one
shell.write_tun()
result["malformed"] = dict(shell.counters)
ip("link", "set", tun.name, "down")
shell.core.to_tun = [ipv4(), ipv4()]
shell.write_tun()
result["link_down"] = dict(shell.counters)
ip("link", "set", tun.name, "up")
shell.core.to_tun = [ipv4()]
shell.write_tun()
result["up_again"] = dict(shell.counters)
try:
    os.write(tun.fd, bytes(40))
except OSError as exc:
    result["malformed_errno"] = exc.errno
ip("link", "set", tun.name, "down")
try:
    os.write(tun.fd, ipv4())
except OSError as exc:
    result["down_errno"] = exc.errno
tun.close()
print(json.dumps(result))
"""


def _tbf(host, ifname: str, limit: str) -> None:
    host.run(["tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", "8kbit", "burst", "1600", "limit", limit])


def _script(host, src: str, *args: str) -> dict:
    res = host.run([sys.executable, "-c", src, *args], timeout=60)
    return json.loads(res.stdout)


def test_full_socket_buffer_eagain_is_counted_not_fatal(two_hosts):
    # the sender's datagrams wait in a slow, long qdisc queue: its 4 KiB send buffer is full at once
    _tbf(two_hosts.client, two_hosts.link.b_ifname, "10mb")
    out = _script(two_hosts.client, SEND_SCRIPT, two_hosts.server_addr, "0")
    errnos = out["errnos"]
    assert errnos.get("EAGAIN", 0) >= 400, out  # GSO runs and single sends failed, and it went on
    assert out["counters"]["send_errors"] == sum(errnos.values())


def test_qdisc_drop_enobufs_is_counted_not_fatal(two_hosts):
    _tbf(two_hosts.client, two_hosts.link.b_ifname, "1600")  # room for one datagram
    out = _script(two_hosts.client, SEND_SCRIPT, two_hosts.server_addr, "1")
    errnos = out["errnos"]
    assert errnos.get("ENOBUFS", 0) >= 400, out
    assert out["counters"]["send_errors"] == sum(errnos.values())


def test_tun_write_errors_are_counted_not_fatal(lab):
    host = lab.add_host("tun")
    out = _script(host, TUN_SCRIPT)
    assert out["malformed_errno"] == 22 and out["down_errno"] == 5  # EINVAL, EIO: what the kernel says
    assert out["malformed"]["tun_write_errors"] == 2  # the good packet after them was written
    assert out["link_down"]["tun_write_errors"] == 4
    assert out["up_again"]["tun_write_errors"] == 4


def test_daemons_survive_tun_and_socket_errors_and_count_them(tunnel_stack):
    stack = tunnel_stack
    stack.start()
    server, client = stack.server_host, stack.client_host
    # TUN write errors on the server: its TUN is down while the client sends into the tunnel
    server.run(["ip", "link", "set", "mptun0", "down"])
    blast = (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"end = time.monotonic() + 1.0\n"
        "while time.monotonic() < end:\n"
        f"    s.sendto(bytes(1200), ('{SERVER_INNER}', 9))\n"
        "    time.sleep(0.001)\n"
    )
    client.run([sys.executable, "-c", blast])
    wait_for(lambda: stack.server_status()["io"]["tun_write_errors"] >= 100, 10,
             message=f"server TUN write errors not counted: {stack.server_status()['io']}")
    server.run(["ip", "link", "set", "mptun0", "up"])
    stack.wait_up(timeout=10)
    assert stack.server_proc.poll() is None
    # full send buffer on the client: its underlay drains at 8 kbit/s into a deep queue
    before = stack.client_status()["io"]["send_errors"]
    _tbf(client, stack.hosts.link.b_ifname, "100mb")
    fast = blast.replace("time.sleep(0.001)", "pass").replace("1.0", "2.0")
    client.run([sys.executable, "-c", fast])
    wait_for(lambda: stack.client_status()["io"]["send_errors"] > before, 10,
             message=f"client send errors not counted: {stack.client_status()['io']}")
    client.run(["tc", "qdisc", "del", "dev", stack.hosts.link.b_ifname, "root"])
    stack.wait_up(timeout=15)  # and the tunnel carries traffic again
    assert stack.client_proc.poll() is None and stack.server_proc.poll() is None
    for log in (stack.client_log, stack.server_log):
        assert "Traceback" not in log.read_text()
    io = stack.client_status()["io"]
    print(f"client io after the full-buffer phase: {io}; server io: {stack.server_status()['io']}")
