"""The benchmark's sections: one runner per ``--sections`` name (:data:`RUNNERS`), each
building its labs and setups, driving traffic and adding its figures to
:class:`~tunnel.lab.bench.results.Results`.  Rendering is :mod:`tunnel.lab.bench.report`'s
job; this module only measures."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tunnel.lab import mptcp
from tunnel.lab.bench.plan import LARGE, MODES, REPO_ROOT, SMALL, STREAM_PORT, Plan
from tunnel.lab.bench.profiles import PROFILES, Profile
from tunnel.lab.bench.results import Results, progress
from tunnel.lab.bench.setups import SETUPS, MptcpSetup, MptunSetup, RawSetup, Setup, lab_topology, started
from tunnel.lab.bench.traffic import CpuProbe, echo_rtt, iperf, sleep_until, tcp_throughput, udp_load
from tunnel.lab.impair import Impairment, Impairments
from tunnel.lab.netns import Host, Lab, unique_prefix
from tunnel.lab.probes import cpu_seconds
from tunnel.lab.stack import SERVER_INNER, TunnelStack
from tunnel.lab.stream import held_gap_ms, run_stream


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    fmt: str
    ratio: bool = True  # is mptun/other a meaningful figure?
    tunnel_only: bool = False
    higher_is_better: bool = True
    test: str = ""  # the test it comes from (for OpenConnect's DTLS share)
    show_share: bool = False  # print that share in this row (a TLS-heavy test is flagged in every row)


METRICS = [
    Metric("tcp_mbps", "TCP throughput", "Mbit/s", "{:,.0f}", test="tcp", show_share=True),
    Metric("udp_small_pps", f"UDP {SMALL} B received", "packets/s", "{:,.0f}", test="udp_small", show_share=True),
    Metric("udp_small_loss", f"UDP {SMALL} B loss", "%", "{:.1f}", ratio=False, test="udp_small"),
    Metric("udp_large_pps", f"UDP {LARGE} B received", "packets/s", "{:,.0f}", test="udp_large", show_share=True),
    Metric("udp_large_loss", f"UDP {LARGE} B loss", "%", "{:.1f}", ratio=False, test="udp_large"),
    Metric("cpu_client_us", f"CPU client side, UDP {SMALL} B", "µs/packet", "{:.1f}", tunnel_only=True,
           higher_is_better=False, test="udp_small"),
    Metric("cpu_server_us", f"CPU server side, UDP {SMALL} B", "µs/packet", "{:.1f}", tunnel_only=True,
           higher_is_better=False, test="udp_small"),
    Metric("rtt_p50_ms", "RTT p50", "ms", "{:.3f}", higher_is_better=False, test="echo", show_share=True),
    Metric("rtt_p99_ms", "RTT p99", "ms", "{:.3f}", higher_is_better=False, test="echo"),
    Metric("rtt_lost", "echo lost", "datagrams", "{:.0f}", ratio=False, test="echo"),
    Metric("echo_cpu_pct", "CPU during the echo, both ends", "% of a core", "{:.1f}", ratio=False, tunnel_only=True,
           higher_is_better=False, test="echo"),
]
METRIC = {m.key: m for m in METRICS}


def measure_single(setup: Setup, plan: Plan) -> dict[str, float]:
    """All foundation figures of one run of one (started) setup."""
    fig: dict[str, float] = {}

    def say(what: str) -> None:
        progress(f"  {setup.name}: {what}")

    say("TCP")
    with setup.observe("tcp") as extra:
        fig["tcp_mbps"] = tcp_throughput(setup, plan.duration)
    fig.update(extra)
    say(f"UDP {SMALL} B")
    with setup.observe("udp_small") as extra:
        if setup.tun_names() is not None:
            with CpuProbe(setup) as probe:
                fig["udp_small_pps"], fig["udp_small_loss"] = udp_load(setup, plan.duration, SMALL)
            fig["cpu_client_us"], fig["cpu_server_us"] = probe.micros_per_packet()
        else:
            fig["udp_small_pps"], fig["udp_small_loss"] = udp_load(setup, plan.duration, SMALL)
    fig.update(extra)
    say(f"UDP {LARGE} B")
    with setup.observe("udp_large") as extra:
        fig["udp_large_pps"], fig["udp_large_loss"] = udp_load(setup, plan.duration, LARGE)
    fig.update(extra)
    say("UDP echo")
    with setup.observe("echo") as extra:
        pids = [p for side in setup.pids() for p in side]
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        fig["rtt_p50_ms"], fig["rtt_p99_ms"], fig["rtt_lost"] = echo_rtt(setup, plan.echo_duration)
        if pids:  # both sides' tunnel processes, in % of one core, while the echo ran
            fig["echo_cpu_pct"] = 100.0 * (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
    fig.update(extra)
    say(", ".join(f"{k}={METRIC[k].fmt.format(v) if k in METRIC else f'{v:.0f}'}" for k, v in fig.items()))
    return fig


def run_single(args: argparse.Namespace, results: Results) -> None:
    """``plan.runs`` rounds, each measuring every setup once in a fresh one-path lab (interleaved)."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"single path: round {i + 1}/{plan.runs}")
        for name in args.only:
            cls = SETUPS[name]
            missing = [b for b in cls.binaries if shutil.which(b) is None]
            if missing:
                results.note("single", f"{name}: not measured: {', '.join(missing)} not installed"
                             " (apt-get install failed)")
                continue
            try:
                with lab_topology("bench", 1) as (topo, _), started(cls(topo)) as setup:
                    results.add("single", name, measure_single(setup, plan))
                    results.ciphers[name] = setup.cipher()
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                results.failed("single", f"{name} (round {i + 1})", exc)


