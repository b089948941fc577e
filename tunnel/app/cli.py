"""The `mptun` command: server, client, certs, lab."""

from __future__ import annotations

import argparse
import sys

from tunnel import __version__

from tunnel.app import certs, status
from tunnel.app.config import ConfigError
from tunnel.wire.dtls import DtlsError
from tunnel.core.policy import PolicyError
from tunnel.app.privs import PrivilegeError

EXIT_CONFIG = 2


def _metrics_address(text: str):
    from tunnel.app.metrics import parse_metrics_address

    try:
        return parse_metrics_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _user(args: argparse.Namespace, cfg) -> None:
    """--user/--group override the config's user/group keys; checked here, used after set-up."""
    if args.group and not args.user:
        raise PrivilegeError("--group needs --user")
    if args.user:
        from tunnel.app import privs

        privs.resolve(args.user, args.group)  # no such user/group: an error now
        cfg.user, cfg.group = args.user, args.group


def _daemon(args: argparse.Namespace, load, check, run) -> int:
    """`mptun server` / `mptun client`: the config file with the command line's overrides,
    then ``check`` it (--check-config: everything that fails on bad input, nothing made) or ``run``."""
    cfg = load(args.config)
    if args.policy:
        cfg.policy = args.policy
    if args.metrics:
        cfg.metrics = args.metrics
    _user(args, cfg)
    if args.check_config:
        check(cfg)
        print(f"{args.config}: ok")
        return 0
    return run(cfg)


def _server(args: argparse.Namespace) -> int:
    from tunnel.app import server
    from tunnel.app.config import load_server_config

    return _daemon(args, load_server_config, server.build, server.run)


def _client(args: argparse.Namespace) -> int:
    from tunnel.app import client
    from tunnel.app.config import load_client_config

    return _daemon(args, load_client_config, client.check, client.run)


