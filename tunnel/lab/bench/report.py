"""BENCH.md and the JSON output from a run's results: one generator function per section
(:data:`SECTIONS`), the foundation targets checked against the single-path figures, and
:func:`to_json`.  Nothing here runs a lab, so a report can be rendered from results alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from tunnel.lab.bench.measure import (METRIC, METRICS, REORDER_DELAYS_MS, REORDER_HOLD_MS, ROLLING_FIRST,
                                      ROLLING_PPS, ROLLING_ROW, ROLLING_SECONDS, WEBRTC_OUTAGE_S, Metric)
from tunnel.lab.bench.measure import UNEQUAL_ALSO, UNEQUAL_CC, UNEQUAL_MODES, UNEQUAL_UDP_SIZE
from tunnel.lab.bench.plan import ECHO_GRACE, ECHO_RATE, ECHO_SIZE, LARGE, PEERS, SETUP_NAMES, SMALL, Plan
from tunnel.lab.bench.profiles import PROFILES, UDP_FACTOR, Profile
from tunnel.lab.bench.results import Results, Stat
from tunnel.lab.probes import CLK_TCK


TLS_FLAG = 50.0  # an OpenConnect figure with less of its bytes on DTLS (%) is flagged


@dataclass
class Report:
    meta: dict[str, str]
    results: Results
    plan: Plan

    def single(self, setup: str, key: str) -> Optional[float]:
        return self.results.median("single", setup, key)

    def ratio(self, key: str, num: str, den: str) -> Optional[float]:
        a, b = self.single(num, key), self.single(den, key)
        return a / b if a is not None and b else None

    def added_rtt(self, setup: str) -> Optional[float]:
        """Median p50 RTT of ``setup`` minus that of the raw link, in ms."""
        a, b = self.single(setup, "rtt_p50_ms"), self.single("raw", "rtt_p50_ms")
        return a - b if a is not None and b is not None else None

    def dtls_share(self, setup: str, metric: Metric) -> Optional[float]:
        return self.single(setup, f"dtls_share_{metric.test}") if metric.test else None

    def mostly_tls(self, setup: str, metric: Metric) -> bool:
        share = self.dtls_share(setup, metric)
        return share is not None and share < TLS_FLAG

    def best_peer(self, metric: Metric) -> Optional[tuple[str, float]]:
        """The best peer's (name, median) for ``metric``; figures mostly carried by TLS don't count."""
        figures = [(p, v) for p in PEERS
                   if (v := self.single(p, metric.key)) is not None and not self.mostly_tls(p, metric)]
        if not figures:
            return None
        pick = max if metric.higher_is_better else min
        return pick(figures, key=lambda pv: pv[1])


@dataclass(frozen=True)
class Target:
    text: str
    value: str
    met: Optional[bool]  # None: not measurable with the setups that ran
    info: bool = False  # a figure shown for reference, not a target


def _fmt_ratio(r: Optional[float]) -> str:
    return f"{r:.2f}x" if r is not None else "-"


def _at_least(report: Report, key: str, factor: float, text: str) -> Target:
    r = report.ratio(key, "mptun", "openvpn")
    return Target(text, _fmt_ratio(r), None if r is None else r >= factor)


def foundation_targets(report: Report) -> list[Target]:
    """The performance targets of the foundation issue, checked against this report."""
    mp, ov, mw = report.added_rtt("mptun"), report.added_rtt("openvpn"), report.added_rtt("mptun-nowarm")
    cpu = [report.single("mptun", k) for k in ("cpu_client_us", "cpu_server_us")]
    cpu_known = all(c is not None for c in cpu)
    return [
        _at_least(report, "tcp_mbps", 0.8, "single-path TCP >= 0.8x OpenVPN"),
        _at_least(report, "udp_small_pps", 0.75, f"small-packet ({SMALL} B) UDP packets/s >= 0.75x OpenVPN"),
        Target("added RTT p50 <= OpenVPN's",
               f"mptun +{mp:.3f} ms vs OpenVPN +{ov:.3f} ms" if mp is not None and ov is not None else "-",
               None if mp is None or ov is None else mp <= ov),
        Target("(for reference: the same with `keep_warm = false`)",
               f"mptun +{mw:.3f} ms; CPU during the echo, both ends: {_pct(report, 'mptun-nowarm')}, with"
               f" keep_warm {_pct(report, 'mptun')}, OpenVPN {_pct(report, 'openvpn')}"
               if mw is not None else "-", None, info=True),
        Target("CPU <= 10 µs per packet per side",
               f"client {cpu[0]:.1f} µs, server {cpu[1]:.1f} µs" if cpu_known else "-",
               max(cpu) <= 10.0 if cpu_known else None),  # type: ignore[type-var]
    ]


def _pct(report: Report, setup: str) -> str:
    v = report.single(setup, "echo_cpu_pct")
    return "-" if v is None else f"{v:.1f} % of a core"


def _single_cell(report: Report, setup: str, metric: Metric) -> str:
    stat = report.results.stat("single", setup, metric.key)
    if stat is None or (metric.tunnel_only and setup == "raw"):
        return "-"
    text = stat.fmt(metric.fmt)
    if stat.n < report.plan.runs:
        text += f" [{stat.n} of {report.plan.runs} runs]"
    share = report.dtls_share(setup, metric)
    if share is None:
        return text
    if share < TLS_FLAG:
        return f"**{text} ⚠ DTLS {share:.0f} %: mostly TLS**"
    return f"{text} · DTLS {share:.0f} %" if metric.show_share else text


def figures_table(report: Report) -> list[str]:
    setups = [s for s in SETUP_NAMES if s in report.results.tables.get("single", {})]
    rows = ["| figure | " + " | ".join(setups) + " | mptun / best peer | mptun / openvpn | mptun / raw |",
            "|---|" + "--:|" * (len(setups) + 3)]
    for m in METRICS:
        cells = [_single_cell(report, s, m) for s in setups]
        best = report.best_peer(m) if m.ratio else None
        mp = report.single("mptun", m.key)
        vs_best = f"{mp / best[1]:.2f}x ({best[0]})" if best and mp is not None and best[1] else "-"
        vs_ovpn = _fmt_ratio(report.ratio(m.key, "mptun", "openvpn")) if m.ratio else "-"
        vs_raw = _fmt_ratio(report.ratio(m.key, "mptun", "raw")) if m.ratio and not m.tunnel_only else "-"
        rows.append(f"| {m.label} ({m.unit}) | " + " | ".join(cells) + f" | {vs_best} | {vs_ovpn} | {vs_raw} |")
    added = [report.added_rtt(s) for s in setups]
    rows.append("| added RTT p50 vs raw (ms) | "
                + " | ".join(f"{a:+.3f}" if a is not None else "-" for a in added) + " | - | - | - |")
    return rows


def targets_table(report: Report, targets: Optional[list[Target]] = None) -> list[str]:
    """``targets`` (default: the foundation targets) as a table with their verdicts."""
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    rows = ["| target | measured | |", "|---|---|---|"]
    rows += [f"| {t.text} | {t.value} | {'-' if t.info else verdict[t.met]} |"
             for t in (foundation_targets(report) if targets is None else targets)]
    return rows


def _text(markdown: str) -> list[str]:
    """The lines of a block of Markdown prose written as one string (a newline after its
    opening quotes and before its closing ones, both left out)."""
    return markdown.strip("\n").split("\n")


def _notes(report: Report, section: str) -> list[str]:
    notes = report.results.notes.get(section, [])
    return ["", "Notes:", "", *[f"- {n}" for n in notes]] if notes else []


def _not_run(report: Report, section: str) -> list[str]:
    return [] if section in report.results.ran else ["", "*Not run by this invocation (`--sections`).*"]


def section_header(report: Report) -> list[str]:
    m = report.meta
    return _text(f"""
