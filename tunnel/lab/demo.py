"""`mptun lab`: what multipath buys you, shown on one machine with no second host.

Why: mptun's claim is that a live media stream survives bad and dying links,
and that the scheduler mode decides what you trade for it.  A claim like that
is best checked by watching it, so the default `mptun lab` is a showcase: it
builds the impairment lab (client, router, server namespaces joined by N
paths, see :mod:`tunnel.lab.topology`), spoils the paths with delay, loss and
a rate limit (:mod:`tunnel.lab.impair`), and then, once per scheduler mode,
starts a fresh `mptun server` + `mptun client` (:mod:`tunnel.lab.stack`),
sends a media-like UDP stream (:mod:`tunnel.lab.stream`) and a bulk iperf3
TCP flow through the tunnel at the same time, kills one path for part of the
run, and reports per mode what the media stream saw and what the bulk flow
got.  The conditions are a :class:`~tunnel.lab.scenario.Scenario`: built-in
defaults, a TOML file, command-line options.  The lab is built once and
reused; only the tunnel is restarted per mode.

`mptun lab --quick` keeps the original ~15 s smoke test: one veth link, ping,
iperf3 up and down through the tunnel and over the raw link.

Everything is torn down on success, on error, on Ctrl-C (exit 130) and on
SIGTERM (exit 143).  Progress goes to stderr; stdout carries only the result
(a table, or one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tunnel.lab import mptcp
from tunnel.lab.impair import DIRECTIONS, Direction, Impairment, Impairments
from tunnel.lab.netns import Host, Lab, unique_prefix, wait_for
from tunnel.lab.scenario import (CLI, POLICY_RUNS, REFERENCE_RUNS, Scenario, ScenarioError,
                                 load_scenario, range_error, with_overrides)
from tunnel.lab.stack import SERVER_INNER, TunnelStack
from tunnel.lab.stream import StreamResult, run_stream
from tunnel.lab.topology import MultipathTopology

PINGS = 10
IPERF_PORT = 5201
MEDIA_PORT = 5004
QUICK_DURATION = 3.0  # seconds of each iperf3 run of --quick
BULK_WARMUP = 2.0  # seconds the bulk flow runs before the media stream and the measuring start
PATHS_UP_TIMEOUT = 20.0  # every path must have joined the tunnel by then
IMPAIRMENT_SEED = 1  # the delay line's jitter repeats from run to run (nftables' loss does not)
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
TEXT_WIDTH = 100  # the notes under the table are wrapped to this

# One line per mode under the table: what the mode does, so what its figures mean.
MODE_NOTES = {
    "duplicate": "every packet on every path, the receiver drops the copies: no gap when a path "
                 "dies; media is lost only when every live path drops the same packet: one "
                 "path's random loss during the outage, and whenever the bulk flow's copies fill "
                 "every path's queue at once; bulk gets one path's capacity",
    "redundant": "every packet on the best `redundancy` (2) paths: duplicate's protection at "
                 "less cost when there are more paths",
    "lowest-rtt": "one path at a time, the fastest: that path's loss reaches the media, and a "
                  "dying path costs a gap of about the dead interval (300 ms) unless it had "
                  "already switched",
    "balance": "packets spread over the paths by measured rate and loss: bulk can use every "
               "path's capacity, but every path's loss (and reordering between paths) reaches "
               "the media and TCP",
    "backup": "the first path until it dies, then the next: like lowest-rtt, in interface order",
    "webrtc": "policies/webrtc.toml on both ends: the media (marked EF, as WebRTC stacks mark "
              "audio) duplicated on every path and marked EF outside, everything else "
              "balanced; the lab's router queues are plain FIFOs that "
              "ignore the EF mark, so the media still waits behind the bulk flow on each path",
    "mptcp": "Linux MPTCP, no tunnel, for reference: the same bulk flow under `mptcpize run` over "
             "the raw paths (one subflow endpoint per path), through the same outage; no media "
             "stream runs (MPTCP carries TCP, not the UDP stream), so its media columns are \"-\"",
}
MEDIA_TOS = 0xB8  # the media stream is marked EF, as a WebRTC stack marks audio (RFC 8837)
POLICIES = Path(__file__).resolve().parents[2] / "policies"


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: tear down, then exit 143."""


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within this, SIGTERM raises :class:`Terminated` (so ``finally`` blocks tear down).

    Only in this process: pyroute2 forks helpers (e.g. to create a namespace)
    and ends them with SIGTERM; raising there would unwind a copy of our stack
    in the child and run our ``finally`` blocks, deleting the lab under us.
    """
    owner = os.getpid()

    def raise_terminated(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def lab_and_workdir(tag: str) -> Iterator[tuple[Lab, Path]]:
    """A fresh lab and a temporary directory; both removed afterwards, whatever happens.

    A second Ctrl-C or SIGTERM cannot cut the teardown short.
    """
    lab = Lab(unique_prefix(tag))
    workdir = Path(tempfile.mkdtemp(prefix="mptun-lab-"))
    try:
        yield lab, workdir
    finally:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            lab.close()
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# --------------------------------------------------------------------------
# iperf3
# --------------------------------------------------------------------------

def start_iperf3_server(host: Host, bind: str,
                        wrap: Callable[[list[str]], list[str]] = list) -> subprocess.Popen:
    """A one-shot iperf3 server in ``host`` on ``bind``, listening when this returns;
    ``wrap`` makes its command line (e.g. :func:`tunnel.lab.mptcp.argv`)."""
    proc = host.popen(wrap(["iperf3", "-s", "-1", "-B", bind, "-p", str(IPERF_PORT)]),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: host.is_listening(IPERF_PORT) or proc.poll() is not None, 5,
             message="iperf3 server did not start")
    if proc.poll() is not None:
        raise RuntimeError(f"iperf3 server exited with {proc.returncode}")
    return proc


def iperf3_client_argv(target: str, seconds: float, reverse: bool = False) -> list[str]:
    """An iperf3 TCP test to ``target`` printing JSON (server->client with ``reverse``)."""
    return ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"] + (
        ["-R"] if reverse else [])


def iperf3_bits_per_second(stdout: str) -> float:
    """The received TCP goodput from iperf3's JSON output; RuntimeError if the test failed."""
    try:
        out = json.loads(stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 printed no JSON: {stdout[-300:]!r}") from None
    if "error" in out:
        raise RuntimeError(f"iperf3: {out['error']}")
    return float(out["end"]["sum_received"]["bits_per_second"])


def iperf3_tcp(client: Host, server: Host, target: str, seconds: float,
               reverse: bool = False) -> float:
    """TCP goodput client->server (server->client with ``reverse``) in bit/s."""
    srv = start_iperf3_server(server, target)
    try:
        res = client.run(iperf3_client_argv(target, seconds, reverse), check=False,
                         timeout=seconds + 30)
        return iperf3_bits_per_second(res.stdout)
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


# --------------------------------------------------------------------------
# --quick: one link, ping and iperf3
# --------------------------------------------------------------------------

def run_quick(duration: float) -> dict[str, Any]:
    """The smoke test: tunnel over one veth link, ping, iperf3 both ways, raw link for scale."""
    figures: dict[str, Any] = {}
    with lab_and_workdir("lab") as (lab, workdir):
        progress(f"building lab {lab.prefix}: namespaces srv and cli, veth 198.18.0.0/30")
        server, client = lab.add_host("srv"), lab.add_host("cli")
        link = lab.link(server, client, "198.18.0.0/30")
        progress("generating throwaway certificates (CA, server, client 'alice')")
        stack = TunnelStack(server, client, link.a_addr, workdir=workdir)
        try:
            progress("starting mptun server and client")
            t0 = time.monotonic()
            stack.start()
            figures["tunnel_up_s"] = round(time.monotonic() - t0, 3)
            path = stack.server_status()["tunnels"][0]["paths"][0]
            figures["client_address"] = stack.client_inner()
            figures["cipher"] = path["cipher"]
            figures["inner_mtu"] = int(client.run(["cat", "/sys/class/net/mptun0/mtu"]).stdout)
            progress(f"pinging {SERVER_INNER} through the tunnel")
            figures["ping_ok"] = sum(client.ping(SERVER_INNER, timeout=1.0) for _ in range(PINGS))
            figures["ping_sent"] = PINGS
            progress(f"iperf3 TCP through the tunnel, {duration:g} s each way")
            up = iperf3_tcp(client, server, SERVER_INNER, duration)
            down = iperf3_tcp(client, server, SERVER_INNER, duration, reverse=True)
            progress(f"iperf3 TCP over the raw link, {duration:g} s")
            raw = iperf3_tcp(client, server, link.a_addr, duration)
            final = stack.server_status()["tunnels"][0]
            figures["server_delivered"] = final["delivered"]
            figures["dtls_dropped"] = final["paths"][0]["dtls_dropped"]
        finally:
            stack.stop()
    figures["tunnel_tcp_up_mbps"] = round(up / 1e6, 1)
    figures["tunnel_tcp_down_mbps"] = round(down / 1e6, 1)
    figures["raw_tcp_mbps"] = round(raw / 1e6, 1)
    figures["tunnel_over_raw"] = round(up / raw, 4)
    return figures


def format_quick(f: dict[str, Any]) -> str:
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
    return "\n".join(["mptun lab --quick: one client, one server, one veth link, "
                      "a DTLS 1.2 tunnel between them"]
                     + [f"  {k:<{width}}  {v}" for k, v in rows])


# --------------------------------------------------------------------------
# The showcase: one run per mode over the impaired multipath lab
# --------------------------------------------------------------------------

@dataclass
class ModeFigures:
    """What one mode achieved; the JSON output's per-mode object."""

    media_sent: int
    media_lost: int
    media_loss_percent: float
    media_latency_p50_ms: Optional[float]  # one-way
    media_latency_p99_ms: Optional[float]
    media_longest_gap_ms: float  # longest time without a media packet arriving
    bulk_tcp_mbps: Optional[float]  # None: the scenario has no bulk flow
    tunnel_up_s: float  # start of server and client until every path had joined

    @classmethod
    def of(cls, media: StreamResult, bulk_bps: Optional[float], tunnel_up_s: float) -> ModeFigures:
        return cls(media_sent=media.sent, media_lost=media.lost,
                   media_loss_percent=round(100 * media.loss_ratio, 2),
                   media_latency_p50_ms=_rounded(media.latency_p50_ms),
                   media_latency_p99_ms=_rounded(media.latency_p99_ms),
                   media_longest_gap_ms=round(media.longest_gap_ms, 1),
                   bulk_tcp_mbps=None if bulk_bps is None else round(bulk_bps / 1e6, 2),
                   tunnel_up_s=round(tunnel_up_s, 2))


@dataclass
class MptcpFigures:
    """What the ``mptcp`` reference row achieved; its JSON object has the modes' keys, with
    None for the media figures (no media stream runs: MPTCP carries TCP, not that UDP stream)
    and for the tunnel's start-up (there is no tunnel)."""

    bulk_tcp_mbps: Optional[float]
    mptcp_joined: Optional[bool]  # a second subflow really joined (kernel MIB): MPTCP used 2 paths
    mptcp_extra_subflows: Optional[int]  # subflows the client saw join (MPJoinSynAckRx)
    not_run: Optional[str] = None  # why the row has no figures
    media_sent: Optional[int] = None
    media_lost: Optional[int] = None
    media_loss_percent: Optional[float] = None
    media_latency_p50_ms: Optional[float] = None
    media_latency_p99_ms: Optional[float] = None
    media_longest_gap_ms: Optional[float] = None
    tunnel_up_s: Optional[float] = None


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 2)


