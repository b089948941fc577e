"""Aggregate packets/s of one `mptun server` with N clients sending at once.

A server namespace and N client namespaces, each client joined to the
server by its own /30 veth link (198.18.i.0/30, server .1, client .2) and
running a real `mptun client` with that one path.  In the same lab, two
phases of the same length:

- ``tunnel``: every client floods ``iperf3 -u -b 0 -l 100`` through its
  tunnel to the server's inner address (one iperf3 server per client,
  all in the server namespace), all N at the same time;
- ``raw``: the same N namespaces flood the server's underlay address of
  their link, no tunnel (the ceiling of this machine for the same work).

Aggregate = sum over the clients of (packets - lost) / seconds as the
iperf3 receivers report them.  The server's CPU per packet is the CPU
time (utime + stime) of the `mptun server` process during the tunnel phase
over the packets it wrote into its TUN device (rx_packets).

    python -m tunnel.lab.fleetpps --clients 20 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tunnel.app import control
from tunnel.lab.netns import Host, Lab, unique_prefix, wait_for
from tunnel.lab.probes import cpu_seconds, tun_counter
from tunnel.lab.stack import PORT, SERVER_INNER, SERVER_NAME, make_pki, mptun_argv, write_toml

BASE_PORT = 5301  # iperf3 server of client i listens on BASE_PORT + i
SIZE = 100  # UDP payload bytes


def _cpu_seconds(pid: int) -> float:
    return cpu_seconds([pid])


def _tun_rx(host: Host, ifname: str) -> int:
    return tun_counter(host, ifname, "rx_packets")


def _flood(server: Host, clients: list[Host], targets: list[str], seconds: float) -> list[dict]:
    """All clients at once: client i floods targets[i]; returns each receiver's ``sum_received``."""
    ports = [BASE_PORT + i for i in range(len(clients))]
    servers = [server.popen(["iperf3", "-s", "-1", "-p", str(p)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL) for p in ports]
    try:
        wait_for(lambda: all(server.is_listening(p) for p in ports), 20, interval=0.2,
                 message="iperf3 servers did not start")
        senders = [host.popen(["iperf3", "-c", target, "-p", str(port), "-J", "-u", "-b", "0",
                               "-l", str(SIZE), "-t", f"{seconds:g}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for host, target, port in zip(clients, targets, ports)]
        out = []
        for host, proc in zip(clients, senders):
            stdout, stderr = proc.communicate(timeout=seconds + 90)
            try:
                res = json.loads(stdout)
            except json.JSONDecodeError:
                raise RuntimeError(f"iperf3 in {host.name} failed ({proc.returncode}): "
                                   f"{stderr.strip() or stdout[-300:]}") from None
            if "error" in res:
                raise RuntimeError(f"iperf3 in {host.name}: {res['error']}")
            out.append(res["end"]["sum_received"])
        return out
    finally:
        for proc in servers:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _aggregate(sums: list[dict]) -> tuple[float, float, int]:
    """(aggregate received packets/s, loss %, packets received) of one phase."""
    received = [s["packets"] - s["lost_packets"] for s in sums]
    sent = sum(s["packets"] for s in sums)
    pps = sum(r / s["seconds"] for r, s in zip(received, sums))
    return pps, 100.0 * (sent - sum(received)) / max(1, sent), sum(received)


def measure(n: int = 20, seconds: float = 5.0) -> dict:
    """Run both phases once in a fresh lab; returns the figures (see the module docstring)."""
    if shutil.which("iperf3") is None:
        raise RuntimeError("iperf3 is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="mptun-fleet-"))
    names = [f"f{i:02d}" for i in range(1, n + 1)]
    try:
        make_pki(workdir, clients=names)
        with Lab(unique_prefix("flt")) as lab:
            server = lab.add_host("srv")
            clients, underlay = [], []
            for i, name in enumerate(names, start=1):
                host = lab.add_host(name)
                link = lab.link(server, host, f"198.18.{i}.0/30")
                clients.append(host)
                underlay.append(link.a_addr)
            sock = workdir / "server.sock"
            cfg = write_toml(workdir / "server.toml", {"server": {
                "listen": f"0.0.0.0:{PORT}", "certificate": f"{SERVER_NAME}.crt", "key": f"{SERVER_NAME}.key",
                "ca": "ca.crt", "address": f"{SERVER_INNER}/24", "control": str(sock), "tun": "mptun0",
                "log_level": "info", "handshake_rate": 1000.0, "timeout": 10.0,
            }})
            log = open(workdir / "server.log", "ab")
            srv = server.popen(mptun_argv("server", "-c", str(cfg)), stdout=subprocess.DEVNULL, stderr=log)
            wait_for(lambda: "listening on" in (workdir / "server.log").read_text() or srv.poll() is not None,
                     20, message="server did not start")
            if srv.poll() is not None:
                raise RuntimeError(f"server exited: {(workdir / 'server.log').read_text()[-500:]}")
            for name, host, addr in zip(names, clients, underlay):
                ccfg = write_toml(workdir / f"{name}.toml", {"client": {
                    "server": f"{addr}:{PORT}", "server_name": SERVER_NAME, "certificate": f"{name}.crt",
                    "key": f"{name}.key", "ca": "ca.crt", "tun": "mptun0", "log_level": "info",
                    "timeout": 10.0, "control": str(workdir / f"{name}.sock"),
                }})
                host.popen(mptun_argv("client", "-c", str(ccfg)), stdout=subprocess.DEVNULL,
                           stderr=open(workdir / f"{name}.log", "ab"))
            try:
                wait_for(lambda: len(control.query(sock)["tunnels"]) == n, 120, interval=0.5)
            except TimeoutError:
                up = {t.get("name") for t in control.query(sock)["tunnels"]}
                down = [name for name in names if name not in up]
                tail = (workdir / f"{down[0]}.log").read_text()[-400:] if down else ""
                raise TimeoutError(f"{len(down)} of {n} clients not connected after 120 s ({', '.join(down)});"
                                   f" {down[0] if down else ''} log: {tail}") from None
            for host in clients:
                wait_for(lambda: host.ping(SERVER_INNER, timeout=1.0), 30,
                         message=f"{host.name}: no ping through the tunnel")
            cpu0, rx0 = _cpu_seconds(srv.pid), _tun_rx(server, "mptun0")
            tunnel = _flood(server, clients, [SERVER_INNER] * n, seconds)
            cpu1, rx1 = _cpu_seconds(srv.pid), _tun_rx(server, "mptun0")
            raw = _flood(server, clients, underlay, seconds)
            if srv.poll() is not None or len(control.query(sock)["tunnels"]) != n:
                raise RuntimeError("the server or a tunnel went away during the test")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    t_pps, t_loss, _ = _aggregate(tunnel)
    r_pps, r_loss, _ = _aggregate(raw)
    written = rx1 - rx0
    return {
        "clients": n,
        "tunnel_pps": t_pps, "tunnel_loss": t_loss,
        "raw_pps": r_pps, "raw_loss": r_loss,
        "ratio": t_pps / r_pps if r_pps else 0.0,
        "server_cpu_us": 1e6 * (cpu1 - cpu0) / max(1, written),
        "per_client_min_pps": min((s["packets"] - s["lost_packets"]) / s["seconds"] for s in tunnel),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunnel.lab.fleetpps")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.clients, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