# mptun benchmarks

Written by `scripts/bench`; do not edit by hand, run it again.  The machine is
shared and noisy, so read the **ratios**: every figure is the median of the runs
(min–max in brackets), and the setups are measured interleaved, round by round.
A full default run takes about 22 minutes (this one: {m['elapsed']}); `scripts/bench
--quick` (one run, shorter tests) takes about 2 and prints instead of writing this file.

| | |
|---|---|
| date | {m['date']} |
| kernel | {m['kernel']} |
| CPU | {m['cpu']} |
| Python | {m['python']} |
| mptun commit | {m['commit']} |
| OpenVPN | {m['openvpn']} |
| WireGuard | {m['wireguard']} |
| OpenConnect | {m['openconnect']} |
| MPTCP | {m['mptcp']} |
| iperf3 | {m['iperf3']} |
| command | `{m['command']}` |
| runs | {m['runs']} per figure; iperf3 tests {m['duration']} s, echo {m['echo_duration']} s |
""")


def section_single_path(report: Report) -> list[str]:
    ciphers = report.results.ciphers
    lines = [
        *_text(f"""
## Single path

The impairment lab's topology (`tunnel/lab/topology.py`) with one path and no
impairment: client `cli` -> router `rtr` (forwarding) -> server `srv`, veth links,
MTU 1500.  `raw` is the routed link itself (to the server's underlay address
198.18.250.2); the tunnels carry traffic from the client to the server's tunnel address.
OpenConnect's cells give the share of its bytes its DTLS channel carried (the rest went
over its TLS channel); under {TLS_FLAG:.0f} % the figure is flagged and not used as "best peer".
"""),
        "Data ciphers: " + (", ".join(f"{s} {c}" for s, c in ciphers.items() if s in SETUP_NAMES) or "-")
        + ".",
        *_not_run(report, "single"),
    ]
    if "single" in report.results.ran:
        lines += ["", *figures_table(report), "", "### Targets (foundation issue)", "",
                  *targets_table(report)]
    return lines + _notes(report, "single")


def _row(label: str, *cells: str) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def _cell(report: Report, section: str, row: str, key: str, spec: str) -> str:
    stat = report.results.stat(section, row, key)
    return stat.fmt(spec) if stat else "-"


def section_loss(report: Report) -> list[str]:
    p = report.plan
    lines = [
        *_text(f"""
## Multipath: residual loss in duplicate mode

