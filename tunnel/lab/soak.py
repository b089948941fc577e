"""Soak: a multipath tunnel under changing impairments for a set time; nothing may grow.

``python -m tunnel.lab.soak [--seconds 600] [--interval 5] [--json FILE]`` (or
``scripts/soak``) builds the lab's MultipathTopology (client, router, server; two
paths), starts real ``mptun server``/``mptun client`` processes in duplicate mode,
runs a media-like stream (50 packets/s) through the tunnel for the whole time and,
every ``interval`` seconds, gives each path a new random delay, jitter and loss and
sometimes an outage of one path (never both at once).  It samples the RSS and the
open file descriptors of both daemons at every change and reports them, with the
daemons' counters, at the start (after a warm-up) and at the end (impairments
cleared, paths back): one JSON object and a table.  It exits 1 if either daemon's
RSS grew by more than ``--rss-growth`` MiB or its descriptors by more than
``--fd-growth`` between those two points, or if the stream (one path always works)
had a gap of GAP_BOUND_MS or more, or lost more than the paths' simultaneous losses
explain (:func:`explained`), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tunnel.lab.netns import Lab, unique_prefix, wait_for
from tunnel.lab.servermem import rss_kib
from tunnel.lab.stack import SERVER_INNER, TunnelStack
from tunnel.lab.stream import finish_receiver, start_receiver, start_sender, wait_listening

STREAM_PORT = 5006
STREAM_RATE = 50
WARMUP = 3.0  # seconds of traffic before the start snapshot (imports, first allocations)
RSS_GROWTH_MIB = 16.0
FD_GROWTH = 4
GAP_BOUND_MS = 100.0  # the longest gap the stream may have beyond what the lab's own delay changes make
LOSS_SLACK = 3  # packets: plus three standard deviations of the explained loss (binomial)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(stack: TunnelStack) -> dict[str, Any]:
    server, client = stack.server_status(), stack.client_status()
    tunnels = server["tunnels"]
    return {
        "t": time.monotonic(),
        "server": {
            "rss_kib": rss_kib(stack.server_proc.pid), "fds": fds(stack.server_proc.pid),
            "counters": server["counters"], "io": server.get("io", {}),
            "tunnels": len(tunnels), "handshaking": server["handshaking"],
            "paths": sum(len(t["paths"]) for t in tunnels),
            "delivered": sum(t["delivered"] for t in tunnels), "duplicates": sum(t["duplicates"] for t in tunnels),
            "dtls_dropped": sum(p["dtls_dropped"] for t in tunnels for p in t["paths"]),
        },
        "client": {
            "rss_kib": rss_kib(stack.client_proc.pid), "fds": fds(stack.client_proc.pid),
            "state": client["state"], "paths": len(client["paths"]),
            "joined": sum(bool(p.get("joined")) for p in client["paths"]),
            **{k: client[k] for k in ("delivered", "duplicates", "too_old", "malformed", "dropped_no_path")},
            "io": client.get("io", {}),
        },
    }


def random_plan(rng: random.Random, n_paths: int):
    """{(path, direction): Impairment} for one interval, plus the path in an outage (or None)."""
    from tunnel.lab.impair import DIRECTIONS, Impairment

    plan = {}
    for i in range(n_paths):
        imp = Impairment(delay_ms=rng.choice([0, 5, 20, 40, 80]), jitter_ms=rng.choice([0, 0, 2, 5]),
                         loss=rng.choice([0.0, 0.0, 0.01, 0.03, 0.1]))
        for d in DIRECTIONS:
            plan[(i, d)] = imp
    outage = rng.randrange(n_paths) if rng.random() < 0.3 else None
    return plan, outage


def soak(seconds: float, interval: float = 5.0, seed: int = 1, n_paths: int = 2,
         workdir: Optional[Path] = None, log=print) -> dict[str, Any]:
    from tunnel.lab.demo import start_tunnel
    from tunnel.lab.impair import Impairments
    from tunnel.lab.topology import MultipathTopology

    rng = random.Random(seed)
    with Lab(unique_prefix("soak")) as lab:
        work = workdir or Path(tempfile.mkdtemp(prefix="mptun-soak-"))
        work.mkdir(parents=True, exist_ok=True)
        topo = MultipathTopology(lab, n_paths=n_paths)
        with Impairments(topo, seed=seed) as imp:
            stack = start_tunnel(topo, "duplicate", work)
            try:
                count = int(STREAM_RATE * (seconds + WARMUP + 10))
                out = work / "soak-stream.json"
                receiver = start_receiver(topo.server, f"0.0.0.0:{STREAM_PORT}", out, timeout=30.0, linger=1.0)
                wait_listening(topo.server, STREAM_PORT, receiver)
                sender = start_sender(topo.client, f"{SERVER_INNER}:{STREAM_PORT}", STREAM_RATE, 200, count)
                time.sleep(WARMUP)
                start = snapshot(stack)
                samples = [_sample(start, "start")]
                end_at = time.monotonic() + seconds
                changes = 0
                intervals: list[dict[str, Any]] = []
                while time.monotonic() < end_at:
                    plan, outage = random_plan(rng, n_paths)
                    imp.apply(plan)
                    for i in range(n_paths):
                        imp.blackhole(i, on=(i == outage))
                    intervals.append({"t": time.monotonic(), "outage": outage,
                                      **{k: [getattr(plan[(i, "up")], k) for i in range(n_paths)]
                                         for k in ("loss", "delay_ms", "jitter_ms")}})
                    changes += 1
                    time.sleep(max(0.0, min(interval, end_at - time.monotonic())))
                    s = snapshot(stack)
                    samples.append(_sample(s, f"outage {outage}" if outage is not None else "impaired"))
                    log(f"{s['t'] - start['t']:7.1f} s  server rss {s['server']['rss_kib']} KiB fds "
                        f"{s['server']['fds']}  client rss {s['client']['rss_kib']} KiB fds {s['client']['fds']}  "
                        f"paths {s['server']['paths']}/{n_paths}")
                imp.clear()
                for i in range(n_paths):
                    imp.blackhole(i, on=False)
                intervals.append({"t": time.monotonic(), "outage": None, "loss": [0.0] * n_paths,
                                  "delay_ms": [0.0] * n_paths, "jitter_ms": [0.0] * n_paths})
                wait_for(lambda: (lambda st: st["client"]["joined"] == n_paths and st["server"]["paths"] == n_paths)(
                    snapshot(stack)), 30, message="paths did not come back after the soak")
                time.sleep(1.0)
                end = snapshot(stack)
                samples.append(_sample(end, "end"))
                sender.terminate()  # the stream ran all along; stop it here (no end marker)
                sender.wait(10)
                time.sleep(1.0)
                receiver.terminate()  # writes what it saw and exits 0
                stream = finish_receiver(receiver, out, 10)
            finally:
                stack.stop()
    report = _report(start, end, samples, stream, seconds, interval, changes)
    report["explained"] = explained(intervals, STREAM_RATE)
    return report


def explained(intervals: list[dict[str, Any]], rate: float) -> dict[str, float]:
    """What the lab itself does to the stream (client -> server), which no tunnel can undo.

    ``lost``: packets expected lost: in each interval, rate x time x the product of the
    paths' upstream loss (1 for the path in its outage); plus, where the outage moves from
    one path to the other, the copies in flight on the path that goes out (they are dropped
    after the delay line, and their twins were lost in the outage that ends): rate x its
    delay.  ``sd``: the binomial standard deviation of the random part.
    ``gap_ms``: the largest jump of the stream's delay at a change: the fastest working
    path's delay after it less the one before (jitter counted against us), or, where the
    outage moves, the returning path's whole delay (nothing was in flight on it).  A gap
    of one packet interval plus that is the lab's doing."""
    lost = var = gap = 0.0
    for prev, cur, nxt in zip([None] + intervals[:-1], intervals, intervals[1:]):
        n = len(cur["loss"])
        p = 1.0
        for i in range(n):
            p *= 1.0 if i == cur["outage"] else cur["loss"][i]
        k = rate * (nxt["t"] - cur["t"])
        lost += k * p
        var += k * p * (1 - p)
        if prev is None:
            continue
        alive = [i for i in range(n) if i != cur["outage"]]
        new = min(cur["delay_ms"][i] + cur["jitter_ms"][i] for i in alive)
        moved = prev["outage"] is not None and cur["outage"] is not None and prev["outage"] != cur["outage"]
        if moved:
            lost += rate * prev["delay_ms"][cur["outage"]] / 1000.0
            gap = max(gap, new)
        else:
            was = min(prev["delay_ms"][i] - prev["jitter_ms"][i] for i in range(n) if i != prev["outage"])
            gap = max(gap, new - was)
    return {"lost": round(lost, 1), "sd": round(var ** 0.5, 1), "gap_ms": round(gap, 1)}


