"""``scripts/bench``'s command line: the options, the plan they make, installing the missing
tools with apt-get, the environment recorded in the report's header, and :func:`main`,
which runs the chosen sections and writes or prints the report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from tunnel.lab import mptcp, openconnect, openvpn, wireguard
from tunnel.lab.bench.measure import RUNNERS
from tunnel.lab.bench.plan import DEFAULT_OUTPUT, QUICK, REPO_ROOT, SECTION_NAMES, SETUP_NAMES, Plan
from tunnel.lab.bench.report import SECTIONS, Report, render, to_json
from tunnel.lab.bench.results import Results, progress
from tunnel.lab.bench.setups import SETUPS, MptcpSetup
from tunnel.lab.bench.traffic import echo_client, echo_server


APT_PACKAGES = {  # binary -> Debian package
    "iperf3": "iperf3", "nft": "nftables", "openvpn": "openvpn",
    "wireguard-go": "wireguard-go", "wg": "wireguard-tools",
    "openconnect": "openconnect", "ocserv": "ocserv", "mptcpize": "mptcpize",
}


def needed_binaries(args: argparse.Namespace) -> list[str]:
    binaries = ["iperf3", "nft"]
    if "single" in args.sections:
        binaries += [b for name in args.only for b in SETUPS[name].binaries]
    if "aggregation" in args.sections or "unequal" in args.sections:
        binaries += list(MptcpSetup.binaries)
    return sorted(set(binaries))


def ensure_tools(binaries: Iterable[str]) -> None:
    """apt-get install the Debian packages of any missing binaries; a failure is reported, not fatal.

    Debian starts an installed ocserv as a system service: if this installs it
    on a machine run by systemd, that service is stopped and disabled again
    (the benchmark runs its own ocserv in a namespace).
    """
    missing = sorted({APT_PACKAGES[b] for b in binaries if shutil.which(b) is None})
    if not missing:
        return
    progress(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        if subprocess.run(cmd, env=env).returncode != 0:
            progress("apt-get install failed; what is missing is reported as not measured")
    if "ocserv" in missing and Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", "ocserv.service", "ocserv.socket"],
                       capture_output=True)


def _output_of(argv: Sequence[str], cwd: Optional[Path] = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (res.stdout or res.stderr).strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown'} ({os.cpu_count()} cores)"


def _commit() -> str:
    commit = _output_of(["git", "rev-parse", "--short", "HEAD"], REPO_ROOT) or "unknown"
    dirty = _output_of(["git", "status", "--porcelain", "--", "tunnel"], REPO_ROOT)
    return commit + (" (with uncommitted changes in tunnel/)" if dirty else "")


def _command(argv: Sequence[str]) -> str:
    script = Path(sys.argv[0])
    try:
        shown = str(script.resolve().relative_to(REPO_ROOT))
    except ValueError:
        shown = sys.argv[0]
    return shlex.join([shown, *argv])


def environment(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, str]:
    plan: Plan = args.plan
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "commit": _commit(),
        "openvpn": openvpn.openvpn_version() if shutil.which("openvpn") else "not installed",
        "wireguard": wireguard.versions(),
        "openconnect": openconnect.versions(),
        "mptcp": f"kernel MPTCP, {mptcp.version()}",
        "iperf3": _output_of(["iperf3", "--version"]).splitlines()[0] if shutil.which("iperf3") else "-",
        "command": _command(argv),
        "runs": str(plan.runs),
        "duration": f"{plan.duration:g}",
        "echo_duration": f"{plan.echo_duration:g}",
        "elapsed": "-",
    }


def _name_list(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{what}: choose from {','.join(choices)}; got {text!r}")
        return [n for n in choices if n in names]  # canonical order, no duplicates
    return parse


def build_parser() -> argparse.ArgumentParser:
    from tunnel.lab import bench  # the package, whose docstring opens with what the command does

    p = argparse.ArgumentParser(
        prog="scripts/bench", description=(bench.__doc__ or "").split("\n\n")[0],
        epilog="A full run (no --quick/--sections/--only) rewrites docs/BENCH.md; a partial one prints"
               " its report on stdout unless --output is given.")
    p.add_argument("--runs", type=int, help=f"runs per figure (median reported; default {Plan.runs})")
    p.add_argument("--duration", type=float, help=f"seconds per iperf3 test (default {Plan.duration:g}; "
                                                  f"the unequal section's: {Plan.unequal_duration:g})")
    p.add_argument("--echo-duration", type=float,
                   help=f"seconds of UDP echo (default {Plan.echo_duration:g})")
    p.add_argument("--quick", action="store_true",
                   help="development: 1 run, shorter tests and streams (prints instead of writing BENCH.md)")
    p.add_argument("--sections", type=_name_list(SECTION_NAMES, "--sections"), default=list(SECTION_NAMES),
                   help=f"comma-separated sections to run (default {','.join(SECTION_NAMES)})")
    p.add_argument("--only", type=_name_list(SETUP_NAMES, "--only"), default=list(SETUP_NAMES),
                   help=f"comma-separated setups for the single-path section (default {','.join(SETUP_NAMES)})")
    p.add_argument("--output", type=Path,
                   help=f"markdown report to (over)write (default for a full run: "
                        f"{DEFAULT_OUTPUT.relative_to(REPO_ROOT)})")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    return p


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else Plan()
    overrides = {k: v for k, v in (("runs", args.runs), ("duration", args.duration),
                                   ("unequal_duration", args.duration),
                                   ("echo_duration", args.echo_duration)) if v is not None}
    return Plan(**{**vars(plan), **overrides})


def _echo_main(argv: Sequence[str]) -> int:
    if argv[0] == "echo-server":
        echo_server(int(argv[1]))
    else:
        addr, port, seconds, rate = argv[1], int(argv[2]), float(argv[3]), float(argv[4])
        print(json.dumps(echo_client(addr, port, seconds, rate)))
    return 0


_MAIN_PID = os.getpid()


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM like Ctrl-C, in this process only.

    pyroute2 forks helpers (to create a namespace) and ends them with SIGTERM;
    raising in such a child would unwind a copy of our stack there and run our
    ``finally`` blocks, deleting the lab under us (seen: "Cannot open network
    namespace ...-cli").
    """
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("echo-server", "echo-client"):
        return _echo_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.plan = plan = _plan(args)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)  # tear the labs down on SIGTERM too, as on Ctrl-C
    if plan.runs < 1 or plan.duration <= 0 or plan.echo_duration <= 0:
        parser.error("--runs, --duration and --echo-duration must be positive")
    partial = args.quick or args.sections != list(SECTION_NAMES) or args.only != list(SETUP_NAMES)
    output = args.output or (None if partial else DEFAULT_OUTPUT)
    if os.geteuid() != 0:
        print("scripts/bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    ensure_tools(needed_binaries(args))
    meta = environment(args, argv)
    results = Results()
    started_at = time.monotonic()
    try:
        for section in args.sections:
            results.ran.append(section)
            RUNNERS[section](args, results)
    except KeyboardInterrupt:
        progress("interrupted; labs torn down, nothing written")
        return 130
    elapsed = time.monotonic() - started_at
    meta["elapsed"] = f"{elapsed / 60:.1f} min"
    end_commit = _commit()
    if end_commit != meta["commit"]:  # someone committed or edited tunnel/ meanwhile
        meta["commit"] = f"{meta['commit']} at start, {end_commit} at end"
    report = Report(meta, results, plan)
    text = render(report)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        progress(f"done in {elapsed:.0f} s; wrote {output}")
    else:
        progress(f"done in {elapsed:.0f} s (partial run: report on stdout, no file written)")
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        print(text if output is None else "\n".join(
            line for section in SECTIONS[1:-1] for line in section(report) + [""]))
    return 0
