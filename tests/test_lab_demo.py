"""`mptun lab`: scenario files and options (pure), and the showcase end to end (netns).

Why: `mptun lab` is the first thing a newcomer runs, so it has to work from
the command line as shipped, print exactly one JSON object with ``--json``,
and leave nothing behind, not even when interrupted.  The end-to-end tests run
it as a subprocess, the way a user does, and look for its namespaces afterwards.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tunnel.app.cli import main as mptun
from tunnel.lab import mptcp
from tunnel.lab.demo import format_showcase
from tunnel.lab.netns import NETNS_DIR
from tunnel.lab.scenario import (MAX_PATHS, Outage, PathSpec, Scenario, ScenarioError,
                                 load_scenario, with_overrides)

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((REPO / "scenarios").glob("*.toml"))


# --------------------------------------------------------------------------
# Scenario files (pure)
# --------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_default_file_spells_out_the_built_in_defaults() -> None:
    loaded = load_scenario(REPO / "scenarios" / "default.toml")
    assert replace(loaded, source=Scenario().source) == Scenario()


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_example_scenarios_load(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem and scenario.source == str(path)
    assert scenario.paths and scenario.modes


def test_an_empty_file_is_the_default_scenario(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert replace(load_scenario(path), name="default", description=Scenario().description,
                   source="") == replace(Scenario(), source="")


def test_a_file_sets_paths_outage_and_traffic(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [scenario]
        duration = 10
        modes = ["balance"]
        bulk = false
        [media]
        rate = 100
        size = 300
        [outage]
        path = 1
        start = 0.5
        end = 0.75
        [[path]]
        delay_ms = 5
        [[path]]
        loss_percent = 1.5
        rate_mbit = 4
    """)
    s = load_scenario(path)
    assert (s.duration, s.modes, s.bulk, s.media_rate, s.media_size) == (10, ("balance",), False, 100, 300)
    assert s.paths == (PathSpec(delay_ms=5), PathSpec(loss_percent=1.5, rate_mbit=4))
    assert s.outage == Outage(1, 0.5, 0.75) and s.outage_window() == (5.0, 7.5)
    assert [i.outages for i in s.impairments(with_outage=True).values()] == [(), ((5.0, 7.5),)]
    assert all(not i.outages for i in s.impairments(with_outage=False).values())


@pytest.mark.parametrize("text, message", [
    ("[media]\nsizee = 3\n", "[media] sizee: unknown key"),
    ("[scenario]\nduration = \"long\"\n", "[scenario] duration: expected a number, got 'long'"),
    ("[scenario]\nduration = 1\n", "[scenario] duration: 1 is out of range (2 to 3600)"),
    ("[scenario]\nmodes = [\"fast\"]\n", "[scenario] modes: 'fast' is not one of"),
    ("[scenario]\nmodes = []\n", "[scenario] modes: no mode given"),
    ("[media]\nsize = 2.5\n", "[media] size: expected an integer, got 2.5"),
    ("[[path]]\ndelay_ms = 1\n[[path]]\nloss_percent = 150\n",
     "[path 1] loss_percent: 150 is out of range (0 to 100)"),
    ("[[path]]\nrate_mbit = 0\n", "[path 0] rate_mbit: 0 is out of range"),
    ("[outage]\npath = 2\n", "[outage] path: no path 2 (the scenario has 2"),
    ("[outage]\nstart = 0.6\nend = 0.5\n", "[outage] end: 0.5 is not after start (0.6)"),
    ("[paths]\n", "unknown table or key 'paths'"),
    ("[path]\ndelay_ms = 1\n", "path must be an array of tables"),
    ("[scenario\n", "not valid TOML"),
])
def test_file_errors_name_file_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_one_path_keeps_the_default_outage_on_path_0(tmp_path: Path) -> None:
    assert load_scenario(write(tmp_path, "[[path]]\ndelay_ms = 1\n")).outage == Outage()
    assert with_overrides(Scenario(), paths=1).outage == Outage()


