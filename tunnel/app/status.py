"""`mptun status`: ask running daemons over their control sockets and print a table."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tunnel.app import control


def _path_rows(paths: list[dict], indent: str) -> list[str]:
    rows = []
    for p in paths:
        if "tx_packets" not in p:  # a client path waiting to reconnect
            rows.append(f"{indent}path {p.get('name', ''):<10} {p['addr']:<22} {p['state']}")
            continue
        rtt = "-" if p.get("rtt_ms") is None else f"{p['rtt_ms']:.2f} ms"
        state = p["state"] + (f" {p['silent_s']:g}s" if p.get("silent_s") else "")  # down: silent for how long
        rows.append(
            f"{indent}path {p.get('name', ''):<10} {p['addr']:<22} {state:<11} rtt {rtt:<10} "
            f"loss {100 * p.get('loss', 0):5.1f}%  rate {p.get('rate_kbps', 0):9.1f} kbit/s  "
            f"tx {p['tx_packets']} pkts/{p['tx_bytes']} B  rx {p['rx_packets']} pkts/{p['rx_bytes']} B  "
            f"dtls-dropped {p['dtls_dropped']}  malformed {p['malformed']}"
            + _model(p.get("bottleneck"))
        )
    return rows


def _model(b: object) -> str:
    """balance's model of the path (tunnel/core/bottleneck.py), if it has one."""
    if not isinstance(b, dict):
        return ""
    return (f"  model {b.get('rate_kbps', 0):.0f} kbit/s, base rtt {b.get('base_rtt_ms', 0):.1f} ms, "
            f"queue {b.get('queue_ms', 0):.1f} ms")


def _crl_row(crl: dict) -> str:
    nu = crl.get("next_update")
    when = "none" if nu is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(nu))
    row = f"  crl {crl.get('file')}: {crl.get('revoked', 0)} revoked, next update {when}"
    if crl.get("expired"):
        row += (", EXPIRED: new handshakes refused (crl_expired = \"refuse\")" if crl.get("on_expiry") == "refuse"
                else ", EXPIRED: still used (crl_expired = \"warn\")")
    return row


def format_status(sock: str, st: dict) -> str:
    lines = [f"{sock}:"]
    if "tunnels" in st:  # server
        lines.append(f"  tunnels {len(st['tunnels'])}, handshaking {st['handshaking']}, counters {st['counters']}")
        for t in st["tunnels"]:
            lines.append(
                f"  client {t['name']:<16} {t['address']:<18}{' ' + t['address6'] if t.get('address6') else ''}"
                f" mode {t['mode']}  paths {len(t['paths'])}  "
                f"delivered {t['delivered']} duplicates {t['duplicates']} too-old {t['too_old']} spoofed {t['spoofed']}"
            )
            lines += _path_rows(t["paths"], "    ")
    else:
        lines.append(
            f"  tunnel {st['state']}  address {st.get('address') or '-'}"
            f"{' ' + st['address6'] if st.get('address6') else ''}  mode {st['mode']}  "
            f"delivered {st['delivered']} duplicates {st['duplicates']} too-old {st['too_old']}"
        )
        lines += _path_rows(st["paths"], "    ")
    crl = (st.get("revocation") or {}).get("crl")
    if crl:
        lines.append(_crl_row(crl))
    lines.append(f"  io {st.get('io', {})}")
    loop = st.get("loop")
    if loop:
        lines.append(
            f"  stalls {loop['stalls']} (longest {loop['stall_longest_ms']:.0f} ms, {loop['stall_total_ms']:.0f} ms in all: "
            f"the OS did not run mptun)  busy {loop['busy']} (longest {loop['busy_longest_ms']:.0f} ms)"
        )
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("status", help="show tunnels and paths of running mptun daemons")
    p.add_argument("-s", "--socket", action="append", help="control socket (default: all in /run/mptun)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sockets = args.socket or control.find_sockets()
    if not sockets:
        print("mptun status: no running mptun found (no sockets in /run/mptun)", file=sys.stderr)
        return 1
    result, code = {}, 0
    for s in sockets:
        try:
            result[s] = control.query(s)
        except (OSError, ValueError) as exc:
            print(f"mptun status: {s}: {exc}", file=sys.stderr)
            code = 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for s, st in result.items():
            print(format_status(s, st))
    return code
