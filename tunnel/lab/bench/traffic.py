"""The traffic the measurements send through a setup and the probes they read around it:
iperf3 (TCP throughput, UDP packets/s), the UDP echo for round-trip times (run as a
sub-command of ``python -m tunnel.lab.bench`` inside the namespaces) and the CPU-per-packet
probe.  Kept apart from the sections so every section drives traffic the same way."""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

from tunnel.lab.bench.plan import ECHO_GRACE, ECHO_PORT, ECHO_RATE, ECHO_SIZE, IPERF_PORT
from tunnel.lab.bench.setups import Setup
from tunnel.lab.netns import wait_for
from tunnel.lab.probes import cpu_seconds, tun_counter
from tunnel.lab.stream import percentile


class CpuSample(NamedTuple):
    client_cpu: float  # seconds
    server_cpu: float
    client_packets: int  # client TUN tx_packets: read by the client, i.e. sent into the tunnel
    server_packets: int  # server TUN rx_packets: written by the server, i.e. out of the tunnel


@dataclass
class CpuProbe:
    """Context manager: CPU time of each side's tunnel processes and the packets each side handled."""

    setup: Setup
    start: Optional[CpuSample] = None
    end: Optional[CpuSample] = None

    def _sample(self) -> CpuSample:
        tuns = self.setup.tun_names()
        assert tuns is not None
        client_pids, server_pids = self.setup.pids()
        return CpuSample(cpu_seconds(client_pids), cpu_seconds(server_pids),
                         tun_counter(self.setup.client, tuns[0], "tx_packets"),
                         tun_counter(self.setup.server, tuns[1], "rx_packets"))

    def __enter__(self) -> CpuProbe:
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._sample()

    def micros_per_packet(self) -> tuple[float, float]:
        """(client side, server side) microseconds of CPU per packet."""
        assert self.start is not None and self.end is not None
        d = CpuSample(*(b - a for a, b in zip(self.start, self.end)))
        return (1e6 * d.client_cpu / max(d.client_packets, 1),
                1e6 * d.server_cpu / max(d.server_packets, 1))


def iperf(setup: Setup, seconds: float, extra: Sequence[str] = ()) -> dict:
    """One iperf3 test client -> server; returns the client's JSON ``end`` section.

    The server is started for exactly one test (``-1``) and killed if it lingers.
    """
    server = setup.server.popen(setup.wrap(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: setup.server.is_listening(IPERF_PORT) or server.poll() is not None, 10,
                 message="iperf3 server did not start")
        res = setup.client.run(setup.wrap(["iperf3", "-c", setup.target(), "-p", str(IPERF_PORT), "-J",
                                           "-t", f"{seconds:g}", *extra]),
                               check=False, timeout=seconds + 60)
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"iperf3 failed ({res.returncode}): {res.stderr.strip() or res.stdout[-500:]}")
        if "error" in out:
            raise RuntimeError(f"iperf3: {out['error']}")
        return out["end"]
    finally:
        try:
            wait_for(lambda: server.poll() is not None, 5)
        except TimeoutError:
            server.kill()
            server.wait()


def tcp_throughput(setup: Setup, seconds: float) -> float:
    """Received TCP goodput in Mbit/s."""
    return iperf(setup, seconds)["sum_received"]["bits_per_second"] / 1e6


def udp_load(setup: Setup, seconds: float, size: int, pps: Optional[float] = None) -> tuple[float, float]:
    """UDP with ``size``-byte payloads at ``pps`` (None: unlimited): (received packets/s, loss %)."""
    rate = "0" if pps is None else str(int(pps * size * 8))
    recv = iperf(setup, seconds, ["-u", "-b", rate, "-l", str(size)])["sum_received"]
    received = recv["packets"] - recv["lost_packets"]
    return received / recv["seconds"], float(recv["lost_percent"])


def echo_server(port: int) -> None:
    """Echo every UDP datagram back to its sender, forever."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", port))
        while True:
            data, addr = sock.recvfrom(2048)
            sock.sendto(data, addr)


_ECHO_HEADER = struct.Struct("!Id")  # sequence number, perf_counter() at sending


def echo_client(addr: str, port: int, seconds: float, rate: float, size: int = ECHO_SIZE) -> dict:
    """Send ``seconds * rate`` datagrams at ``rate``/s; return {"sent": n, "rtts_ms": [...]}.

    A sequence number and the sending time travel in each datagram, so a
    late echo is still timed right and duplicates are counted once.
    """
    count, interval = max(1, int(seconds * rate)), 1.0 / rate
    rtts: dict[int, float] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((addr, port))
        sock.setblocking(False)
        start = time.perf_counter()
        deadline = start + count * interval + ECHO_GRACE
        sent = 0
        while len(rtts) < count:
            now = time.perf_counter()
            if sent < count and now >= start + sent * interval:
                try:
                    sock.send(_ECHO_HEADER.pack(sent, now).ljust(size, b"\0"))
                except OSError:  # a pending ICMP error from an earlier datagram: this one is lost
                    pass
                sent += 1
                continue
            if sent == count and now >= deadline:
                break
            wake = start + sent * interval if sent < count else deadline
            if select.select([sock], [], [], max(0.0, wake - now))[0]:
                _drain_echoes(sock, rtts)
    return {"sent": count, "rtts_ms": [rtts[k] for k in sorted(rtts)]}


def _drain_echoes(sock: socket.socket, rtts: dict[int, float]) -> None:
    while True:
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            return
        except OSError:  # ICMP unreachable on the connected socket: that echo is lost
            continue
        now = time.perf_counter()
        if len(data) >= _ECHO_HEADER.size:
            seq, sent_at = _ECHO_HEADER.unpack_from(data)
            rtts.setdefault(seq, (now - sent_at) * 1e3)


def _self_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "tunnel.lab.bench", *map(str, args)]


def echo_rtt(setup: Setup, seconds: float) -> tuple[float, float, int]:
    """Round trips of a 50/s UDP echo: (p50 ms, p99 ms, datagrams lost)."""
    server = setup.server.popen(_self_argv("echo-server", ECHO_PORT))
    try:
        wait_for(lambda: setup.server.is_listening(ECHO_PORT, udp=True) or server.poll() is not None, 10,
                 message="echo server did not start")
        if server.poll() is not None:
            raise RuntimeError(f"echo server exited with {server.returncode}")
        res = setup.client.run(_self_argv("echo-client", setup.target(), ECHO_PORT, seconds, ECHO_RATE),
                               timeout=seconds + 30)
    finally:
        server.kill()
        server.wait()
    out = json.loads(res.stdout)
    rtts = sorted(out["rtts_ms"])
    if not rtts:
        raise RuntimeError("no echo came back")
    return percentile(rtts, 50), percentile(rtts, 99), out["sent"] - len(rtts)


def sleep_until(deadline: float) -> None:
    """Sleep until time.monotonic() reaches ``deadline`` (a schedule, not a guess)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)