def test_an_outage_needs_its_path(tmp_path: Path) -> None:
    text = "[outage]\npath = 1\n" + "[[path]]\ndelay_ms = 1\n"
    with pytest.raises(ScenarioError, match=r"\[outage\] path: no path 1 \(the scenario has 1"):
        load_scenario(write(tmp_path, text))
    assert load_scenario(write(tmp_path, "[outage]\nenabled = false\npath = 1\n[[path]]\n")).outage is None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="file not found"):
        load_scenario(tmp_path / "nope.toml")


# --------------------------------------------------------------------------
# Command-line overrides (pure)
# --------------------------------------------------------------------------

def test_options_override_per_path_lists_repeat_their_last_value() -> None:
    s = with_overrides(Scenario(), paths=3, delay=[10], loss=[1, 5], rate=[8])
    assert [(p.delay_ms, p.loss_percent, p.rate_mbit) for p in s.paths] == [(10, 1, 8), (10, 5, 8), (10, 5, 8)]
    assert with_overrides(Scenario(), delay=[1, 2, 3]).paths[2].delay_ms == 3  # the list sets the count
    assert [p.rate_mbit for p in with_overrides(Scenario(), rate=[0, 5]).paths] == [None, 5]  # 0: none
    assert with_overrides(Scenario(), paths=1, no_outage=True).paths == (Scenario().paths[0],)
    s = with_overrides(Scenario(), duration=4, modes=["balance"], no_outage=True)
    assert (s.duration, s.modes, s.outage) == (4, ("balance",), None)


@pytest.mark.parametrize("kwargs, message", [
    ({"delay": [1, 2, 3], "paths": 2}, "command line: --delay: 3 values for 2 paths"),
    ({"loss": [101]}, "command line: --loss: 101 is out of range (0 to 100)"),
    ({"paths": MAX_PATHS + 1}, "command line: --paths: 9 is out of range (1 to 8)"),
    ({"duration": 0.5}, "command line: --duration: 0.5 is out of range"),
    ({"modes": ["duplicate", "duplicate"]}, "command line: --modes: a mode is listed twice"),
])
def test_option_errors_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ScenarioError) as exc:
        with_overrides(Scenario(), **kwargs)
    assert message in str(exc.value)