# --------------------------------------------------------------------------
# Multipath sections (mptun on a two-path topology)
# --------------------------------------------------------------------------

def stream_through(setup: MptunSetup, plan_count: int, pps: float, size: int,
                   during: Optional[Callable[[], None]] = None):
    """A numbered UDP stream client -> server through the tunnel (tunnel.lab.stream)."""
    return run_stream(setup.client, setup.server, SERVER_INNER, STREAM_PORT, pps, size, plan_count,
                      setup.stack.workdir, during=during)


def sample_states(setup: MptunSetup, seconds: float, interval: float = 0.1) -> list[str]:
    """The client's path states every ``interval`` s for ``seconds`` (one entry per path and sample)."""
    states: list[str] = []
    t0 = time.monotonic()
    for k in range(max(1, int(seconds / interval))):
        sleep_until(t0 + k * interval)
        states += [p.get("state", "?") for p in setup.paths()]
    return states


def run_loss(args: argparse.Namespace, results: Results) -> None:
    """Residual loss in duplicate mode over two paths with independent random loss p on each.

    While the stream runs, the client's path states are sampled every 100 ms:
    a path mptun declares down carries no copies, so its down time raises the
    loss above p1*p2.
    """
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"residual loss: round {i + 1}/{plan.runs}")
        try:
            with lab_topology("bloss", 2) as (topo, imp), started(MptunSetup(topo, mode="duplicate")) as setup:
                setup.wait_paths(2)
                for p in plan.loss_rates:
                    progress(f"  duplicate, {p:.0%} loss per path: {plan.loss_count} datagrams")
                    imp.apply({(k, d): Impairment(loss=p) for k in range(2) for d in ("up", "down")})
                    states: list[str] = []
                    before = setup.path_loss_counters()
                    res = stream_through(setup, plan.loss_count, plan.loss_pps, plan.loss_size,
                                         during=lambda: states.extend(
                                             sample_states(setup, plan.loss_count / plan.loss_pps)))
                    path_loss = setup.path_loss(before, setup.path_loss_counters())
                    imp.clear()
                    down = 100 * sum(s not in ("up", "degraded") for s in states) / max(1, len(states))
                    expected = p * p
                    results.add("loss", f"{p:.2f}", {
                        "sent": res.sent, "lost": res.lost, "loss_pct": 100 * res.loss_ratio,
                        "expected_pct": 100 * expected, "expected_lost": expected * res.sent,
                        "duplicates": res.duplicates, "down_pct": down,
                        "path_loss_pct": 100 * statistics.mean(path_loss.values())})
                    progress(f"  lost {res.lost} of {res.sent} (expected {expected * res.sent:.1f}),"
                             f" paths down {down:.0f} % of the time")
                    setup.wait_paths(2)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("loss", f"round {i + 1}", exc)


