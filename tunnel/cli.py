"""The `mptun` command: server, client, certs, lab."""

from __future__ import annotations

import argparse
import sys

from tunnel import __version__, certs, status
from tunnel.config import ConfigError
from tunnel.dtls import DtlsError

EXIT_CONFIG = 2


def _server(args: argparse.Namespace) -> int:
    from tunnel import server
    from tunnel.config import load_server_config

    cfg = load_server_config(args.config)
    if args.check_config:
        server.build(cfg)
        print(f"{args.config}: ok")
        return 0
    return server.run(cfg)


def _client(args: argparse.Namespace) -> int:
    from tunnel import client
    from tunnel.config import load_client_config

    cfg = load_client_config(args.config)
    if args.check_config:
        client.resolve(cfg)
        from tunnel.dtls import make_context

        make_context("client", cfg.certificate, cfg.key, cfg.ca, server_name=cfg.server_name)
        print(f"{args.config}: ok")
        return 0
    return client.run(cfg)


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
        sp.set_defaults(func=func)
    certs.register(sub)
    status.register(sub)
    lab = sub.add_parser("lab", help="one-machine demo: namespaces, tunnel, ping and iperf3")
    lab.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    lab.add_argument("--duration", type=float, default=3.0, help="seconds of iperf3 (default 3)")
    lab.set_defaults(func=_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DtlsError) as exc:
        print(f"mptun {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