def _sample(s: dict, what: str) -> dict:
    return {"t": s["t"], "what": what,
            **{f"{side}_{k}": s[side][k] for side in ("server", "client") for k in ("rss_kib", "fds")}}


def _report(start: dict, end: dict, samples: list[dict], stream, seconds: float, interval: float,
            changes: int) -> dict[str, Any]:
    t0 = start["t"]
    for s in samples:
        s["t"] = round(s["t"] - t0, 1)
    growth = {side: {"rss_kib": end[side]["rss_kib"] - start[side]["rss_kib"], "fds": end[side]["fds"] - start[side]["fds"]}
              for side in ("server", "client")}
    for s in (start, end):
        s["t"] = round(s["t"] - t0, 1)
    return {
        "seconds": seconds, "interval": interval, "changes": changes,
        "start": start, "end": end, "growth": growth, "samples": samples,
        "stream": {k: v for k, v in stream.to_json().items() if k not in ("arrivals", "sender", "tos_counts")},
    }


def check(report: dict, rss_growth_mib: float = RSS_GROWTH_MIB, fd_growth: int = FD_GROWTH) -> list[str]:
    """What grew beyond the bounds, and what the stream lost beyond what the lab explains (empty: nothing)."""
    bad = []
    st, ex = report["stream"], report.get("explained")
    if ex is not None:
        interval_ms = 1000.0 / STREAM_RATE
        if st["longest_gap_ms"] >= GAP_BOUND_MS + ex["gap_ms"]:
            bad.append(f"stream gap {st['longest_gap_ms']:.0f} ms (bound {GAP_BOUND_MS:g} ms + {ex['gap_ms']:g} ms of "
                       f"the lab's own delay changes; one packet is {interval_ms:g} ms)")
        allowed = ex["lost"] + 3 * ex["sd"] + LOSS_SLACK
        if st["lost"] > allowed:
            bad.append(f"stream lost {st['lost']} packets, more than the paths' simultaneous losses explain "
                       f"({ex['lost']:g} expected, at most {allowed:.0f})")
    for side, g in report["growth"].items():
        if g["rss_kib"] > rss_growth_mib * 1024:
            bad.append(f"{side} RSS grew by {g['rss_kib']} KiB (bound {rss_growth_mib:g} MiB)")
        if g["fds"] > fd_growth:
            bad.append(f"{side} open fds grew by {g['fds']} (bound {fd_growth})")
    return bad