def cut_busiest_path(setup: MptunSetup, imp: Impairments, t0: float, cut_at: float) -> int:
    """Blackhole (both ways) the path that carries the stream, ``cut_at`` s after ``t0``.

    The choice is made from the client's per-path tx counters over the 250 ms
    just before the cut (the stream, 25 datagrams there, dwarfs the probes):
    a mode may move the stream between equal paths now and then.
    """
    sleep_until(t0 + cut_at - 0.3)
    before = setup.path_counters()
    sleep_until(t0 + cut_at - 0.05)
    after = setup.path_counters()
    busiest = max(sorted(after), key=lambda k: after[k] - before.get(k, 0))
    sleep_until(t0 + cut_at)
    imp.blackhole(busiest)
    return busiest


# The rolling outage (issue 16 finding 7: two modems driving through coverage holes): an EF
# stream at ROLLING_PPS; path 0 silent from ROLLING_FIRST[0] to ROLLING_FIRST[1] s (longer than
# the 3 s timeout), and as it comes back path 1 goes silent for the rest of the stream.  The
# outages are scheduled in the delay line (both directions, to the millisecond).
ROLLING_ROW = "rolling outage"  # its row in the failover table
ROLLING_PPS = 50.0
ROLLING_FIRST = (3.0, 9.0)
ROLLING_SECONDS = 12.0
EF_TOS = 0xB8  # DSCP 46 (EF)


def rolling_outage_stream(client: Host, server: Host, imp: Impairments, workdir: Path, *,
                          pps: float = ROLLING_PPS, first: tuple[float, float] = ROLLING_FIRST,
                          seconds: float = ROLLING_SECONDS):
    """Run the rolling outage over a two-path MultipathTopology's ``imp``; returns
    (StreamResult with arrivals, the schedule start in monotonic seconds).  Used by the
    failover section and by tests/test_resilience.py."""
    imp.set(0, Impairment(outages=(first,)))
    imp.set(1, Impairment(outages=((first[1], first[1] + seconds + 60.0),)))
    started: list[float] = []
    try:
        res = run_stream(client, server, SERVER_INNER, STREAM_PORT, pps, 200, int(pps * seconds), workdir,
                         tos=EF_TOS, full=True, during=lambda: started.append(imp.restart_schedule()))
    finally:
        imp.clear()
    return res, started[0]


