"""Hostile traffic for the lab: junk floods, ClientHello floods, raw replays.

Runs inside a lab namespace, aimed only at the lab's own server address:

    python -m tunnel.lab.attack junk  --to ADDR:PORT --rate N --seconds S [--sources CIDR]
    python -m tunnel.lab.attack hello --to ADDR:PORT --rate N --seconds S [--sources CIDR]
                                      [--answer N --answer-rate R]
    python -m tunnel.lab.attack raw   --to ADDR:PORT --src ADDR:PORT --payloads FILE

``junk`` sends random datagrams (1-200 bytes), ``hello`` DTLS 1.2 ClientHellos
without a cookie (pyOpenSSL-made, sent again and again: the server is stateless
before the cookie, so a replayed ClientHello is as good as a fresh one), and with
``--answer N`` also runs real cookie exchanges (a new socket per attempt, the
HelloVerifyRequest answered with a ClientHello carrying the cookie) from the first
N source addresses at ``--answer-rate`` attempts/s each: those get past the cookie
and reach the server's handshake limits.  Sources are the addresses of ``--sources``
(the namespace must be able to bind them, e.g. ``ip route add local CIDR dev lo``).
``raw`` sends each payload of a JSON list of hex strings as a UDP datagram with the
given (spoofed) source through a raw socket: a replay of captured records.

Each prints one JSON line: what was sent and the rate achieved.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import struct
import sys
import time
from typing import Optional, Sequence

CHUNK = 50  # datagrams sent between two looks at the clock
_stop = False  # SIGTERM: stop early and still print what was sent


def _on_sigterm(*_) -> None:
    global _stop
    _stop = True


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def source_list(cidr: Optional[str], limit: int = 254, spread: Optional[int] = None) -> list[str]:
    """Source addresses from ``cidr``: its hosts in order, or with ``spread`` one host of each
    /``spread`` subnet (sources in different prefixes, as the server counts them)."""
    if not cidr:
        return [""]
    net = ipaddress.ip_network(cidr, strict=False)
    if spread is not None and spread > net.prefixlen:
        return [str(next(iter(sub.hosts()), sub.network_address)) for sub, _ in
                zip(net.subnets(new_prefix=spread), range(limit))]
    hosts = [str(a) for a in net.hosts()] if net.num_addresses > 2 else [str(net.network_address)]
    return hosts[:limit]


def bound_sockets(sources: list[str]) -> list[socket.socket]:
    out = []
    for src in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((src, 0))
        out.append(s)
    return out


def paced(rate: float, seconds: float, send_one) -> tuple[int, float]:
    """Call ``send_one(i)`` ``rate`` times a second for ``seconds``; (count, elapsed)."""
    start = time.monotonic()
    end = start + seconds
    sent = 0
    while True:
        now = time.monotonic()
        if now >= end or _stop:
            break
        due = int((now - start) * rate) + 1
        if sent >= due:
            time.sleep(min(0.001, end - now))
            continue
        for _ in range(min(CHUNK, due - sent)):
            send_one(sent)
            sent += 1
    return sent, time.monotonic() - start


def junk(args) -> dict:
    to = parse_addr(args.to)
    socks = bound_sockets(source_list(args.sources, spread=args.spread))
    pool = [os.urandom(1 + (i * 37) % 200) for i in range(1024)]
    errors = 0

    def send_one(i: int) -> None:
        nonlocal errors
        try:
            socks[i % len(socks)].sendto(pool[i & 1023], to)
        except OSError:
            errors += 1

    sent, took = paced(args.rate, args.seconds, send_one)
    return {"kind": "junk", "sent": sent - errors, "errors": errors, "seconds": round(took, 3),
            "rate": round((sent - errors) / took, 1), "sources": len(socks)}


def client_hello(ctx) -> tuple[object, bytes]:
    from OpenSSL import SSL

    conn = SSL.Connection(ctx, None)
    conn.set_ciphertext_mtu(1400)  # with OP_NO_QUERY_MTU OpenSSL needs it told
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn, conn.bio_read(65536)


def dtls_context():
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_options(SSL.OP_NO_QUERY_MTU)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    return ctx


def hello(args) -> dict:
    from OpenSSL import SSL

    to = parse_addr(args.to)
    sources = source_list(args.sources, spread=args.spread)
    socks = bound_sockets(sources)
    ctx = dtls_context()
    hellos = [client_hello(ctx)[1] for _ in range(32)]
    answering = sources[: args.answer]
    per_attempt = 1.0 / args.answer_rate if answering else 0.0
    next_attempt = {src: 0.0 for src in answering}
    sel = selectors.DefaultSelector()
    stats = {"hellos": 0, "errors": 0, "attempts": 0, "cookies": 0, "verified": 0, "server_flights": 0,
             "other_replies": 0}

    def attempt(src: str) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((src, 0))
        conn, ch = client_hello(ctx)
        try:
            s.sendto(ch, to)
        except OSError:
            s.close()
            stats["errors"] += 1
            return
        stats["attempts"] += 1
        sel.register(s, selectors.EVENT_READ, [conn, time.monotonic() + 2.0, False])

    def poll(start_new: bool = True) -> None:
        now = time.monotonic()
        for key, _ in sel.select(0):
            s, (conn, _, answered) = key.fileobj, key.data
            try:
                data = s.recv(65536)
            except OSError:
                continue
            if answered:
                stats["server_flights"] += 1  # the server's flight: our ClientHello got past the cookie
                sel.unregister(s)
                s.close()
                continue
            conn.bio_write(data)
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                ch2 = b""
            try:
                ch2 = conn.bio_read(65536)
            except SSL.Error:
                ch2 = b""
            if not ch2:  # no HelloVerifyRequest: e.g. a reused port the server still has a session for
                stats["other_replies"] += 1
                sel.unregister(s)
                s.close()
                continue
            stats["cookies"] += 1
            try:
                s.sendto(ch2, to)
                stats["verified"] += 1
            except OSError:
                stats["errors"] += 1
            key.data[2] = True
        for key in list(sel.get_map().values()):
            if key.data[1] < now:
                sel.unregister(key.fileobj)
                key.fileobj.close()
        for src in answering if start_new else ():
            if next_attempt[src] <= now:
                next_attempt[src] = max(next_attempt[src] + per_attempt, now - 0.1)
                attempt(src)

    def send_one(i: int) -> None:
        try:
            socks[i % len(socks)].sendto(hellos[i & 31], to)
        except OSError:
            stats["errors"] += 1
        else:
            stats["hellos"] += 1
        if i % 10 == 0:
            poll()

    if args.rate > 0:
        sent, took = paced(args.rate, args.seconds, send_one)
    else:  # --rate 0: only the cookie exchanges of --answer
        start = time.monotonic()
        while time.monotonic() - start < args.seconds and not _stop:
            poll()
            time.sleep(0.001)
        took = time.monotonic() - start
    end = time.monotonic() + 1.0
    while sel.get_map() and time.monotonic() < end:  # the last answers
        time.sleep(0.01)
        poll(start_new=False)
    return {"kind": "hello", **stats, "seconds": round(took, 3), "rate": round(stats["hellos"] / took, 1),
            "answer_rate": round(stats["attempts"] / took, 1),
            "sources": len(socks), "answering_sources": len(answering)}


def udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """IPv4 + UDP (UDP checksum 0: allowed for IPv4; the kernel fills the IP checksum)."""
    udp = struct.pack(">HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    return ip + udp


def raw(args) -> dict:
    to, src = parse_addr(args.to), parse_addr(args.src)
    with open(args.payloads) as f:
        payloads = [bytes.fromhex(h) for h in json.load(f)]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = 0
    for p in payloads:
        s.sendto(udp_packet(src, to, p), (to[0], 0))
        sent += 1
        if args.gap:
            time.sleep(args.gap)
    s.close()
    return {"kind": "raw", "sent": sent}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tunnel.lab.attack", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("junk", "hello"):
        q = sub.add_parser(name)
        q.add_argument("--to", required=True)
        q.add_argument("--rate", type=float, required=True, help="datagrams per second")
        q.add_argument("--seconds", type=float, required=True)
        q.add_argument("--sources", help="CIDR whose host addresses are the sources (default: any)")
        q.add_argument("--spread", type=int, help="one source per subnet of this prefix length (e.g. 24)")
        if name == "hello":
            q.add_argument("--answer", type=int, default=0, help="sources that also answer the cookie")
            q.add_argument("--answer-rate", type=float, default=20.0, help="cookie exchanges per second per source")
    q = sub.add_parser("raw")
    q.add_argument("--to", required=True)
    q.add_argument("--src", required=True)
    q.add_argument("--payloads", required=True, help="JSON list of hex strings")
    q.add_argument("--gap", type=float, default=0.0, help="seconds between datagrams")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    result = {"junk": junk, "hello": hello, "raw": raw}[args.command](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
