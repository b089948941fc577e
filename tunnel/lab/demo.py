"""`mptun lab`: the whole job on one machine, no second host needed.

Builds a client and a server namespace joined by a veth link (198.18.0.0/30),
makes throwaway certificates, starts real `mptun server` and `mptun client`
processes, pings and runs iperf3 through the tunnel (and over the raw link for
comparison), prints a summary, and tears everything down, on Ctrl-C and on
failure too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

from tunnel.lab.netns import Lab, unique_prefix, wait_for
from tunnel.lab.stack import SERVER_INNER, TunnelStack

PINGS = 10


def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"  .. {msg}", file=sys.stderr, flush=True)


def iperf3_tcp(client, server, target: str, seconds: float, reverse: bool = False) -> float:
    """TCP goodput client->server (server->client with ``reverse``) in bit/s."""
    srv = server.popen(["iperf3", "-s", "-1", "-B", target], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: server.is_listening(5201), 5, message="iperf3 server did not start")
        argv = ["iperf3", "-c", target, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
        res = client.run(argv, timeout=seconds + 30)
        return json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


def run_demo(duration: float, progress: bool) -> dict:
    if shutil.which("iperf3") is None:
        raise SystemExit("mptun lab: iperf3 is not installed (apt-get install iperf3)")
    figures: dict = {}
    with Lab(unique_prefix("lab")) as lab:
        _progress(progress, "building namespaces srv and cli, veth 198.18.0.0/30")
        server, client = lab.add_host("srv"), lab.add_host("cli")
        link = lab.link(server, client, "198.18.0.0/30")
        _progress(progress, "generating throwaway certificates (CA, server, client 'alice')")
        stack = TunnelStack(server, client, link.a_addr)
        try:
            _progress(progress, "starting mptun server and client")
            t0 = time.monotonic()
            stack.start()
            figures["tunnel_up_s"] = round(time.monotonic() - t0, 3)
            status = stack.server_status()
            path = status["tunnels"][0]["paths"][0]
            figures["client_address"] = stack.client_inner()
            figures["cipher"] = path["cipher"]
            figures["inner_mtu"] = int(client.run(["cat", "/sys/class/net/mptun0/mtu"]).stdout)
            _progress(progress, f"pinging {SERVER_INNER} through the tunnel")
            figures["ping_ok"] = sum(client.ping(SERVER_INNER, timeout=1.0) for _ in range(PINGS))
            figures["ping_sent"] = PINGS
            _progress(progress, f"iperf3 TCP through the tunnel, {duration:g} s each way")
            figures["tunnel_tcp_up_mbps"] = iperf3_tcp(client, server, SERVER_INNER, duration) / 1e6
            figures["tunnel_tcp_down_mbps"] = iperf3_tcp(client, server, SERVER_INNER, duration, reverse=True) / 1e6
            _progress(progress, f"iperf3 TCP over the raw link, {duration:g} s")
            figures["raw_tcp_mbps"] = iperf3_tcp(client, server, link.a_addr, duration) / 1e6
            figures["tunnel_over_raw"] = round(figures["tunnel_tcp_up_mbps"] / figures["raw_tcp_mbps"], 4)
            final = stack.server_status()["tunnels"][0]
            figures["server_delivered"] = final["delivered"]
            figures["dtls_dropped"] = final["paths"][0]["dtls_dropped"]
        finally:
            stack.stop()
            shutil.rmtree(stack.workdir, ignore_errors=True)
    for k in ("tunnel_tcp_up_mbps", "tunnel_tcp_down_mbps", "raw_tcp_mbps"):
        figures[k] = round(figures[k], 1)
    return figures


def format_table(f: dict) -> str:
    rows = [
        ("tunnel up after", f"{f['tunnel_up_s']:.2f} s"),
        ("client inner address", f["client_address"]),
        ("cipher", f"{f['cipher']} (DTLS 1.2)"),
        ("inner MTU", str(f["inner_mtu"])),
        ("ping through tunnel", f"{f['ping_ok']}/{f['ping_sent']} replies"),
        ("TCP client->server", f"{f['tunnel_tcp_up_mbps']:.0f} Mbit/s"),
        ("TCP server->client", f"{f['tunnel_tcp_down_mbps']:.0f} Mbit/s"),
        ("TCP raw veth (no tunnel)", f"{f['raw_tcp_mbps']:.0f} Mbit/s"),
        ("tunnel / raw", f"{f['tunnel_over_raw']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(args: argparse.Namespace) -> int:
    try:
        figures = run_demo(args.duration, progress=not args.json)
    except KeyboardInterrupt:
        print("mptun lab: interrupted; lab torn down", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"mptun lab: failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(figures))
    else:
        print("mptun lab: one client, one server, one veth link, a DTLS 1.2 tunnel between them")
        print(format_table(figures))
    return 0 if figures["ping_ok"] > 0 else 1