def run_failover(args: argparse.Namespace, results: Results) -> None:
    """Per mode: longest gap and losses of a 100/s stream when its path is blackholed; then the
    rolling outage in duplicate mode."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"failover: round {i + 1}/{plan.runs}")
        for mode in MODES:
            try:
                with lab_topology("bfail", 2) as (topo, imp):
                    interfaces = [p.client_ifname for p in topo.paths]  # backup's priority: path 0 first
                    with started(MptunSetup(topo, mode=mode, interfaces=interfaces)) as setup:
                        setup.wait_paths(2)
                        cut: list[int] = []
                        res = stream_through(
                            setup, plan.failover_count, plan.failover_pps, 200,
                            during=lambda: cut.append(
                                cut_busiest_path(setup, imp, time.monotonic(), plan.failover_cut_s)))
                        results.add("failover", mode, {"gap_ms": res.longest_gap_ms, "lost": res.lost,
                                                       "reordered": res.reordered, "cut_path": cut[0],
                                                       "sent": res.sent})
                        progress(f"  {mode}: cut path {cut[0]}, longest gap {res.longest_gap_ms:.0f} ms,"
                                 f" lost {res.lost}")
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
                results.failed("failover", f"{mode} (round {i + 1})", exc)
        try:
            with lab_topology("broll", 2) as (topo, imp):
                with started(MptunSetup(topo, mode="duplicate")) as setup:
                    setup.wait_paths(2)
                    t0 = time.monotonic()
                    res, _ = rolling_outage_stream(setup.client, setup.server, imp, setup.stack.workdir)
                    held = held_gap_ms(res, ROLLING_PPS, setup.stack.stalls(t0))
                    results.add("failover", ROLLING_ROW, {"gap_ms": res.longest_gap_ms, "held_gap_ms": held,
                                                          "lost": res.lost, "reordered": res.reordered,
                                                          "sent": res.sent})
                    progress(f"  rolling outage: longest gap {res.longest_gap_ms:.0f} ms ({held:.0f} ms less "
                             f"stalls), lost {res.lost}")
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("failover", f"rolling outage (round {i + 1})", exc)


def run_aggregation(args: argparse.Namespace, results: Results) -> None:
    """TCP over two rate-limited paths: one raw link, MPTCP, mptun balance."""
    plan: Plan = args.plan
    limit = Impairment(rate_mbit=plan.link_mbit)
    for i in range(plan.runs):
        progress(f"aggregation: round {i + 1}/{plan.runs}")
        try:
            with lab_topology("bagg", 2) as (topo, imp):
                imp.apply({(k, d): limit for k in range(2) for d in ("up", "down")})
                with started(RawSetup(topo)) as raw:  # unbound sockets leave through path 0
                    results.add("aggregation", "raw", {"mbps": tcp_throughput(raw, plan.duration)})
                if shutil.which("mptcpize") is None:
                    results.note("aggregation", "MPTCP: not measured: mptcpize not installed")
                else:
                    try:
                        with started(MptcpSetup(topo)) as mp:
                            before = mptcp.mib(topo.client)
                            mbps = tcp_throughput(mp, plan.duration)
                            joined = mptcp.joined_subflows(before, mptcp.mib(topo.client))
                            results.add("aggregation", "mptcp", {"mbps": mbps, "joined": joined})
                    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                        results.failed("aggregation", "MPTCP", exc)
                with started(MptunSetup(topo, mode="balance")) as setup:
                    setup.wait_paths(2)
                    before = setup.path_counters("tx_bytes")
                    mbps = tcp_throughput(setup, plan.duration)
                    after = setup.path_counters("tx_bytes")
                    sent = {k: after[k] - before.get(k, 0) for k in after}
                    share = 100 * max(sent.values()) / max(1, sum(sent.values()))
                    results.add("aggregation", "mptun", {"mbps": mbps, "busiest_share": share})
                progress("  " + ", ".join(f"{row} {results.tables['aggregation'][row]['mbps'][-1]:.1f}"
                                          for row in results.tables.get("aggregation", {})) + " Mbit/s")
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("aggregation", f"round {i + 1}", exc)


UNEQUAL_MODES = ("balance", "lowest-rtt")  # mptun's rows in the unequal-paths section
# The inner TCP's congestion control in the unequal-paths section: CUBIC, what Windows, macOS,
# iOS and Android run, for every row.  BBR (this lab host's default) caps a flow's data in
# flight at twice its bandwidth x *lowest* RTT, so one BBR flow cannot fill a path whose RTT is
# many times its fastest path's, through any bond that keeps one flow one flow: the balance and
# MPTCP rows are measured with BBR too (UNEQUAL_ALSO), to show that.
UNEQUAL_CC = "cubic"
UNEQUAL_ALSO = "bbr"
UNEQUAL_UDP_SIZE = LARGE  # payload bytes of its UDP stream


def measure_unequal(profile: Profile, plan: Plan, results: Results) -> None:
    """One round of one profile in a fresh two-path lab: TCP over each raw path alone, Linux
    MPTCP, mptun per mode, then a UDP stream through `balance` at 1.3x the faster path.

    Every flow starts the delay line's schedule anew, so on a traced profile each row
    sees the same stretch of the traces (from their beginning).
    """
    seconds = plan.unequal_duration
    said: list[str] = []  # this round's figures, for the progress line

    def add(name: str, figures: dict[str, float]) -> None:
        results.add("unequal", f"{profile.name}|{name}", figures)
        if "mbps" in figures:
            said.append(f"{name} {figures['mbps']:.1f}")

    with lab_topology("bune", 2) as (topo, imp), tempfile.TemporaryDirectory(prefix="mptun-bench-") as tmp:
        imp.apply(profile.plan())

        def tcp(setup: Setup, extra: tuple[str, ...] = (), cc: str = UNEQUAL_CC) -> float:
            imp.restart_schedule()
            return iperf(setup, seconds, ("-C", cc, *extra))["sum_received"]["bits_per_second"] / 1e6

        also = UNEQUAL_ALSO if _cc_available(UNEQUAL_ALSO) else None

        with started(RawSetup(topo)) as raw:  # a socket bound to path k's address leaves through path k
            single = [tcp(raw, ("-B", path.client_addr)) for path in topo.paths]
        best = max(range(len(single)), key=single.__getitem__)
        add("single", {"mbps": single[best], "best_path": best, **{f"path{k}_mbps": v for k, v in enumerate(single)}})
        if why := mptcp.available():
            results.note("unequal", f"Linux MPTCP: not measured: {why}")
        else:
            try:
                with started(MptcpSetup(topo)) as mp:
                    before = mptcp.mib(topo.client)
                    mbps = tcp(mp)
                    add("mptcp", {"mbps": mbps, "joined": mptcp.joined_subflows(before, mptcp.mib(topo.client))})
                    if also:
                        add(f"mptcp {also}", {"mbps": tcp(mp, cc=also)})
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                results.failed("unequal", f"{profile.name}: MPTCP", exc)
        for mode in UNEQUAL_MODES:
            with started(MptunSetup(topo, mode=mode)) as setup:
                setup.wait_paths(2)
                add(mode, {"mbps": tcp(setup)})
                if mode != "balance":
                    continue
                if also:
                    add(f"balance {also}", {"mbps": tcp(setup, cc=also)})
                mbit = profile.udp_mbit()
                pps = mbit * 1e6 / (8 * UNEQUAL_UDP_SIZE)
                imp.restart_schedule()
                res = run_stream(topo.client, topo.server, SERVER_INNER, STREAM_PORT, pps, UNEQUAL_UDP_SIZE,
                                 max(1, round(pps * seconds / 2)), tmp)
                latency = {k: v for k, v in (("p50_ms", res.latency_p50_ms), ("p99_ms", res.latency_p99_ms))
                           if v is not None}  # none if nothing arrived
                add("udp", {"offered_mbps": mbit, "loss_pct": 100 * res.loss_ratio, **latency})
                said.append(f"UDP at {mbit:.1f} Mbit/s {100 * res.loss_ratio:.1f} % lost")
    progress("  " + ", ".join(said) + " (TCP in Mbit/s; single = the better raw path)")


def _cc_available(name: str) -> bool:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
            return name in f.read().split()
    except OSError:
        return False


def run_unequal(args: argparse.Namespace, results: Results) -> None:
    """Aggregation on unequal paths: every profile of :data:`~tunnel.lab.bench.profiles.PROFILES`,
    round by round (interleaved), each round in fresh labs."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        for profile in PROFILES:
            if why := profile.unavailable():
                results.note("unequal", f"{profile.name}: not run: {why}")
                continue
            progress(f"unequal paths: {profile.name}, round {i + 1}/{plan.runs}")
            try:
                measure_unequal(profile, plan, results)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
                results.failed("unequal", f"{profile.name} (round {i + 1})", exc)