def test_an_outage_on_a_path_that_is_cut_away_is_an_error() -> None:
    scenario = replace(Scenario(), outage=Outage(path=1))
    with pytest.raises(ScenarioError, match="--paths: no path 1 .*add --no-outage"):
        with_overrides(scenario, paths=1)


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--paths", "3"], "mptun lab: error: command line: --paths: not used by --quick"),
    (["--delay", "1,2,3", "--paths", "2"], "mptun lab: error: command line: --delay: 3 values for 2 paths"),
    (["--scenario", "/nonexistent/x.toml"], "mptun lab: error: /nonexistent/x.toml: file not found"),
])
def test_cli_reports_bad_options_with_exit_2(argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert mptun(["lab", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == message


def test_cli_rejects_unknown_modes_and_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--modes", "fast"], "'fast' is not one of"),
                          (["--loss", "2,x"], "expected numbers separated by commas")):
        with pytest.raises(SystemExit) as exc:
            mptun(["lab", *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------
# End to end (netns): the real command, as a subprocess
# --------------------------------------------------------------------------

def lab_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunnel", "lab", *args]


def namespaces(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix + "-")) \
        if os.path.isdir(NETNS_DIR) else []


def read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    """Read ``proc``'s stderr line by line until a line matches ``pattern``."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stderr], [], [], left)[0]:
            break
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; stderr: {''.join(seen)}")


@pytest.mark.netns
def test_showcase_json_end_to_end() -> None:
    duration = 6.0
    res = subprocess.run(lab_argv("--json", "--duration", str(duration), "--modes", "duplicate,balance",
                                  "--paths", "2"),
                         capture_output=True, text=True, timeout=90, cwd=REPO)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)  # stdout is exactly one JSON object
    assert set(result) == {"scenario", "lab_prefix", "modes", "elapsed_s"}
    assert ("mode duplicate: streaming 6 s beside an iperf3 TCP flow (started 2 s earlier), "
            "path 0 blackholed at 2.4 s for 1.2 s..." in res.stderr)
    scenario = result["scenario"]
    assert scenario["duration"] == duration and scenario["modes"] == ["duplicate", "balance"]
    assert [p["delay_ms"] for p in scenario["paths"]] == [30, 60]
    assert set(result["modes"]) == {"duplicate", "balance"}
    for mode, figures in result["modes"].items():
        assert figures["media_sent"] == duration * 50, mode
        assert figures["bulk_tcp_mbps"] > 0, mode
        assert 0 < figures["media_latency_p50_ms"] <= figures["media_latency_p99_ms"] < 1000, mode
        assert figures["media_loss_percent"] < 20, (mode, figures)  # the outage alone is 20 %
    dup = result["modes"]["duplicate"]
    # Duplicate masks the outage: no stall (lowest-rtt waits out the 300 ms dead interval
    # first), and not the outage's 20 % of the stream lost.  It does lose what every path
    # drops at once: path 1's 2 % random loss while path 0 is out, and the tail drops of
    # the bulk flow, whose copies fill both 20 Mbit/s queues in step (2.5-5.5 % in 6 s
    # runs on a 2-core VM; ~0.5 % with --no-bulk).
    assert dup["media_longest_gap_ms"] < 250, dup
    assert dup["media_loss_percent"] < 12, dup
    assert dup["media_latency_p50_ms"] >= 30  # the shorter path's delay is a floor
    assert namespaces(result["lab_prefix"]) == []


@pytest.mark.netns
def test_mptcp_reference_row_end_to_end() -> None:
    """`--modes mptcp`: the bulk flow with Linux MPTCP over the raw paths, reported like a mode."""
    if why := mptcp.available():
        pytest.skip(f"the MPTCP row needs mptcpize and kernel MPTCP: {why}")
    argv = ["--duration", "5", "--modes", "mptcp", "--loss", "0", "--no-outage"]
    res = subprocess.run(lab_argv("--json", *argv), capture_output=True, text=True, timeout=90, cwd=REPO)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    row = result["modes"]["mptcp"]
    # A second subflow joined (the kernel's MIB), and the one flow got more than one
    # 20 Mbit/s path could carry: MPTCP really used both paths.
    assert row["not_run"] is None and row["mptcp_joined"] is True and row["mptcp_extra_subflows"] >= 1, row
    assert row["bulk_tcp_mbps"] > 21, row
    assert row["media_sent"] is None and row["media_loss_percent"] is None and row["tunnel_up_s"] is None
    scenario = with_overrides(Scenario(), duration=5, modes=["mptcp"], loss=[0], no_outage=True)
    table = format_showcase(result, scenario)
    line = next(x for x in table.splitlines() if x.strip().startswith("mptcp "))
    assert line.split()[1:5] == ["-"] * 4 and line.endswith(f"{row['bulk_tcp_mbps']:.1f} Mbit/s"), line
    assert "this run: a second subflow joined" in " ".join(table.split())
    assert namespaces(result["lab_prefix"]) == []


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.netns
@pytest.mark.parametrize("signum, code, moment, wait", [
    (signal.SIGINT, 130, "mode duplicate: streaming", 3.0),  # Ctrl-C with everything running
    (signal.SIGTERM, 143, "mode duplicate: starting mptun", 0.0),  # while the tunnel comes up
], ids=["ctrl-c-while-streaming", "sigterm-while-starting"])
def test_interrupt_tears_everything_down(signum: int, code: int, moment: str, wait: float) -> None:
    # Its own process group, so that Ctrl-C can go to the whole group, as a terminal sends it.
    # SIGINT as a terminal's process has it: a suite started in the background of a script
    # (`./scripts/test &`) ignores SIGINT, and an ignored signal stays ignored across exec.
    proc = subprocess.Popen(lab_argv("--duration", "30", "--modes", "duplicate"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)
    try:
        prefix = read_until(proc, r"building lab (\w+):", 30).group(1)
        read_until(proc, moment, 30)
        time.sleep(wait)  # 2 s of bulk warm-up, then 1 s into the media stream and its outage
        assert namespaces(prefix) == [f"{prefix}-{h}" for h in ("cli", "rtr", "srv")]
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert "interrupted; lab torn down" in stderr and stdout == ""
    assert namespaces(prefix) == []
