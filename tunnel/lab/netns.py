"""Network-namespace lab: throwaway hosts joined by veth links.

Why: mptun is a multipath tunnel, so its end-to-end tests, the ``mptun lab``
demo and ``scripts/bench`` all need several isolated "hosts" with several
underlay paths between them, on one machine and without touching the real
network.  Linux network namespaces + veth pairs give exactly that; this module
builds them and, just as important, always tears them down again (processes,
namespaces, veths), even after a failure.

App layer only: the tunnel core never imports this.  Needs root.

Safety rules:
- underlay subnets must lie in the benchmarking range 198.18.0.0/15 (RFC 2544),
  so nothing a lab does can address a real network;
- interface names do not depend on the lab prefix ("veth<N>a"/"veth<N>b") and
  never exist in the root namespace (the veth is created inside host a with its
  peer directly inside host b), so concurrent labs cannot collide on them;
  only namespace names ("<prefix>-<host>") must be unique.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from pyroute2 import IPRoute, netns

log = logging.getLogger(__name__)

NETNS_DIR = "/var/run/netns"
UNDERLAY = ipaddress.ip_network("198.18.0.0/15")

_counter = itertools.count()


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             message: str = "condition not met") -> Any:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Raises ``TimeoutError(message)`` once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} (after {timeout:g}s)")
        time.sleep(interval)


def unique_prefix(tag: str) -> str:
    """A short lab prefix unique on this machine, e.g. ``"ping4711"``.

    Made of the first 4 alphanumerics of ``tag``, this process's pid and a
    counter; prefixes that already own a namespace are skipped.
    """
    head = "".join(c for c in tag if c.isalnum())[:4].lower() or "lab"
    existing = netns.listnetns()
    while True:
        prefix = f"{head}{os.getpid()}{next(_counter)}"
        if not any(name.startswith(prefix + "-") for name in existing):
            return prefix


def _netns_pids(name: str) -> list[int]:
    """Pids of all processes living in namespace ``name`` (like ``ip netns pids``)."""
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # process gone, or a kernel thread
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def _remove_netns(name: str) -> None:
    """SIGKILL whatever still lives in ``name``, then delete it (and its veths)."""
    for pid in _netns_pids(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def cleanup_stale(prefix_glob: str) -> list[str]:
    """Delete namespaces named ``<prefix>-<host>`` whose prefix matches ``prefix_glob``.

    For namespaces left behind by a crashed earlier run (e.g. at CI start).
    Beware: it also removes those of labs that are still running, so only use
    a glob that cannot match another live run.  Returns the removed names.
    """
    removed = [n for n in netns.listnetns() if fnmatch.fnmatchcase(n, f"{prefix_glob}-*")]
    for name in removed:
        _remove_netns(name)
    return removed


# Ping without depending on iputils-ping (not installed everywhere): a tiny
# raw-socket ICMP echo client, run with this interpreter inside the namespace.
_PING_SRC = r"""
import os, select, socket, struct, sys, time
addr, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
ident = os.getpid() & 0xFFFF
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
    for seq in range(count):
        body = struct.pack("!HH", ident, seq) + b"mptunlab"
        s.sendto(struct.pack("!BBH", 8, 0, csum(b"\x08\x00\x00\x00" + body)) + body, (addr, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
            pkt = s.recv(2048)
            icmp = pkt[(pkt[0] & 0x0F) * 4:]
            if icmp[0] == 0 and icmp[4:8] == body[:4]:
                sys.exit(0)
sys.exit(1)
"""

# Send COUNT IPv4 echos of SIZE payload bytes INTERVAL apart, then wait up to
# WAIT seconds for late replies; print how many distinct echos were answered.
_ECHO_COUNT_SRC = r"""
import os, select, socket, struct, sys, time
addr, count, interval, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
pad = b"mptunlab" * (max(8, int(sys.argv[5])) // 8)
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
ident = os.getpid() & 0xFFFF
answered = set()
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
    def drain(until):
        while (left := until - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
            icmp = (pkt := s.recv(2048))[(pkt[0] & 0x0F) * 4:]
            if icmp[0] == 0 and icmp[4:6] == struct.pack("!H", ident) and icmp[8:] == pad:
                answered.add(struct.unpack("!H", icmp[6:8])[0])
    for seq in range(count):
        body = struct.pack("!HH", ident, seq) + pad
        s.sendto(struct.pack("!BBH", 8, 0, csum(b"\x08\x00\x00\x00" + body)) + body, (addr, 0))
        drain(time.monotonic() + interval)
    deadline = time.monotonic() + wait
    while len(answered) < count and time.monotonic() < deadline:
        drain(min(deadline, time.monotonic() + 0.05))
print(len(answered))
"""

# The same for IPv6: ICMPv6 echo (the kernel fills in the checksum of a raw
# ICMPv6 socket, and hands back the ICMPv6 message without the IPv6 header).
_PING6_SRC = r"""
import os, select, socket, struct, sys, time
addr, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ident = os.getpid() & 0xFFFF
with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
    for seq in range(count):
        body = struct.pack("!HH", ident, seq) + b"mptunlab"
        s.sendto(struct.pack("!BBH", 128, 0, 0) + body, (addr, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
            icmp = s.recv(2048)
            if icmp[0] == 129 and icmp[4:8] == body[:4]:
                sys.exit(0)
sys.exit(1)
"""


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the command's stderr."""

    def __str__(self) -> str:
        err = self.stderr.decode(errors="replace") if isinstance(self.stderr, bytes) else self.stderr
        return super().__str__() + (f"\nstderr: {err.strip()}" if err else "")


@dataclass(frozen=True)
class Link:
    """A veth pair between two hosts; ``a_*`` is on host a, ``b_*`` on host b."""

    a: Host
    b: Host
    a_ifname: str
    b_ifname: str
    a_addr: str
    b_addr: str
    prefixlen: int


class Host:
    """One network namespace; create it with :meth:`Lab.add_host`."""

    def __init__(self, lab: Lab, name: str, netns_name: str) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns_name

    def __repr__(self) -> str:
        return f"Host({self.netns!r})"

    @contextmanager
    def ipr(self) -> Iterator[IPRoute]:
        """A pyroute2 ``IPRoute`` bound to this namespace."""
        with IPRoute(netns=self.netns) as ipr:
            yield ipr

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *map(str, argv)]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 30.0,
            **kw: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` in this namespace and wait for it.

        Output is captured as text unless ``stdout``/``stderr``/``capture_output``
        is given.  With ``check``, failure raises :class:`CommandError`.
        """
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        res = subprocess.run(self._argv(argv), timeout=timeout, **kw)
        if check and res.returncode:
            raise CommandError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start a long-running ``argv`` in this namespace, in its own process group.

        The lab kills it (and its group) on :meth:`Lab.close`.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._argv(argv), start_new_session=True, **kw)
        self.lab._procs.append(proc)
        return proc

    def sysctl(self, key: str, value: str | int) -> None:
        """Set ``key`` (e.g. ``"net.ipv4.ip_forward"``) in this namespace.

        Written to /proc/sys by ``sh`` inside the namespace (the ``sysctl``
        binary is not installed everywhere).
        """
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", 'echo "$1" > "$2"', "sh", str(value), path])

    def ping(self, addr: str, count: int = 1, timeout: float = 1.0) -> bool:
        """True if ``addr`` (IPv4, or IPv6 with ICMPv6) answers at least one of
        ``count`` ICMP echos, waiting up to ``timeout`` seconds for each."""
        src = _PING6_SRC if ":" in addr else _PING_SRC
        res = self.run([sys.executable, "-c", src, addr, str(count), str(timeout)],
                       check=False, timeout=count * timeout + 10)
        return res.returncode == 0

    def echo_count(self, addr: str, count: int, interval: float = 0.05, wait: float = 3.0,
                   size: int = 8) -> int:
        """Send ``count`` IPv4 echos (``size`` payload bytes, a multiple of 8) to
        ``addr`` ``interval`` seconds apart and return how many were answered,
        waiting up to ``wait`` seconds after the last for late replies (a loaded
        machine delays packets; that must not look like loss)."""
        res = self.run([sys.executable, "-c", _ECHO_COUNT_SRC, addr, str(count), str(interval), str(wait),
                        str(size)],
                       timeout=count * interval + wait + 10)
        return int(res.stdout.strip())

    def set_link(self, ifname: str, *, up: bool | None = None, mtu: int | None = None) -> None:
        """Bring interface ``ifname`` up/down and/or change its MTU."""
        changes: dict[str, Any] = {}
        if up is not None:
            changes["state"] = "up" if up else "down"
        if mtu is not None:
            changes["mtu"] = mtu
        with self.ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], **changes)

    def add_route(self, dst: str, gateway: str) -> None:
        """Add a route, e.g. ``add_route("default", "198.18.0.1")``."""
        with self.ipr() as ipr:
            ipr.route("add", dst=dst, gateway=gateway)

    def is_listening(self, port: int, udp: bool = False) -> bool:
        """True if a TCP (or UDP) socket is bound to ``port`` in this namespace."""
        res = self.run(["ss", "-Hln" + ("u" if udp else "t"), f"sport = :{port}"])
        return bool(res.stdout.strip())


class Lab:
    """A set of namespaces and processes that :meth:`close` removes again.

    ``prefix`` must be unique on the machine (see :func:`unique_prefix`);
    namespaces are named ``f"{prefix}-{host}"``.
    """

    def __init__(self, prefix: str, kill_timeout: float = 3.0) -> None:
        if not prefix or not all(c.isalnum() or c in "_." for c in prefix):
            raise ValueError(f"bad lab prefix {prefix!r}")
        self.prefix = prefix
        self.kill_timeout = kill_timeout
        self.hosts: dict[str, Host] = {}
        self.links: list[Link] = []
        self._procs: list[subprocess.Popen] = []
        self._links_made = 0

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        """Create namespace ``f"{prefix}-{name}"`` with ``lo`` up."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        host = Host(self, name, f"{self.prefix}-{name}")
        netns.create(host.netns)  # raises FileExistsError if the name is taken
        self.hosts[name] = host  # registered first so close() removes it on any error below
        host.set_link("lo", up=True)
        return host

    def link(self, host_a: Host, host_b: Host, subnet: str, mtu: int = 1500) -> Link:
        """Join two hosts with a veth pair, numbered ``veth<N>a`` on a / ``veth<N>b`` on b.

        a gets the first usable address of ``subnet``, b the second; both ends up.
        """
        net = ipaddress.ip_network(subnet)
        if net.version != 4 or not net.subnet_of(UNDERLAY):  # type: ignore[arg-type]
            raise ValueError(f"underlay subnet {subnet} is not inside {UNDERLAY}")
        addr_a, addr_b = itertools.islice(net.hosts(), 2)
        n = self._links_made
        self._links_made += 1
        link = Link(host_a, host_b, f"veth{n}a", f"veth{n}b", str(addr_a), str(addr_b),
                    net.prefixlen)
        with host_a.ipr() as ipr:
            # Peer goes straight into b: neither end ever appears in the root namespace.
            ipr.link("add", ifname=link.a_ifname, kind="veth",
                     peer={"ifname": link.b_ifname, "net_ns_fd": host_b.netns})
        for host, ifname, addr in ((host_a, link.a_ifname, link.a_addr),
                                   (host_b, link.b_ifname, link.b_addr)):
            with host.ipr() as ipr:
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=index, address=addr, prefixlen=net.prefixlen)
                ipr.link("set", index=index, mtu=mtu, state="up")
        self.links.append(link)
        return link

    def close(self) -> None:
        """Kill every started process, then delete every namespace (and so the veths).

        Idempotent; never raises (problems are logged).
        """
        try:
            self._kill_procs()
        except Exception:
            log.exception("lab %s: could not kill processes", self.prefix)
        for host in list(self.hosts.values()):
            try:
                _remove_netns(host.netns)  # also SIGKILLs stragglers that left the group
            except Exception:
                log.exception("lab %s: could not remove namespace %s", self.prefix, host.netns)
            del self.hosts[host.name]
        self.links.clear()

    def _kill_procs(self) -> None:
        """SIGTERM each live process group, SIGKILL what is left after kill_timeout."""
        live = [p for p in self._procs if p.poll() is None]
        self._procs.clear()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in live:
                try:
                    os.killpg(proc.pid, sig)  # leader not reaped yet, so the pgid is still ours
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + self.kill_timeout
            for proc in live:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            live = [p for p in live if p.poll() is None]
            if not live:
                return