def impairment_plan(scenario: Scenario, with_outage: bool) -> dict[tuple[int, Direction], Impairment]:
    """The scenario's paths as an :meth:`Impairments.apply` plan (same both ways but the traces)."""
    return {(i, d): imp for d in DIRECTIONS for i, imp in scenario.impairments(with_outage, d).items()}


def start_tunnel(topo: MultipathTopology, mode: str, workdir: Path) -> TunnelStack:
    """A fresh server and client in ``mode``; returns once every path has joined."""
    server, client = {"log_level": "info"}, {"mode": mode, "log_level": "info"}
    if mode in POLICY_RUNS:
        policy = str(POLICIES / POLICY_RUNS[mode])
        server["policy"] = client["policy"] = policy
        client["mode"] = "duplicate"  # what the policy's classes do not say (nothing: it has a default)
    stack = TunnelStack(topo.server, topo.client, topo.server_addr, workdir=workdir,
                        server_overrides=server, client_overrides=client)
    stack.start(timeout=PATHS_UP_TIMEOUT)
    n = len(topo.paths)

    def all_joined() -> bool:
        paths = stack.client_status()["paths"]
        return sum(bool(p.get("joined")) and p["state"] == "up" for p in paths) == n

    try:
        wait_for(all_joined, PATHS_UP_TIMEOUT)
    except TimeoutError:
        states = ", ".join(f"{p.get('name')} {p['state']}" for p in stack.client_status()["paths"])
        raise TimeoutError(f"mode {mode}: not all {n} paths joined the tunnel within "
                           f"{PATHS_UP_TIMEOUT:g} s (client paths: {states})") from None
    return stack


