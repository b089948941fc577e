"""How long a real client needs for its tunnel while silent half-open handshakes flood the server.

The attack (issue 16, finding 1): senders with no certificate answer the server's cookie
(so their addresses are real and each ClientHello costs the server a key exchange and
a signature), take the server's first flight, and go silent, holding a half-open slot.
Used by tests/test_hostile.py and by the bench's ``hostile`` section, so both measure the
same thing: an attacker namespace hangs off the server on a link of its own and sends
from one address in each of ``sources`` /24s of :data:`FLOOD_SOURCES` (the server routes
them back to it), the server is started, the flood runs until the server's half-open
table is as full as the flood can make it, then a real client is started and the time
from its first ClientHello to its tunnel being up is read from its log.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

from tunnel.lab.netns import Host, Lab, wait_for
from tunnel.lab.stack import PORT, TunnelStack

ATTACK_LINK = "198.18.22.0/30"  # server .1, attacker .2
FLOOD_SOURCES = "198.19.0.0/16"  # the attacker's source addresses: one per /24 (as the server counts them)
WARMUP_MAX = 8.0  # seconds the flood may take to fill the server's half-open table before the client starts
CLIENT_DEADLINE = 20.0  # the client must be up by then (a blocked client shows as this)


def add_attacker(lab: Lab, server: Host, link: str = ATTACK_LINK, sources: str = FLOOD_SOURCES) -> Host:
    atk = lab.add_host("atk")
    l = lab.link(server, atk, link)
    atk.run(["ip", "route", "add", "local", sources, "dev", "lo"])
    atk.run(["ip", "route", "add", "default", "via", l.a_addr])
    server.run(["ip", "route", "add", sources, "via", l.b_addr])
    return atk


@dataclass
class StarveResult:
    rate: float  # silent half-open handshakes asked for, per second
    sources: int  # source addresses (each in its own /24)
    achieved: float  # cookie exchanges the attacker made per second (measured by it)
    flights: int  # server flights the attacker got (handshakes the server started for it)
    half_open_at_start: int  # the server's handshakes in progress when the client started
    time_to_tunnel_s: float  # the client's first ClientHello -> its tunnel up (from its log)
    client_attempts: int  # handshakes the client started before its tunnel was up
    counters: dict  # the server's admission counters over the run

    def to_json(self) -> dict:
        return asdict(self)


def _log_time(line: str) -> float:
    """The timestamp of a text log line ("2026-12-07 13:26:12,345 mptun-client ...")."""
    stamp = " ".join(line.split(" ", 2)[:2])
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def client_connect_time(log: str) -> tuple[float, int]:
    """(seconds from the client's first connection attempt to 'tunnel up', attempts) from its log."""
    first: Optional[float] = None
    attempts = 0
    for line in log.splitlines():
        if ": connecting (attempt" in line:
            attempts += 1
            if first is None:
                first = _log_time(line)
        elif "tunnel up:" in line and first is not None:
            return _log_time(line) - first, attempts
    raise LookupError("the client's tunnel did not come up")


COUNTERS = ("handshakes_rate_limited", "handshakes_refused", "handshakes_evicted", "cookies_sent",
            "handshakes_failed")


def time_to_tunnel(stack: TunnelStack, atk: Host, rate: float, sources: int) -> StarveResult:
    """Start the server, flood it at ``rate`` silent half-open handshakes/s from ``sources``
    addresses (``rate`` 0: no flood), then start the client; the client's time to its tunnel."""
    stack.start_server()
    target = f"{stack.server_addr}:{PORT}"
    proc: Optional[subprocess.Popen] = None
    before = {k: stack.server_status()["counters"].get(k, 0) for k in COUNTERS}
    if rate > 0:
        argv = [sys.executable, "-m", "tunnel.lab.attack", "hello", "--to", target, "--rate", "0",
                "--seconds", str(WARMUP_MAX + CLIENT_DEADLINE + 5), "--sources", FLOOD_SOURCES, "--spread", "24",
                "--answer", str(sources), "--answer-rate", str(rate / sources)]
        proc = atk.popen(argv, stdout=subprocess.PIPE, text=True)
        # the table fills at the flood's rate less what expires; wait until it stops growing
        deadline, last, steady_since = time.monotonic() + WARMUP_MAX, -1, time.monotonic()
        while time.monotonic() < deadline:
            n = stack.server_status()["handshaking"]
            if n > last:
                last, steady_since = n, time.monotonic()
            elif time.monotonic() - steady_since >= 1.5 and n > 0:
                break
            time.sleep(0.25)
    half_open = stack.server_status()["handshaking"]
    stack.start_client()
    try:
        wait_for(lambda: "tunnel up:" in stack.client_log.read_text(), CLIENT_DEADLINE,
                 message="the client's tunnel did not come up")
        took, attempts = client_connect_time(stack.client_log.read_text())
    except (TimeoutError, LookupError):
        took, attempts = CLIENT_DEADLINE, stack.client_log.read_text().count(": connecting (attempt")
    report = {"attempts": 0, "server_flights": 0, "seconds": 1.0}
    if proc is not None:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        if out.strip():
            report = json.loads(out.splitlines()[-1])
    after = stack.server_status()["counters"]
    return StarveResult(
        rate=rate, sources=sources, achieved=round(report["attempts"] / max(report["seconds"], 1e-3), 1),
        flights=report["server_flights"], half_open_at_start=half_open, time_to_tunnel_s=round(took, 3),
        client_attempts=attempts, counters={k: after.get(k, 0) - before[k] for k in COUNTERS})