Two paths, each dropping a share p of the packets at random in both directions
(nftables in the router, independently per path); mptun in `duplicate` mode; a stream
of {p.loss_count:,} datagrams of {p.loss_size} B at {p.loss_pps:g}/s from client to server through the
tunnel.  With independent losses a datagram is lost only if both copies are, so the
expected residual loss is p1·p2.  "path loss seen" checks the lab: the upstream loss of
each path from mptun's own counters (records the client sent on it, probes included,
against records the server received on it), averaged over the two paths.
"paths down" is the share of time mptun's client
had a path declared down (sampled every 100 ms during the stream): a down path carries
copies all the same in `duplicate` mode (a path judged down by lost probes may still deliver),
so the stream keeps the benefit of both paths.
"""),
        *_not_run(report, "loss"),
    ]
    table = report.results.tables.get("loss", {})
    if table:
        lines += ["", "| p1 = p2 | path loss seen (%) | receiver: lost | receiver: loss (%) |"
                  " expected: p1·p2 (%) | expected lost | measured / expected | paths down (% of time) |",
                  "|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for row in table:
            lost, expected = (report.results.median("loss", row, k) for k in ("lost", "expected_lost"))
            ratio = f"{lost / expected:.1f}x" if lost is not None and expected else "-"
            lines.append(_row(f"{float(row):.0%}", _cell(report, "loss", row, "path_loss_pct", "{:.1f}"),
                              _cell(report, "loss", row, "lost", "{:.0f}"),
                              _cell(report, "loss", row, "loss_pct", "{:.2f}"),
                              _cell(report, "loss", row, "expected_pct", "{:.2f}"),
                              _cell(report, "loss", row, "expected_lost", "{:.1f}"), ratio,
                              _cell(report, "loss", row, "down_pct", "{:.1f}")))
    return lines + _notes(report, "loss")


def section_failover(report: Report) -> list[str]:
    p = report.plan
    interval = 1e3 / p.failover_pps
    lines = [
        *_text(f"""
## Multipath: failover gap per mode