REORDER_DELAYS_MS = (5, 25)  # one-way delay of path 0 and path 1 in the reorder section
REORDER_HOLD_MS = 100


def _reorder_policy(workdir: Path, reorder: bool) -> str:
    path = Path(workdir) / f"reorder-{reorder}.toml"
    path.write_text('[[class]]\nname = "all"\nmode = "balance"\n'
                    + (f"reorder = true\nreorder_ms = {REORDER_HOLD_MS}\n" if reorder else "reorder = false\n"))
    return str(path)


def run_reorder(args: argparse.Namespace, results: Results) -> None:
    """Balance mode over two rate-limited paths with different delays, with and without
    receiver-side reordering: TCP throughput, and order and latency of a UDP stream."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"reorder: round {i + 1}/{plan.runs}")
        try:
            with lab_topology("bro", 2) as (topo, imp), tempfile.TemporaryDirectory(prefix="mptun-bench-") as tmp:
                imp.apply({(k, d): Impairment(delay_ms=REORDER_DELAYS_MS[k], rate_mbit=plan.link_mbit)
                           for k in range(2) for d in ("up", "down")})
                with started(RawSetup(topo)) as raw:  # unbound sockets leave through path 0
                    results.add("reorder", "raw", {"mbps": tcp_throughput(raw, plan.duration)})
                for row, reorder in (("balance", False), ("balance+reorder", True)):
                    with started(MptunSetup(topo, mode="balance", policy=_reorder_policy(tmp, reorder))) as setup:
                        setup.wait_paths(2)
                        mbps = tcp_throughput(setup, plan.duration)
                        res = run_stream(topo.client, topo.server, SERVER_INNER, 5008, rate=plan.loss_pps,
                                         size=plan.loss_size, count=plan.loss_count // 2, workdir=tmp)
                        tunnel = setup.stack.server_status()["tunnels"][0]
                        results.add("reorder", row, {
                            "mbps": mbps, "reordered_pct": 100 * res.reordered / max(1, res.received),
                            "lost": res.lost, "p50_ms": res.latency_p50_ms or 0.0,
                            "p99_ms": res.latency_p99_ms or 0.0,
                            "released": tunnel["reorder"]["released"], "timeouts": tunnel["reorder"]["timeouts"]})
                progress("  " + ", ".join(f"{row} {results.tables['reorder'][row]['mbps'][-1]:.1f}"
                                          for row in results.tables.get("reorder", {})) + " Mbit/s")
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("reorder", f"round {i + 1}", exc)


def run_cpu(args: argparse.Namespace, results: Results) -> None:
    """CPU per packet at a fixed offered load: duplicate over two paths vs one path."""
    plan: Plan = args.plan
    for i in range(plan.runs):
        progress(f"duplicate CPU: round {i + 1}/{plan.runs}")
        try:
            with lab_topology("bcpu", 2) as (topo, _):
                for row, paths in (("1 path", topo.paths[:1]), ("duplicate, 2 paths", topo.paths)):
                    interfaces = [p.client_ifname for p in paths]
                    with started(MptunSetup(topo, mode="duplicate", interfaces=interfaces)) as setup:
                        setup.wait_paths(len(paths))
                        with CpuProbe(setup) as probe:
                            pps, loss = udp_load(setup, plan.duration, plan.cpu_size, plan.cpu_pps)
                        client_us, server_us = probe.micros_per_packet()
                        results.add("cpu", row, {"cpu_client_us": client_us, "cpu_server_us": server_us,
                                                 "pps": pps, "loss": loss})
                        progress(f"  {row}: client {client_us:.1f} µs, server {server_us:.1f} µs per packet,"
                                 f" {pps:,.0f} packets/s delivered")
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
            results.failed("cpu", f"round {i + 1}", exc)


def run_server(args: argparse.Namespace, results: Results) -> None:
    """Server memory per tunnel (tunnel/lab/servermem.py): a real server, simulated clients."""
    from tunnel.lab import servermem

    counts = [20] if args.quick else [20, 100]
    for i in range(args.plan.runs):
        progress(f"server memory: {', '.join(map(str, counts))} simulated tunnels (run {i + 1})")
        try:
            figures = servermem.measure(counts)
        except (RuntimeError, TimeoutError, OSError) as exc:
            results.note("server", f"run {i + 1}: could not be measured: {type(exc).__name__}: {exc}")
            continue
        for n in counts:
            results.add("server", f"{n} tunnels", {
                "rss_mib": figures[str(n)]["rss_kib"] / 1024,
                "kib_per_tunnel": figures[str(n)]["kib_per_tunnel"],
                "base_mib": figures["base_rss_kib"] / 1024,
            })


def run_fleet(args: argparse.Namespace, results: Results) -> None:
    """Aggregate packets/s of 20 clients through one server vs the same 20 over the raw underlay
    (tunnel/lab/fleetpps.py)."""
    from pyroute2.netlink.exceptions import NetlinkError

    from tunnel.lab import fleetpps

    for i in range(args.plan.runs):
        progress(f"fleet: 20 clients flooding {fleetpps.SIZE} B UDP through one server, then raw (run {i + 1})")
        try:
            f = fleetpps.measure(20, args.plan.duration)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError, NetlinkError) as exc:
            results.failed("fleet", f"run {i + 1}", exc)
            continue
        results.add("fleet", "20 clients", {k: f[k] for k in (
            "tunnel_pps", "raw_pps", "ratio", "tunnel_loss", "raw_loss", "server_cpu_us", "per_client_min_pps")})
        progress(f"  tunnel {f['tunnel_pps']:,.0f} packets/s, raw {f['raw_pps']:,.0f} ({f['ratio']:.2f}x),"
                 f" server {f['server_cpu_us']:.1f} µs per packet")


def _marking_rates(n: int) -> dict[str, float]:
    """Packets/s of: plain send, sendmsg with an IP_TOS cmsg (one socket, loopback, 200 B),
    and classification + outer TOS with no policy and with the shipped WebRTC policy."""
    from tunnel.app.config import load_policy
    from tunnel.core.policy import Policy
    from tunnel.io.udp import _pack_int

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # small: we measure the sender, drops are fine
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    data = bytes(200)
    cmsg = [(socket.IPPROTO_IP, socket.IP_TOS, _pack_int(0xB8))]
    out = {}
    for name, fn in (("send", lambda: tx.send(data)), ("sendmsg_tos", lambda: tx.sendmsg([data], cmsg))):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = n / (time.perf_counter() - t)
    tx.close()
    rx.close()
    pkts = [bytes([0x45, tos, 0, 228]) + bytes(5) + bytes([proto]) + bytes(2) + bytes([100, 64, 0, 2, 100, 64, 0, 1])
            + port.to_bytes(2, "big") + (443).to_bytes(2, "big") + bytes(200)
            for tos, proto, port in ((0xB8, 17, 5000), (0, 17, 12000), (0x60, 6, 4000), (0, 6, 50000))]
    # unmarked SRTP on ports the OS gave (a browser's or aiortc's call): found by its payload
    rtp = [bytes([0x45, 0, 0, 228]) + bytes(5) + bytes([17]) + bytes(2) + bytes([100, 64, 0, 2, 100, 64, 0, 1])
           + (54321).to_bytes(2, "big") + (61000).to_bytes(2, "big") + (208).to_bytes(2, "big") + bytes(2)
           + bytes([0x80, 111]) + i.to_bytes(2, "big") + bytes(4) + b"\x0a\x0b\x0c\x0d" + bytes(188)
           for i in range(4)]
    webrtc = load_policy(REPO_ROOT / "policies" / "webrtc.toml")
    for name, policy, mix in (("classify_none", Policy.single("duplicate"), pkts), ("classify_webrtc", webrtc, pkts),
                              ("classify_webrtc_rtp", webrtc, rtp)):
        t = time.perf_counter()
        for i in range(n):
            p = mix[i & 3]
            policy.outer_tos(policy.classify(p), p)
        out[name] = n / (time.perf_counter() - t)
    return out


def run_marking(args: argparse.Namespace, results: Results) -> None:
    n = 20_000 if args.quick else 200_000
    for i in range(args.plan.runs):
        progress(f"marking: send vs sendmsg+IP_TOS, classification ({n:,} packets, run {i + 1})")
        results.add("marking", "packets/s", _marking_rates(n))


WEBRTC_ROWS = ("raw", "duplicate", "balance", "lowest-rtt")  # raw link, then mptun per mode
WEBRTC_POLICY = REPO_ROOT / "policies" / "webrtc.toml"
WEBRTC_OUTAGE_S = 2.0  # the blackhole scenario's outage, from the middle of the call


def _webrtc_call(cl, row: str, scenario: str, seconds: float) -> tuple[dict, Optional[str]]:
    """One call for a row of the webrtc section; the blackhole scenario cuts the call's path mid-call."""
    from tunnel.lab import webrtc

    def cut(t0: float) -> None:
        if row == "raw":
            cut_paths.append(0)
        else:  # the path carrying the call (lowest-rtt, balance: it may be either)
            stack = cl.stack

            def which(status: dict) -> int:  # as MptunSetup.path_index: by interface name or address
                text = json.dumps(status)
                return next((x.index for x in cl.topo.paths if x.client_ifname in text or x.client_addr in text), -1)

            def counters() -> dict[int, int]:
                return {which(p): p.get("tx_packets", 0) for p in stack.client_status()["paths"]}
            sleep_until(t0 + seconds / 2 - 0.3)
            before = counters()
            sleep_until(t0 + seconds / 2)
            after = counters()
            busiest = max(sorted(after), key=lambda k: after[k] - before.get(k, 0))
            cut_paths.append(max(0, busiest))
        sleep_until(t0 + seconds / 2)
        cl.imp.blackhole(cut_paths[-1])
        sleep_until(t0 + seconds / 2 + WEBRTC_OUTAGE_S)
        cl.imp.blackhole(cut_paths[-1], on=False)

    def heal() -> None:
        for i in range(len(cl.topo.paths)):
            cl.imp.blackhole(i, on=False)
        if cl.stack is not None:
            cl.wait_paths_up()

    cut_paths: list[int] = []
    via = "raw" if row == "raw" else "tunnel"
    if row == "raw":
        cl.direct(True)
    elif row == "duplicate":
        cl.start_tunnel(policy=WEBRTC_POLICY)  # RTP in the media-unmarked class: duplicate, EF
    else:
        cl.start_tunnel(mode=row)
    try:
        if scenario == "blackhole":
            return webrtc.judged_call(cl, seconds, via, during=cut, reset=heal)
        return webrtc.judged_call(cl, seconds, via)
    finally:
        heal() if cl.stack is None else [cl.imp.blackhole(i, on=False) for i in range(len(cl.topo.paths))]
        if row == "raw":
            cl.direct(False)
        cl.stop_tunnel()