def table(report: dict) -> str:
    rows = [("", "start", "end", "growth")]
    for side in ("server", "client"):
        for key in ("rss_kib", "fds", "paths", "delivered", "duplicates"):
            a, b = report["start"][side].get(key), report["end"][side].get(key)
            rows.append((f"{side} {key}", a, b, b - a if isinstance(a, int) and isinstance(b, int) else ""))
    for key, a in report["start"]["server"]["counters"].items():
        b = report["end"]["server"]["counters"][key]
        if a or b:
            rows.append((f"server {key}", a, b, b - a))
    for key in ("too_old", "malformed", "dropped_no_path"):
        a, b = report["start"]["client"][key], report["end"]["client"][key]
        rows.append((f"client {key}", a, b, b - a))
    width = max(len(str(r[0])) for r in rows)
    lines = [f"{str(r[0]):<{width}}  {str(r[1]):>10}  {str(r[2]):>10}  {str(r[3]):>8}" for r in rows]
    st = report["stream"]
    lines.append(f"stream: {st['sent']} sent, {st['lost']} lost ({st['loss_ratio']:.2%}), longest gap "
                 f"{st['longest_gap_ms']:.0f} ms, {report['changes']} impairment changes in {report['seconds']:g} s")
    ex = report.get("explained")
    if ex is not None:
        lines.append(f"explained by the lab: {ex['lost']:g} lost (sd {ex['sd']:g}; the paths' simultaneous losses), "
                     f"delay jumps up to {ex['gap_ms']:g} ms")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="soak time after the warm-up (default 600)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between impairment changes (default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rss-growth", type=float, default=RSS_GROWTH_MIB, help="MiB a daemon's RSS may grow")
    p.add_argument("--fd-growth", type=int, default=FD_GROWTH, help="descriptors a daemon may gain")
    p.add_argument("--json", help="write the report here (default: print it)")
    args = p.parse_args(argv)
    report = soak(args.seconds, args.interval, args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    bad = check(report, args.rss_growth, args.fd_growth)
    report["failed"] = bad
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    else:
        print(json.dumps(report))
    print(table(report))
    for line in bad:
        print("FAIL:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