def _lab(args: argparse.Namespace) -> int:
    from tunnel.lab import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mptun", description="Multipath DTLS 1.2 IP tunnel")
    p.add_argument("--version", action="version", version=f"mptun {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("server", _server, "run the server"),
        ("client", _client, "run the client"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("-c", "--config", required=True, help=f"{name} TOML file")
        sp.add_argument("--check-config", action="store_true", help="validate the config and exit")
        sp.add_argument("--policy", help="DSCP policy file (overrides the config's policy key)")
        sp.add_argument("--metrics", type=_metrics_address, metavar="ADDR:PORT",
                        help="serve Prometheus metrics over HTTP (overrides the config's metrics key)")
        sp.add_argument("--user", metavar="USER",
                        help="after set-up, switch to USER keeping only what the role uses (client: "
                             "CAP_NET_ADMIN/CAP_NET_RAW, server: nothing) "
                             "(overrides the config's user key; needs root)")
        sp.add_argument("--group", metavar="GROUP", help="with --user: this primary group instead of USER's")
        sp.set_defaults(func=func)
    certs.register(sub)
    status.register(sub)
    from tunnel.lab.scenario import mode_list, number_list, trace_list

    lab = sub.add_parser(
        "lab",
        help="one-machine showcase: scheduler modes over impaired paths (root)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Show what mptun's scheduler modes do for a live media stream over bad links,
on this machine alone (needs root, iperf3 and nftables).

Builds client, router and server network namespaces joined by N paths and
impairs each path.  Then, per mode, starts a fresh mptun server and client,
runs a bulk iperf3 TCP flow through the tunnel and, after 2 s, a media-like
stream (50 packets/s of 200 bytes, marked EF, client -> server) beside it, and
blackholes path 0 from 40 % to 60 % of the stream.  Prints per mode: media
loss, one-way latency p50/p99, longest gap without media, bulk TCP goodput.

Default scenario (scenarios/default.toml): 2 paths, 30 ms and 60 ms delay,
2 % random loss and 20 Mbit/s each, each way; modes duplicate, lowest-rtt and
balance, plus a run with policies/webrtc.toml ("webrtc": media duplicated,
bulk balanced and reordered), 15 s each: about 85 s in all.  "--modes
balance,lowest-rtt,mptcp" adds a reference row: the same bulk flow with Linux
MPTCP (mptcpize run) over the raw paths, no tunnel and no media stream, with
whether a second subflow joined.  Options override the scenario file,
which overrides the defaults.  Per-path lists (--delay, --loss, --rate,
--trace-up, --trace-down, --trace-scale) repeat their last value for further
paths.  A trace (--trace-up/--trace-down, or trace_up/trace_down in a scenario's
[[path]]) makes that direction's rate follow a recorded cellular link: see
tunnel/lab/traces/README.md.

--quick runs a ~15 s smoke test instead: one link, ping, iperf3 up and down
through the tunnel and over the raw link (takes only --duration and --json).""",
    )
    lab.add_argument("--json", action="store_true",
                     help="print the result as one JSON object on stdout (progress stays on stderr)")
    lab.add_argument("--quick", action="store_true", help="the single-link smoke test (~15 s)")
    lab.add_argument("--scenario", metavar="FILE", help="TOML scenario file (see scenarios/)")
    lab.add_argument("--duration", type=float, metavar="SECONDS",
                     help="seconds of traffic per mode (default 15; --quick: per iperf3 run, default 3)")
    lab.add_argument("--modes", type=mode_list, metavar="M,M",
                     help="scheduler modes to compare, or webrtc for policies/webrtc.toml, or mptcp "
                          "for Linux MPTCP over the raw paths (bulk flow only, no tunnel) "
                          "(default duplicate,lowest-rtt,balance,webrtc)")
    lab.add_argument("--paths", type=int, metavar="N", help="number of paths (default 2)")
    lab.add_argument("--delay", type=number_list, metavar="MS,MS",
                     help="one-way delay per path, each way (default 30,60)")
    lab.add_argument("--loss", type=number_list, metavar="PCT,PCT",
                     help="random loss per path in %%, each way (default 2,2)")
    lab.add_argument("--rate", type=number_list, metavar="MBIT,MBIT",
                     help="rate limit per path in Mbit/s, each way, 0 for none (default 20,20)")
    lab.add_argument("--trace-up", type=trace_list, metavar="TRACE,TRACE",
                     help="cellular capacity trace per path, client -> server (mahimahi format: a file, "
                          "or a name in tunnel/lab/traces/, e.g. ATT-LTE-driving-2016.up; 'none' or "
                          "empty: no trace); replaces --rate in that direction")
    lab.add_argument("--trace-down", type=trace_list, metavar="TRACE,TRACE",
                     help="the same, server -> client (e.g. ATT-LTE-driving-2016.down)")
    lab.add_argument("--trace-scale", type=number_list, metavar="K,K",
                     help="bytes per trace opportunity x K, per path (default 1: 1500 bytes); the "
                          "queue is 200 ms at the scaled mean rate unless the scenario says otherwise")
    lab.add_argument("--no-outage", action="store_true", help="do not blackhole a path mid-run")
    lab.add_argument("--no-bulk", action="store_true", help="media stream only, no iperf3 TCP flow")
    lab.set_defaults(func=_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DtlsError, PolicyError, PrivilegeError) as exc:
        print(f"mptun {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:
        # netlink trouble (e.g. a pushed route clashes with one the host has): one line, no
        # traceback.  tunnel.io.netlink is only imported by the commands that use it (pyroute2
        # costs 0.2 s at start), so its error class is looked up here.
        netlink, tun = sys.modules.get("tunnel.io.netlink"), sys.modules.get("tunnel.io.tun")
        if not ((netlink is not None and isinstance(exc, netlink.NetlinkErrorMsg))
                or (tun is not None and isinstance(exc, tun.TunError))):
            raise
        print(f"mptun {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