def run_webrtc(args: argparse.Namespace, results: Results) -> None:
    """A real WebRTC call (aiortc) over the raw link and through mptun per mode, same lab, same run."""
    from tunnel.lab import webrtc

    plan: Plan = args.plan
    for i in range(plan.runs):
        for scenario in ("loss", "blackhole"):
            progress(f"webrtc: {scenario}, round {i + 1}/{plan.runs}")
            try:
                with Lab(unique_prefix("webrtc")) as lab:
                    cl = webrtc.CallLab(lab)
                    try:
                        if scenario == "loss":
                            cl.imp.apply({(k, d): Impairment(loss=0.10) for k in range(2) for d in ("up", "down")})
                        for row in WEBRTC_ROWS:
                            try:
                                fig, why = _webrtc_call(cl, row, scenario, plan.webrtc_seconds)
                            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
                                results.failed("webrtc", f"{scenario}, {row} (round {i + 1})", exc)
                                continue
                            flat = {"starved": 0.0 if why is None else 1.0, "stall": webrtc.tunnel_stalled_ms(fig)}
                            for direction, role in (("up", "answer"), ("down", "offer")):
                                a, v = fig[role]["audio"], fig[role]["video"]
                                flat.update({
                                    f"audio_loss_{direction}": a.get("loss_pct", 100.0),
                                    f"audio_wire_loss_{direction}": a.get("rtp_loss_pct", 100.0),
                                    f"video_wire_loss_{direction}": v.get("rtp_loss_pct", 100.0),
                                    f"jitter_{direction}": a.get("jitter_ms", 0.0),
                                    f"gap_{direction}": a.get("net_gap_ms", plan.webrtc_seconds * 1e3),
                                    f"pause_{direction}": v.get("longest_pause_ms", plan.webrtc_seconds * 1e3),
                                    f"frames_{direction}": 100.0 * v.get("frames", 0) / max(1, v.get("frames_sent", 0)),
                                })
                            results.add("webrtc", f"{scenario}|{row}", flat)
                            if why is not None:
                                results.note("webrtc", f"{scenario}, {row} (round {i + 1}): app figures (getStats,"
                                                       f" frames) taken from a starved call: {why}")
                            progress(f"  {row}: audio loss up/down {flat['audio_loss_up']:.1f}/{flat['audio_loss_down']:.1f} %,"
                                     f" gap {flat['gap_up']:.0f}/{flat['gap_down']:.0f} ms")
                    finally:
                        cl.close()
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError) as exc:
                results.failed("webrtc", f"{scenario} (round {i + 1})", exc)


