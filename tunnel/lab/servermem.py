"""Server memory per connected tunnel: a real `mptun server`, simulated clients.

The server runs in a lab namespace listening on loopback; one simulator
process in the same namespace runs N in-memory ClientCores (real DTLS
handshakes, real UDP sockets, one certificate per client name) until the
server reports N tunnels, and keeps them alive with their probes while the
server's RSS is read from /proc.  RSS delta / N is the cost of a tunnel.

    python -m tunnel.lab.servermem run --tunnels 20,100
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path

from tunnel.app import control
from tunnel.lab.stack import PORT, SERVER_INNER, SERVER_NAME, make_pki, mptun_argv, write_toml


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("no VmRSS")


def simulate(workdir: Path, names: list[str], seconds: float) -> None:
    """Keep one tunnel per name up for ``seconds`` (run inside the server's namespace)."""
    from tunnel.core.client import ClientCore
    from tunnel.core.settings import ClientSettings, PathSettings
    from tunnel.wire.dtls import make_context

    sel = selectors.DefaultSelector()
    cores = []
    for name in names:
        ctx = make_context("client", workdir / f"{name}.crt", workdir / f"{name}.key", workdir / "ca.crt", SERVER_NAME)
        core = ClientCore(ctx, ClientSettings(path=PathSettings(timeout=30.0, idle_probe_interval=None)))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", PORT))
        sock.setblocking(False)
        core.add_path("lo", ("127.0.0.1", PORT), time.monotonic())
        cores.append((core, sock))
        sel.register(sock, selectors.EVENT_READ, core)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = time.monotonic()
        for core, sock in cores:
            core.handle_timer(now)
            for _, dgram, _ in core.datagrams_to_send():
                try:
                    sock.send(dgram)
                except OSError:
                    pass
            while core.next_event() is not None:
                pass
        for key, _ in sel.select(0.02):
            core = key.data
            try:
                while True:
                    core.receive_datagram("lo", key.fileobj.recv(65535), time.monotonic())
            except (BlockingIOError, ConnectionRefusedError):
                pass


def measure(counts: list[int], settle: float = 3.0) -> dict:
    from tunnel.lab.netns import Lab, unique_prefix, wait_for

    top = max(counts)
    workdir = Path(tempfile.mkdtemp(prefix="mptun-mem-"))
    names = [f"sim{i:04d}" for i in range(top)]
    make_pki(workdir, clients=names)
    cfg = write_toml(workdir / "server.toml", {"server": {
        "listen": f"127.0.0.1:{PORT}", "certificate": f"{SERVER_NAME}.crt", "key": f"{SERVER_NAME}.key",
        "ca": "ca.crt", "address": f"{SERVER_INNER}/16", "control": str(workdir / "server.sock"),
        "timeout": 30.0, "max_tunnels": top + 10,
    }})
    results = {}
    with Lab(unique_prefix("mem")) as lab:
        host = lab.add_host("srv")
        server = host.popen(mptun_argv("server", "-c", str(cfg)), stderr=open(workdir / "server.log", "ab"))
        sock = workdir / "server.sock"
        wait_for(lambda: sock.exists(), 10, message="server did not start")
        time.sleep(settle)  # let the interpreter finish its start-up allocations
        base = rss_kib(server.pid)
        results["base_rss_kib"] = base
        done = 0
        sims = []
        for n in sorted(counts):
            batch = names[done:n]
            (workdir / "names.json").write_text(json.dumps(batch))
            sims.append(host.popen([sys.executable, "-m", "tunnel.lab.servermem", "simulate", str(workdir), "600"]))
            wait_for(lambda: len(control.query(sock)["tunnels"]) >= n, 120, interval=0.5,
                     message=f"server did not reach {n} tunnels")
            time.sleep(settle)
            rss = rss_kib(server.pid)
            results[str(n)] = {"rss_kib": rss, "kib_per_tunnel": round((rss - base) / n, 1)}
            done = n
        for p in sims:
            p.kill()
    return results


def section(results: dict) -> str:
    rows = [f"| {n} | {r['rss_kib'] / 1024:.1f} | {r['kib_per_tunnel']:.1f} |"
            for n, r in results.items() if n != "base_rss_kib"]
    return "\n".join([
        "## Server memory per tunnel",
        "",
        "A real `mptun server` in a lab namespace; simulated clients (in-memory ClientCores with real",
        "DTLS handshakes over loopback, one certificate each) hold N tunnels of one path.",
        f"Server RSS with no tunnel: {results['base_rss_kib'] / 1024:.1f} MiB.",
        "",
        "| tunnels | server RSS (MiB) | RSS delta per tunnel (KiB) |",
        "|--:|--:|--:|",
        *rows,
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunnel.lab.servermem")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tunnels", default="20,100")
    s = sub.add_parser("simulate")
    s.add_argument("workdir")
    s.add_argument("seconds", type=float)
    args = p.parse_args(argv)
    if args.cmd == "simulate":
        workdir = Path(args.workdir)
        simulate(workdir, json.loads((workdir / "names.json").read_text()), args.seconds)
        return 0
    res = measure([int(x) for x in args.tunnels.split(",")])
    print(section(res))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