class BulkFlow:
    """An iperf3 TCP flow client -> server through the tunnel (or to ``target``, run through
    ``wrap``: the MPTCP row's raw paths); the server listens at once."""

    def __init__(self, topo: MultipathTopology, seconds: float, target: str = SERVER_INNER,
                 wrap: Callable[[list[str]], list[str]] = list) -> None:
        self.topo, self.seconds, self.target, self.wrap = topo, seconds, target, wrap
        self.server = start_iperf3_server(topo.server, target, wrap)
        self.client: Optional[subprocess.Popen] = None

    def start(self) -> None:
        """Start the flow; it runs :data:`BULK_WARMUP` seconds unmeasured, then ``seconds``."""
        argv = self.wrap(iperf3_client_argv(self.target, self.seconds) + ["--omit", f"{BULK_WARMUP:g}"])
        self.client = self.topo.client.popen(argv, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True)

    def result(self) -> float:
        """Wait for the flow to end; its goodput in bit/s."""
        assert self.client is not None
        stdout, _ = self.client.communicate(timeout=BULK_WARMUP + self.seconds + 30)
        return iperf3_bits_per_second(stdout)

    def stop(self) -> None:
        for proc in (self.client, self.server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def start_outage(imp: Impairments, scenario: Scenario) -> None:
    """Start the scenario's outage schedule now (once the media sender runs, or where it would)."""
    imp.restart_schedule()
    imp.apply(impairment_plan(scenario, with_outage=True))


def measure_mode(topo: MultipathTopology, imp: Impairments, scenario: Scenario,
                 workdir: Path) -> tuple[StreamResult, Optional[float]]:
    """Bulk flow, then media stream and outage; (media result, bulk bit/s or None).

    The bulk flow gets :data:`BULK_WARMUP` seconds' head start, which iperf3
    leaves out of its figure: both then measure the same steady state, not
    TCP's slow start overflowing every queue at once.
    """
    bulk = BulkFlow(topo, scenario.duration) if scenario.bulk else None
    try:
        if bulk:
            bulk.start()
            time.sleep(BULK_WARMUP)
        media = run_stream(topo.client, topo.server, SERVER_INNER, MEDIA_PORT,
                           scenario.media_rate, scenario.media_size, scenario.media_count(),
                           workdir, tos=MEDIA_TOS, during=lambda: start_outage(imp, scenario))
        bulk_bps = bulk.result() if bulk else None
    finally:
        if bulk:
            bulk.stop()
    imp.apply(impairment_plan(scenario, with_outage=False))
    return media, bulk_bps


def describe_run(scenario: Scenario, mode: str) -> str:
    """The progress line of one mode's run."""
    if mode in REFERENCE_RUNS:
        text = f"mode {mode}: bulk flow alone for {scenario.duration:g} s (after {BULK_WARMUP:g} s unmeasured)"
    else:
        text = f"mode {mode}: streaming {scenario.duration:g} s"
        if scenario.bulk:
            text += f" beside an iperf3 TCP flow (started {BULK_WARMUP:g} s earlier)"
    if (window := scenario.outage_window()) and scenario.outage:
        text += (f", path {scenario.outage.path} blackholed at {window[0]:g} s"
                 f" for {window[1] - window[0]:g} s")
    return text + "..."


def run_mode(topo: MultipathTopology, imp: Impairments, scenario: Scenario, mode: str,
             workdir: Path) -> ModeFigures:
    """One mode: fresh tunnel, measurement, tunnel stopped again."""
    progress(f"mode {mode}: starting mptun server and client, waiting for "
             f"{len(topo.paths)} paths to join")
    t0 = time.monotonic()
    stack = start_tunnel(topo, mode, workdir / mode)
    try:
        up_s = time.monotonic() - t0
        progress(describe_run(scenario, mode))
        media, bulk_bps = measure_mode(topo, imp, scenario, workdir)
    finally:
        stack.stop()
    figures = ModeFigures.of(media, bulk_bps, up_s)
    progress(f"mode {mode}: media loss {figures.media_loss_percent:.2f} %, longest gap "
             f"{figures.media_longest_gap_ms:.0f} ms"
             + ("" if bulk_bps is None else f", bulk {figures.bulk_tcp_mbps:.1f} Mbit/s"))
    return figures


def run_mptcp(topo: MultipathTopology, imp: Impairments, scenario: Scenario) -> MptcpFigures:
    """The ``mptcp`` reference row: the modes' bulk flow with Linux MPTCP over the raw paths.

    Same iperf3 flow, warm-up and outage as a mode's run, so its figure compares with the
    modes' bulk column; no tunnel, no media stream.  A machine without mptcpize or kernel
    MPTCP gets a row saying so, not a failed lab.
    """
    why = mptcp.available() or ("" if scenario.bulk else "--no-bulk (this row is the bulk flow alone)")
    if not why:
        try:
            mptcp.enable(topo)
        except (OSError, subprocess.SubprocessError) as exc:
            why = f"could not set up MPTCP: {' '.join(str(exc).split())}"
    if why:
        progress(f"mode mptcp: not run: {why}")
        return MptcpFigures(None, None, None, not_run=why)
    try:
        progress("mode mptcp: Linux MPTCP over the raw paths, one subflow endpoint per path, no tunnel")
        before = mptcp.mib(topo.client)
        bulk = BulkFlow(topo, scenario.duration, target=topo.server_addr, wrap=mptcp.argv)
        try:
            bulk.start()
            time.sleep(BULK_WARMUP)
            progress(describe_run(scenario, "mptcp"))
            start_outage(imp, scenario)
            bulk_bps = bulk.result()
        finally:
            bulk.stop()
            imp.apply(impairment_plan(scenario, with_outage=False))
        extra = mptcp.joined_subflows(before, mptcp.mib(topo.client))
    finally:
        mptcp.disable(topo)
    figures = MptcpFigures(round(bulk_bps / 1e6, 2), extra > 0, extra)
    progress(f"mode mptcp: bulk {figures.bulk_tcp_mbps:.1f} Mbit/s, {extra} extra subflows joined")
    return figures


def run_showcase(scenario: Scenario) -> dict[str, Any]:
    """Every mode of ``scenario`` over one lab; the JSON output."""
    t0 = time.monotonic()
    modes: dict[str, Any] = {}
    with lab_and_workdir("lab") as (lab, workdir):
        progress(f"building lab {lab.prefix}: client, router, server and "
                 f"{len(scenario.paths)} paths ({paths_summary(scenario)}; each way)")
        topo = MultipathTopology(lab, n_paths=len(scenario.paths))
        imp = Impairments(topo, seed=IMPAIRMENT_SEED)
        imp.apply(impairment_plan(scenario, with_outage=False))
        for mode in scenario.modes:
            figures = run_mptcp(topo, imp, scenario) if mode in REFERENCE_RUNS else \
                run_mode(topo, imp, scenario, mode, workdir)
            modes[mode] = asdict(figures)
        progress("tearing the lab down")
    return {"scenario": scenario.to_json(), "lab_prefix": lab.prefix, "modes": modes,
            "elapsed_s": round(time.monotonic() - t0, 1)}


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def paths_summary(s: Scenario) -> str:
    return "; ".join(f"path {i}: {p.describe()}" for i, p in enumerate(s.paths))


def scenario_summary(s: Scenario) -> str:
    """Three lines saying what the table is about."""
    traffic = f"media {s.media_rate:g} packets/s x {s.media_size} bytes"
    if s.bulk:
        traffic += " + iperf3 TCP bulk"
    outage = "no outage"
    if (window := s.outage_window()) and s.outage:
        outage = f"path {s.outage.path} blackholed {window[0]:g}-{window[1]:g} s"
    return "\n".join([f"mptun lab: scenario {s.name!r} ({s.source}), {s.duration:g} s per mode",
                      _wrapped(f"paths, each way: {paths_summary(s)}", "  "),
                      f"  traffic: {traffic}; {outage}"])


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _row(mode: str, f: dict[str, Any]) -> list[str]:
    bulk = "-" if f["bulk_tcp_mbps"] is None else f"{f['bulk_tcp_mbps']:.1f} Mbit/s"
    loss = "-" if f["media_loss_percent"] is None else f"{f['media_loss_percent']:.2f} %"
    return [mode, loss, _ms(f["media_latency_p50_ms"]),
            _ms(f["media_latency_p99_ms"]), _ms(f["media_longest_gap_ms"]), bulk]


def _table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned text: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _wrapped(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=TEXT_WIDTH, initial_indent=indent,
                         subsequent_indent=indent + "    ", break_on_hyphens=False)


def format_showcase(result: dict[str, Any], scenario: Scenario) -> str:
    header = ["mode", "media loss", "latency p50", "p99", "longest gap", "bulk TCP"]
    rows = [header] + [_row(mode, f) for mode, f in result["modes"].items()]
    return "\n".join([scenario_summary(scenario), ""] + _table(rows) + [
        "",
        _wrapped("How to read it: media = the stream (one-way latency; gap = longest time "
                 "without a packet)"
                 + (", bulk = the TCP flow's goodput beside it (--no-bulk: media alone)"
                    if scenario.bulk else "")
                 + "; random loss makes runs differ."),
        *(_wrapped(f"{mode}: {MODE_NOTES[mode]}{_run_note(f)}", "  ")
          for mode, f in result["modes"].items()),
    ])


def _run_note(f: dict[str, Any]) -> str:
    """What this run of a reference row did: not run and why, or whether MPTCP used 2 paths."""
    if f.get("not_run"):
        return f"; not run here: {f['not_run']}"
    if f.get("mptcp_joined") is None:
        return ""
    if f["mptcp_joined"]:
        return f"; this run: a second subflow joined ({f['mptcp_extra_subflows']} extra in all)"
    return "; this run: NO second subflow joined (MPTCP fell back to one path)"


# --------------------------------------------------------------------------
# Command line (the `lab` sub-parser lives in tunnel/app/cli.py)
# --------------------------------------------------------------------------

SHOWCASE_OPTIONS = ("modes", "paths", "delay", "loss", "rate", "trace_up", "trace_down",
                    "trace_scale", "scenario")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The scenario file (or the defaults) with the command-line options applied."""
    base = load_scenario(args.scenario) if args.scenario else Scenario()
    return with_overrides(base, duration=args.duration, modes=args.modes, paths=args.paths,
                          delay=args.delay, loss=args.loss, rate=args.rate,
                          no_outage=args.no_outage, no_bulk=args.no_bulk, trace_up=args.trace_up,
                          trace_down=args.trace_down, trace_scale=args.trace_scale)


def _quick_conflicts(args: argparse.Namespace) -> list[str]:
    used = [f"--{name.replace('_', '-')}" for name in SHOWCASE_OPTIONS if getattr(args, name) is not None]
    return used + [flag for flag, on in (("--no-outage", args.no_outage), ("--no-bulk", args.no_bulk))
                   if on]


def plan(args: argparse.Namespace) -> Callable[[], tuple[dict[str, Any], str]]:
    """Check ``args``; return what runs them, giving (JSON object, text for the terminal).

    Raises :class:`ScenarioError` for bad options or a bad scenario file.
    """
    if args.quick:
        if conflicts := _quick_conflicts(args):
            raise ScenarioError(f"{CLI}: {conflicts[0]}: not used by --quick")
        duration = QUICK_DURATION if args.duration is None else args.duration
        if why := range_error("duration", duration):
            raise ScenarioError(f"{CLI}: --duration: {why}")

        def quick() -> tuple[dict[str, Any], str]:
            figures = run_quick(duration)
            return figures, format_quick(figures)
        return quick
    scenario = scenario_from_args(args)

    def showcase() -> tuple[dict[str, Any], str]:
        result = run_showcase(scenario)
        return result, format_showcase(result, scenario)
    return showcase


def missing_requirement() -> Optional[str]:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool, package in (("iperf3", "iperf3"), ("nft", "nftables"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    return None


def main(args: argparse.Namespace) -> int:
    """`mptun lab`.  Scenario errors propagate as ConfigError: the CLI prints them, exit 2."""
    run = plan(args)
    if why := missing_requirement():
        print(f"mptun lab: {why}", file=sys.stderr)
        return 1
    try:
        with sigterm_interrupts():
            result, text = run()
    except KeyboardInterrupt as exc:
        print("mptun lab: interrupted; lab torn down", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        print(f"mptun lab: failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else text, flush=True)
    return 0 if result.get("ping_ok", 1) else 1  # --quick: no ping reply is a failure