HOSTILE_FLOODS = ((0, 0), (80, 16), (500, 64))  # silent half-open handshakes/s, source addresses (own /24 each)


def run_hostile(args: argparse.Namespace, results: Results) -> None:
    """A real client's time to its tunnel while silent half-open handshakes flood the server
    (tunnel/lab/starve.py), against the same client with no flood."""
    from tunnel.lab import starve

    for i in range(args.plan.runs):
        for rate, sources in HOSTILE_FLOODS:
            row = "no flood" if not rate else f"{rate}/s from {sources} addresses"
            progress(f"hostile: time to tunnel, {row} (run {i + 1})")
            try:
                with Lab(unique_prefix("bhostile")) as lab:
                    srv, cli = lab.add_host("srv"), lab.add_host("cli")
                    link = lab.link(srv, cli, "198.18.0.0/30")
                    atk = starve.add_attacker(lab, srv)
                    stack = TunnelStack(srv, cli, link.a_addr)
                    try:
                        res = starve.time_to_tunnel(stack, atk, rate, sources)
                    finally:
                        stack.stop()
                results.add("hostile", row, {
                    "ms": res.time_to_tunnel_s * 1e3, "achieved": res.achieved, "half_open": res.half_open_at_start,
                    "attempts": res.client_attempts, "evicted": res.counters["handshakes_evicted"],
                    "refused": res.counters["handshakes_refused"]})
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, LookupError, ValueError) as exc:
                results.failed("hostile", f"{row} (round {i + 1})", exc)


RUNNERS: dict[str, Callable[[argparse.Namespace, Results], None]] = {
    "single": run_single, "loss": run_loss, "failover": run_failover,
    "aggregation": run_aggregation, "unequal": run_unequal, "reorder": run_reorder, "cpu": run_cpu, "server": run_server,
    "fleet": run_fleet, "hostile": run_hostile, "marking": run_marking, "webrtc": run_webrtc,
}