Two paths, no impairment; a stream of {p.failover_pps:g} datagrams/s ({p.failover_count} in all) through
mptun; {p.failover_cut_s:g} s into it the path that carried most of the stream over the 250 ms
before (read from the client's per-path counters) is blackholed in both directions at the
router.
"longest gap" is the longest time between two consecutive arrivals ({interval:g} ms = no
interruption); "lost" counts datagrams that never arrived, "reordered" those that arrived
after a later one.  mptun probes every path every
100 ms and declares it dead after 300 ms of silence (the defaults).  `interfaces` lists
path 0 first, so it is `backup`'s primary.  With two paths `redundant`
(redundancy 2) sends on both, like `duplicate`.  `balance` spreads the stream over both
paths, so the cut loses the datagrams it keeps scheduling on the dead path until that
path is declared dead, while the other path keeps delivering: losses without a long gap.
"""),
        *_not_run(report, "failover"),
    ]
    table = report.results.tables.get("failover", {})
    if table:
        lines += ["", "| mode | longest gap (ms) | lost (datagrams) | reordered (datagrams) | path cut, per run |",
                  "|---|--:|--:|--:|---|"]
        for mode in table:
            if mode == ROLLING_ROW:
                continue
            cuts = ", ".join(f"{c:.0f}" for c in table[mode].get("cut_path", []))
            lines.append(_row(f"`{mode}`", _cell(report, "failover", mode, "gap_ms", "{:.0f}"),
                              _cell(report, "failover", mode, "lost", "{:.0f}"),
                              _cell(report, "failover", mode, "reordered", "{:.0f}"), cuts))
    first, total = ROLLING_FIRST, ROLLING_SECONDS
    lines += [
        "",
        f"Rolling outage (two modems through coverage holes), `duplicate` mode: an EF stream of {ROLLING_PPS:g}",
        f"datagrams/s for {total:g} s; path 0 silent (both ways, in the delay line) from {first[0]:g} s to {first[1]:g} s,",
        f"longer than the 3 s timeout, and from {first[1]:g} s path 1 silent instead, to the end.  The returning",
        "path's session was kept through its outage, so it carries the stream the moment it works.",
        f"\"held\" leaves out the sender's pauses and the daemons' stalls (the OS not running them).",
    ]
    if ROLLING_ROW in table:
        lines += ["", "| case | longest gap (ms) | held gap (ms) | lost (datagrams) | sent |", "|---|--:|--:|--:|--:|",
                  _row(ROLLING_ROW, _cell(report, "failover", ROLLING_ROW, "gap_ms", "{:.0f}"),
                       _cell(report, "failover", ROLLING_ROW, "held_gap_ms", "{:.0f}"),
                       _cell(report, "failover", ROLLING_ROW, "lost", "{:.0f}"),
                       _cell(report, "failover", ROLLING_ROW, "sent", "{:.0f}"))]
    return lines + _notes(report, "failover")


def section_aggregation(report: Report) -> list[str]:
    p = report.plan
    total = 2 * p.link_mbit
    lines = [
        *_text(f"""
## Multipath: aggregation in balance mode

Two paths, each rate-limited to {p.link_mbit:g} Mbit/s in both directions at the router (tbf,
50 ms of queue); one iperf3 TCP flow client -> server for {p.duration:g} s: over one raw link
(path 0, no tunnel), with Linux MPTCP over both raw links (`mptcpize run iperf3`, one
subflow endpoint per path), and through mptun in `balance` mode.  All three in the same lab,
one after the other, in every run.
"""),
        *_not_run(report, "aggregation"),
    ]
    results = report.results
    table = results.tables.get("aggregation", {})
    if table:
        raw = results.median("aggregation", "raw", "mbps")
        lines += ["", f"| | Mbit/s | / sum of the links ({total:g}) | / one raw link |", "|---|--:|--:|--:|",
                  _row("sum of the link rates", f"{total:g}", "1.00x", _fmt_ratio(total / raw) if raw else "-")]
        labels = {"raw": "one raw link (path 0)", "mptcp": "Linux MPTCP, 2 subflows", "mptun": "mptun `balance`"}
        for row in ("raw", "mptcp", "mptun"):
            if row not in table:
                continue
            value = results.median("aggregation", row, "mbps")
            lines.append(_row(labels[row], _cell(report, "aggregation", row, "mbps", "{:.1f}"),
                              _fmt_ratio(value / total if value is not None else None),
                              _fmt_ratio(value / raw if value is not None and raw else None)))
        extra = []
        joined = results.stat("aggregation", "mptcp", "joined")
        if joined:
            extra.append(f"MPTCP: the client saw {joined.fmt('{:.0f}')} extra subflows join per run"
                         " (iperf3's control and data connections each get one per extra path).")
        share = results.stat("aggregation", "mptun", "busiest_share")
        if share:
            extra.append(f"mptun: the busier path carried {share.fmt('{:.0f}')} % of the tunnel's bytes"
                         " (50 % = evenly spread).")
        if extra:
            lines += ["", *extra]
    return lines + _notes(report, "aggregation")


UNEQUAL_VS_BEST, UNEQUAL_VS_MPTCP, EQUAL_VS_SUM = 1.0, 0.9, 0.95  # issue 18's targets for balance


def _ratio_of(report: Report, section: str, num: str, den: str) -> Optional[float]:
    a, b = (report.results.median(section, row, "mbps") for row in (num, den))
    return a / b if a is not None and b else None


def unequal_targets(report: Report) -> list[Target]:
    """Issue 18's targets for `balance`: per profile >= the best single path and >= 0.9x Linux
    MPTCP; on equal clean paths (the aggregation section's) >= 0.95x the sum of the link rates."""
    targets = []
    for factor, den, text in ((UNEQUAL_VS_BEST, "single", "balance >= best single path"),
                              (UNEQUAL_VS_MPTCP, "mptcp", f"balance >= {UNEQUAL_VS_MPTCP:g}x Linux MPTCP")):
        for p in PROFILES:
            r = _ratio_of(report, "unequal", f"{p.name}|balance", f"{p.name}|{den}")
            targets.append(Target(f"{text}: {p.name}", _fmt_ratio(r), None if r is None else r >= factor))
    total = 2 * report.plan.link_mbit
    mbps = report.results.median("aggregation", "mptun", "mbps")
    r = mbps / total if mbps is not None else None
    targets.append(Target(f"equal clean paths (aggregation section, 2 x {report.plan.link_mbit:g} Mbit/s): balance"
                          f" >= {EQUAL_VS_SUM:g}x the sum of the link rates", _fmt_ratio(r),
                          None if r is None else r >= EQUAL_VS_SUM))
    return targets


def _unequal_row(report: Report, profile: Profile) -> str:
    results, name = report.results, profile.name

    def cell(row: str, key: str = "mbps", spec: str = "{:.1f}") -> str:
        return _cell(report, "unequal", f"{name}|{row}", key, spec)
    paths = {int(k) for k in results.tables.get("unequal", {}).get(f"{name}|single", {}).get("best_path", [])}
    best = cell("single") + (f" (path {paths.pop()})" if len(paths) == 1 else " (path 0 or 1)" if paths else "")
    try:
        total = f"{sum(profile.capacities()):.1f}"
    except (ImportError, ValueError):  # a trace that cannot be read here
        total = "-"
    return _row(name, total, best, cell("mptcp"), *(cell(m) for m in UNEQUAL_MODES),
                _fmt_ratio(_ratio_of(report, "unequal", f"{name}|balance", f"{name}|single")),
                _fmt_ratio(_ratio_of(report, "unequal", f"{name}|balance", f"{name}|mptcp")),
                cell("udp", "offered_mbps"), cell("udp", "loss_pct"),
                cell("udp", "p50_ms", "{:.0f}") + " / " + cell("udp", "p99_ms", "{:.0f}"))


def section_unequal(report: Report) -> list[str]:
    p = report.plan
    d = p.unequal_duration
    lines = [
        *_text(f"""
## Multipath: aggregation on unequal paths

Two paths that differ in rate, delay, random or burst loss, or that follow recorded cellular
traces; one profile per row, listed below (each path the same in both directions, but for
the traces, which have one file per direction).  Per profile and run, in a fresh lab, one
after the other: one iperf3 TCP flow client -> server for {d:g} s over each raw path alone
(iperf3 bound to that path's address; "best single path" is the better of the two in each
run), with Linux MPTCP over both raw paths (`mptcpize run iperf3`, one subflow endpoint per
path), and through mptun in `balance` and in `lowest-rtt` mode; then, through `balance`, a
UDP stream of {UNEQUAL_UDP_SIZE} B datagrams for {d / 2:g} s at {UDP_FACTOR:g}x the faster path's capacity
(payload bits: more than one path can carry, less than both): its loss and one-way latency.
Every TCP flow uses {UNEQUAL_CC.upper()} (`iperf3 -C {UNEQUAL_CC}`), the congestion control of Windows, macOS, iOS
and Android.  The MPTCP and `balance` flows are run once more with {UNEQUAL_ALSO.upper()} (this lab host's
default; second table): BBR keeps at most twice bandwidth x *lowest* RTT in flight, so a
single BBR flow cannot fill a path whose RTT is many times its fastest path's through a bond
that keeps it one flow, while MPTCP runs one BBR per subflow.
Fixed rates are tbf at the router (50 ms of queue); delays, burst loss and the traces are the
lab's delay line (a trace with the lab's default drop-tail queue, tunnel/lab/linktrace.py); random loss
is nftables.  The delay line's schedule starts anew before each flow, so on the traced profile
every row sees the same stretch of the traces.  One round of the section takes about
{len(PROFILES) * (5.5 * d + 7) / 60:.0f} min (per profile: five TCP flows, the stream, about 7 s of set-up).

Targets (issue 18): `balance` gets at least the best single path in every profile, and at
least {UNEQUAL_VS_MPTCP:g}x what Linux MPTCP gets on the same paths; on equal clean paths at least
{EQUAL_VS_SUM:g}x the sum of the link rates (the aggregation section's profile, above).
"""),
        "",
        *[f"- **{prof.name}**: {prof.describe() if not prof.unavailable() else prof.unavailable()}"
          for prof in PROFILES],
        *_not_run(report, "unequal"),
    ]
    table = report.results.tables.get("unequal", {})
    if table:
        lines += ["", "| profile | sum of the path rates (Mbit/s) | best single path (Mbit/s) | Linux MPTCP |"
                      " mptun `balance` | mptun `lowest-rtt` | balance / best single | balance / MPTCP |"
                      f" UDP at {UDP_FACTOR:g}x: offered (Mbit/s) | UDP loss (%) | UDP latency p50 / p99 (ms) |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for prof in PROFILES:
            if any(row.startswith(prof.name + "|") for row in table):
                lines.append(_unequal_row(report, prof))
            else:
                why = prof.unavailable() or "no figures (see the notes)"
                lines.append(_row(prof.name, f"not run: {why}", *["-"] * 9))
        if any(row.endswith(f"|balance {UNEQUAL_ALSO}") for row in table):
            lines += ["", f"With {UNEQUAL_ALSO.upper()} as the inner congestion control (same paths, same run):", "",
                      f"| profile | Linux MPTCP, {UNEQUAL_ALSO} | mptun `balance`, {UNEQUAL_ALSO} | balance / MPTCP |",
                      "|---|--:|--:|--:|"]
            for prof in PROFILES:
                m, b = f"{prof.name}|mptcp {UNEQUAL_ALSO}", f"{prof.name}|balance {UNEQUAL_ALSO}"
                if b in table:
                    lines.append(_row(prof.name, _cell(report, "unequal", m, "mbps", "{:.1f}"),
                                      _cell(report, "unequal", b, "mbps", "{:.1f}"),
                                      _fmt_ratio(_ratio_of(report, "unequal", b, m))))
        joins = {prof.name: table.get(f"{prof.name}|mptcp", {}).get("joined", []) for prof in PROFILES}
        every = [int(v) for values in joins.values() for v in values]
        if every:
            lo, hi = min(every), max(every)
            alone = [name for name, values in joins.items() if 0 in values]
            lines += ["", f"MPTCP: the client saw {lo if lo == hi else f'{lo} to {hi}'} extra subflows join per run"
                          " (iperf3's control and data connections each get one per extra path)"
                          + (f"; none in a run of {', '.join(alone)}: MPTCP fell back to one path there."
                             if alone else ".")]
        lines += ["", "### Targets (issue 18)", "", *targets_table(report, unequal_targets(report))]
    return lines + _notes(report, "unequal")


def section_reorder(report: Report) -> list[str]:
    p = report.plan
    d0, d1 = REORDER_DELAYS_MS
    lines = [
        *_text(f"""
## Multipath: receiver-side reordering in balance mode

Two paths, each rate-limited to {p.link_mbit:g} Mbit/s, with {d0} ms and {d1} ms of one-way delay
(the lab's delay line, both directions), so balance mode's packets arrive out of order.
mptun `balance` with `reorder = false` and with `reorder = true` (balance's default; the hold
follows the paths' predicted delay spread, `reorder_ms = {REORDER_HOLD_MS}` only until the paths have
models; policy file on the client): one iperf3 TCP flow client -> server for {p.duration:g} s, then a UDP stream of
{p.loss_count // 2} datagrams of {p.loss_size} B at {p.loss_pps:g}/s (share arriving out of order, and its
one-way latency).  `raw` is TCP over path 0 alone (no tunnel), in the same lab and run.
"""),
        *_not_run(report, "reorder"),
    ]
    results = report.results
    table = results.tables.get("reorder", {})
    if table:
        raw = results.median("reorder", "raw", "mbps")
        lines += ["", "| | TCP Mbit/s | / raw path 0 | UDP out of order (%) | UDP latency p50 / p99 (ms) | "
                      "held and released / hold timeouts |", "|---|--:|--:|--:|--:|--:|"]
        for row in ("raw", "balance", "balance+reorder"):
            if row not in table:
                continue
            value = results.median("reorder", row, "mbps")
            if row == "raw":
                lines.append(_row("raw path 0", _cell(report, "reorder", row, "mbps", "{:.1f}"), "1.00x",
                                  "-", "-", "-"))
                continue
            lines.append(_row(
                f"mptun `{row}`", _cell(report, "reorder", row, "mbps", "{:.1f}"),
                _fmt_ratio(value / raw if value is not None and raw else None),
                _cell(report, "reorder", row, "reordered_pct", "{:.1f}"),
                _cell(report, "reorder", row, "p50_ms", "{:.1f}") + " / "
                + _cell(report, "reorder", row, "p99_ms", "{:.1f}"),
                _cell(report, "reorder", row, "released", "{:.0f}") + " / "
                + _cell(report, "reorder", row, "timeouts", "{:.0f}")))
    return lines + _notes(report, "reorder")


def section_cpu(report: Report) -> list[str]:
    p = report.plan
    lines = [
        *_text(f"""
## Multipath: CPU cost of duplicate mode

iperf3 UDP at {p.cpu_pps:,} datagrams/s of {p.cpu_size} B ({p.cpu_pps * p.cpu_size * 8 / 1000000.0:.0f} Mbit/s) client ->
server through mptun for {p.duration:g} s, no impairment: once with one path (`interfaces` = path
0), once in `duplicate` mode over two paths.  CPU per packet as in the single-path
section: each side's CPU time over the packets its TUN device handled, so on the
server side of `duplicate` it includes receiving, decrypting and dropping the second copy.
At this moderate rate each wake-up of the event loop handles few packets, so the cost per
packet is well above the single-path section's flood figure, where batching spreads the
cost of a wake-up over many packets.
"""),
        *_not_run(report, "cpu"),
    ]
    results = report.results
    table = results.tables.get("cpu", {})
    if table:
        lines += ["", "| | client (µs/packet) | server (µs/packet) | delivered (packets/s) | loss (%) |",
                  "|---|--:|--:|--:|--:|"]
        for row in table:
            lines.append(_row(row, *(_cell(report, "cpu", row, k, spec) for k, spec in (
                ("cpu_client_us", "{:.1f}"), ("cpu_server_us", "{:.1f}"), ("pps", "{:,.0f}"), ("loss", "{:.1f}")))))
        one, two = "1 path", "duplicate, 2 paths"
        if one in table and two in table:
            ratios = [results.median("cpu", two, k) / results.median("cpu", one, k)  # type: ignore[operator]
                      for k in ("cpu_client_us", "cpu_server_us")]
            lines.append(_row("duplicate / 1 path", *(f"{r:.2f}x" for r in ratios), "-", "-"))
    return lines + _notes(report, "cpu")


def section_server(report: Report) -> list[str]:
    lines = [
        *_text("""
## Server: memory per tunnel

A real `mptun server` in a lab namespace; one simulator process runs N in-memory client
cores (real DTLS handshakes over loopback, one certificate and client name each, one path
per tunnel) and keeps them up with their probes; the server's RSS (/proc) is read after
each step.  Per tunnel = (RSS - RSS with no tunnel) / N.
"""),
        *_not_run(report, "server"),
    ]
    table = report.results.tables.get("server", {})
    if table:
        lines += ["", "| | server RSS (MiB) | RSS with no tunnel (MiB) | per tunnel (KiB) |", "|---|--:|--:|--:|"]
        for row in table:
            lines.append(_row(row, *(_cell(report, "server", row, k, spec) for k, spec in (
                ("rss_mib", "{:.1f}"), ("base_mib", "{:.1f}"), ("kib_per_tunnel", "{:.0f}")))))
    return lines + _notes(report, "server")


def section_hostile(report: Report) -> list[str]:
    lines = [
        *_text("""
## Server: a new client under a flood of silent half-open handshakes

An attacker namespace answers the server's cookie from one address in each of N /24s, takes
the server's first flight (a key exchange and a signature spent on it) and goes silent, holding
a half-open slot (`max_handshakes` = 256).  Once the flood has filled what it can, a real
client starts; the time from its first ClientHello to its tunnel being up, from its log
(tunnel/lab/starve.py).  Before issue 16 a full table refused every new handshake until its
oldest slots timed out (10 s): 260 hellos from 13 addresses blocked a client for 10 s, and in
this lab the old code (99c2b91) gave the client its tunnel after 7.0 s under 80/s from 16
addresses (one run; the client's ClientHello retransmission happened to meet a slot that had
just expired).  No peer is run here: the figure is against the same client with no flood.
"""),
        *_not_run(report, "hostile"),
    ]
    table = report.results.tables.get("hostile", {})
    if table:
        lines += ["", "| flood | time to tunnel (ms) | flood achieved (/s) | half-open when the client started "
                  "| client handshakes | evicted | refused |", "|---|--:|--:|--:|--:|--:|--:|"]
        for row in table:
            lines.append(_row(row, *(_cell(report, "hostile", row, k, spec) for k, spec in (
                ("ms", "{:.0f}"), ("achieved", "{:.0f}"), ("half_open", "{:.0f}"), ("attempts", "{:.0f}"),
                ("evicted", "{:.0f}"), ("refused", "{:.0f}")))))
    return lines + _notes(report, "hostile")


def section_fleet(report: Report) -> list[str]:
    lines = [
        *_text(f"""
## Server: aggregate packets/s with 20 clients

A server namespace and 20 client namespaces, each joined to the server by its own veth link
and running a real `mptun client` with that one path.  All 20 at once flood
`iperf3 -u -b 0 -l {SMALL}` through their tunnels to the server's inner address for
{report.plan.duration:g} s (one iperf3 receiver per client in the server namespace); then, in
the same lab, the same 20 namespaces flood the server's underlay addresses with no tunnel.
Aggregate = sum of the receivers' (packets - lost) / seconds.  Server CPU per packet: CPU time
of the `mptun server` process over the packets it wrote into its TUN.  Everything (20 client
processes, the server, 40 iperf3) shares the machine's cores, so the clients compete with
the server for CPU.  Loss = offered minus received: under a flood, whatever is slowest drops.
"""),
        *_not_run(report, "fleet"),
    ]
    row = "20 clients"
    if report.results.tables.get("fleet", {}).get(row):
        lines += ["", "| | through mptun (packets/s) | raw underlay (packets/s) | mptun / raw |"
                      " server CPU (µs/packet) | slowest client (packets/s) | loss mptun / raw (%) |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        loss = f"{_cell(report, 'fleet', row, 'tunnel_loss', '{:.0f}')} / {_cell(report, 'fleet', row, 'raw_loss', '{:.0f}')}"
        lines.append(_row(row, *(_cell(report, "fleet", row, k, spec) for k, spec in (
            ("tunnel_pps", "{:,.0f}"), ("raw_pps", "{:,.0f}"), ("ratio", "{:.2f}x"), ("server_cpu_us", "{:.1f}"),
            ("per_client_min_pps", "{:,.0f}"))), loss))
        pps, us = (report.results.median("fleet", row, k) for k in ("tunnel_pps", "server_cpu_us"))
        if pps and us:
            lines += ["", f"The server process was busy {pps * us / 1e4:.0f} % of one core at the median rate"
                          " (packets/s x CPU per packet)."]
    return lines + _notes(report, "fleet")


def section_marking(report: Report) -> list[str]:
    lines = [
        *_text("""
## DSCP/ECN: cost of per-packet marking and of classification

In one process, one core: 200-byte datagrams on a connected loopback UDP socket with plain
`send` and with `sendmsg` carrying an IP_TOS control message (how mptun marks each outer
datagram; runs of equal marks share one GSO `sendmsg`, and a mark of 0 needs no control
message); and `Policy.classify` + `outer_tos` over a mix of four packet kinds without a
policy file and with `policies/webrtc.toml`, and over unmarked RTP on ports the OS gave (the
policy's payload match finds it: docs/POLICY.md).
"""),
        *_not_run(report, "marking"),
    ]
    results = report.results
    if results.tables.get("marking"):
        keys = (("send", "plain send"), ("sendmsg_tos", "sendmsg + IP_TOS"),
                ("classify_none", "classify, no policy"), ("classify_webrtc", "classify, webrtc policy"),
                ("classify_webrtc_rtp", "classify, webrtc policy, unmarked RTP"))
        lines += ["", "| | packets/s | µs/packet | / plain send |", "|---|--:|--:|--:|"]
        base = results.median("marking", "packets/s", "send")
        for key, label in keys:
            med = results.median("marking", "packets/s", key)
            cell = _cell(report, "marking", "packets/s", key, "{:,.0f}")
            ratio = f"{med / base:.2f}x" if base and key.startswith("send") else "-"
            lines.append(_row(label, cell, f"{1e6 / med:.2f}" if med else "-", ratio))
    return lines + _notes(report, "marking")


def section_method(report: Report) -> list[str]:
    return [
        *_text(f"""
## Method

- Lab: `MultipathTopology` (client, router, server namespaces; path i = 198.18.i.0/30,
  server 198.18.250.2), `Impairments` for loss, rate limits and blackholes (nftables and
  tbf in the router).  The user-space delay line (delay, burst loss, outages, cellular
  traces) is used only where a section says so (rolling outage, unequal paths,
  reordering); the single-path figures have no delay-line overhead.
  A fresh lab per setup and run (single path) or per run (multipath).
- TCP: `iperf3 -t D` client -> server, bits/s as received.
- UDP: `iperf3 -u -b 0 -l {SMALL}` and `-l {LARGE}` (unlimited rate), received packets/s =
  (packets - lost) / seconds from the receiver's report; loss is mostly the TUN queue
  or the socket buffer in front of whichever process is the bottleneck.
- CPU per packet: utime + stime (/proc/PID/stat, {CLK_TCK} Hz ticks) of each side's tunnel
  processes during the UDP {SMALL} B test, divided by the packets that side handled: the
  client TUN's tx_packets (read by the client) and the server TUN's rx_packets (written
  by the server).  iperf3 shares the same two cores.  A TUN write runs the kernel's
  receive path for the inner packet in the writer's context, so the server side includes
  delivering it to the receiving socket.  ocserv counts its main process, sec-mod and the
  client's worker; wireguard-go is one process with several threads (all counted).
- RTT: a Python UDP echo, {ECHO_SIZE}-byte datagrams at {ECHO_RATE:g}/s with sequence number
  and `perf_counter` timestamp; p50/p99 by nearest rank; lost = not echoed within
"""),
        f"  {ECHO_GRACE:g} s after the last send.  \"CPU during the echo\": utime + stime of both ends'",
        *_text("""
  tunnel processes over the echo, in % of one core.
- Streams (multipath sections): `tunnel/lab/stream.py`, numbered datagrams on an absolute
  schedule, every arrival recorded by the receiver (loss, longest gap between arrivals).
- OpenVPN: UDP, `dev tun`, `cipher`/`data-ciphers AES-256-GCM`, TLS with the same ECDSA
  P-256 certificates as mptun, `dh none`, `disable-dco` (user space like mptun),
  `topology subnet` in 100.65.0.0/24, `--verb 1`, defaults otherwise
  (tun-mtu 1500, mssfix 1492).
- WireGuard: `wireguard-go -f` (user space; `WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1`,
  since this kernel has the module), keys from `wg genkey`, `wg set`, 100.67.0.0/24,
  MTU 1420, defaults otherwise.
- OpenConnect: `ocserv -f` with certificate authentication (CN as user name, same PKI as
  mptun), `dtls-legacy = true`, 100.66.0.0/24, otherwise close to Debian's example
  configuration; `openconnect --non-inter` with `--certificate`/`--sslkey`, the server key
  pinned with `--servercert pin-sha256:...`, and a `--script` that only sets the TUN
  address and route.  DTLS share: nftables counters in the server namespace on ocserv's
  UDP (DTLS) and TCP (TLS) port, both directions, reset before each test.
- MPTCP: `net.mptcp.enabled=1` and `ip mptcp limits set subflow 2 add_addr_accepted 2` on
  both ends, `ip mptcp endpoint add <path addr> dev <path if> subflow` per client path,
  iperf3 client and server under `mptcpize run`; joins checked in /proc/net/netstat.
- mptun: `mptun server`/`mptun client` via TunnelStack, `log_level = "info"`,
  defaults otherwise (mode and `interfaces` as stated per section).
- mptun-nowarm: the same with `keep_warm = false` on both ends (by default, tunnel/core/warm.py runs
  a dummy pass over the packet path 1.5 ms before the next packet of a periodic flow is due).
"""),
    ]


def section_webrtc(report: Report) -> list[str]:
    p = report.plan
    lines = [
        *_text(f"""
## WebRTC: a real call (aiortc) with and without mptun

`tunnel/lab/webrtc.py`, see docs/WEBRTC.md: an unmodified aiortc peer in the client namespace calls one
in a namespace behind the server (host candidates only) for {p.webrtc_seconds:g} s, sending Opus audio (50 packets/s) and
VP8 video (30 frames/s, full-size packets) both ways.  Rows: the same call over path 0 directly (no
tunnel; the router gets a route to the far peer), and through mptun: `duplicate` with
`policies/webrtc.toml` (the call, on the ports the OS gives and unmarked, is in its media-unmarked class: RTP recognised by its payload), `balance` and `lowest-rtt` without a
policy.  *loss*: 10 % random loss on both paths, both directions, at the router.  *blackhole*:
halfway through, the path carrying the call (path 0 for the raw link; for mptun the one with more
client tx packets in the 300 ms before) drops everything for {WEBRTC_OUTAGE_S:g} s.
Cells are up (client -> far) / down; audio loss is getStats packetsLost / (received + lost);
wire loss is the same count from an AF_PACKET capture at the receiver (video: before NACK/RTX);
jitter is getStats' (RFC 3550) over the clock rate; the longest gap is between audio RTP
arrivals (kernel timestamps), less any pause of the sender itself; the video pause is the
longest time between two frames the receiving app decoded (WebRTC counts a freeze above
max(3 x frame interval, interval + 150 ms), about 183 ms here).  The last column is the longest
time the OS did not run an mptun process during the call (tunnel/io/loop.py: a stall; the gaps
include it, the packets waited).
"""),
        *_not_run(report, "webrtc"),
    ]
    table = report.results.tables.get("webrtc", {})

    def pair(row: str, key: str, spec: str) -> str:
        return (_cell(report, "webrtc", row, f"{key}_up", spec) + " / "
                + _cell(report, "webrtc", row, f"{key}_down", spec))
    for scenario in ("loss", "blackhole"):
        rows = [r for r in table if r.startswith(scenario + "|")]
        if not rows:
            continue
        lines += ["", f"**{scenario}**", "",
                  "| | audio loss % | audio wire loss % | video wire loss % | audio jitter (ms) |"
                  " longest audio gap (ms) | longest video pause (ms) | video frames decoded % | mptun stall (ms) |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for row in rows:
            name = row.split("|", 1)[1]
            label = "raw link" if name == "raw" else f"mptun `{name}`"
            lines.append(_row(label, pair(row, "audio_loss", "{:.1f}"), pair(row, "audio_wire_loss", "{:.1f}"),
                              pair(row, "video_wire_loss", "{:.1f}"), pair(row, "jitter", "{:.1f}"),
                              pair(row, "gap", "{:.0f}"), pair(row, "pause", "{:.0f}"),
                              pair(row, "frames", "{:.0f}"),
                              "-" if name == "raw" else _cell(report, "webrtc", row, "stall", "{:.0f}")))
    return lines + _notes(report, "webrtc")


SECTIONS: list[Callable[[Report], list[str]]] = [
    section_header, section_single_path, section_loss, section_failover, section_aggregation,
    section_unequal, section_reorder, section_cpu, section_server, section_fleet, section_hostile, section_marking, section_webrtc,
    section_method]


def render(report: Report) -> str:
    return "\n".join("\n".join(section(report)) + "\n" for section in SECTIONS)


def to_json(report: Report) -> dict:
    results = report.results
    return {
        "meta": report.meta,
        "plan": vars(report.plan),
        "ciphers": results.ciphers,
        "runs": results.tables,
        "summary": {sec: {row: {k: vars(Stat.of(v)) for k, v in series.items()}
                          for row, series in table.items()} for sec, table in results.tables.items()},
        "notes": results.notes,
        "ratios": {k: {"mptun/openvpn": report.ratio(k, "mptun", "openvpn"),
                       "mptun/raw": report.ratio(k, "mptun", "raw")} for k in METRIC},
        "added_rtt_p50_ms": {s: report.added_rtt(s) for s in results.tables.get("single", {})},
        "targets": [vars(t) for t in foundation_targets(report)],
        "unequal_targets": [vars(t) for t in unequal_targets(report)] if "unequal" in results.tables else [],
    }
