"""The bench's unequal-paths section rendered from synthetic results (no lab, fast).

Why: the section's verdicts (balance >= the best single path, >= 0.9x MPTCP, equal clean
paths >= 0.95x the sum) are what a reader takes from BENCH.md, so they are checked here on
figures whose right answers are known, along with the profiles the section runs.
"""

from __future__ import annotations

from tunnel.lab.bench.plan import Plan
from tunnel.lab.bench.profiles import PROFILES
from tunnel.lab.bench.report import Report, section_unequal, to_json, unequal_targets
from tunnel.lab.bench.results import Results


def _report() -> Report:
    results = Results(ran=["unequal", "aggregation"])
    first, second = PROFILES[0].name, PROFILES[1].name
    for run, (single, mptcp, balance) in enumerate([(20.0, 30.0, 28.0), (22.0, 32.0, 30.0), (21.0, 31.0, 29.0)]):
        results.add("unequal", f"{first}|single", {"mbps": single, "best_path": 0, "path0_mbps": single,
                                                   "path1_mbps": 9.0})
        results.add("unequal", f"{first}|mptcp", {"mbps": mptcp, "joined": 2})
        results.add("unequal", f"{first}|balance", {"mbps": balance})
        results.add("unequal", f"{first}|lowest-rtt", {"mbps": single - 1})
        results.add("unequal", f"{first}|udp", {"offered_mbps": 39.0, "loss_pct": 1.5, "p50_ms": 30.0,
                                                "p99_ms": 70.0})
        # the second profile: balance below the best single path, and MPTCP fell back once
        results.add("unequal", f"{second}|single", {"mbps": 19.0, "best_path": run % 2})
        results.add("unequal", f"{second}|mptcp", {"mbps": 19.0, "joined": 0 if run == 0 else 2})
        results.add("unequal", f"{second}|balance", {"mbps": 15.0})
    results.add("aggregation", "mptun", {"mbps": 36.0})
    return Report({}, results, Plan())


def test_the_section_has_the_issues_profiles() -> None:
    names = [p.name for p in PROFILES]
    assert len(names) >= 6 and len(set(names)) == len(names)
    issue = next(p for p in PROFILES if p.name == "issue 18")
    assert [(link.rate_mbit, link.delay_ms, link.loss) for link in issue.links] == [(30, 5, 0), (10, 50, 0)]
    assert any(link.burst for p in PROFILES for link in p.links)
    assert sum(p.traced() for p in PROFILES) == 1
    assert issue.udp_mbit() == 1.3 * 30


def test_rows_ratios_and_verdicts() -> None:
    report = _report()
    text = "\n".join(section_unequal(report))
    first, second = PROFILES[0].name, PROFILES[1].name
    row = next(line for line in text.splitlines() if line.startswith(f"| {first} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # median single 21 (path 0), MPTCP 31, balance 29: 29/21 = 1.38x, 29/31 = 0.94x
    assert cells[2:8] == ["21.0 (20.0–22.0) (path 0)", "31.0 (30.0–32.0)", "29.0 (28.0–30.0)",
                          "20.0 (19.0–21.0)", "1.38x", "0.94x"], cells
    assert cells[8:] == ["39.0", "1.5", "30 / 70"], cells
    assert "(path 0 or 1)" in next(line for line in text.splitlines() if line.startswith(f"| {second} |"))
    assert f"none in a run of {second}: MPTCP fell back to one path" in text
    verdicts = {t.text: t.met for t in unequal_targets(report)}
    assert verdicts[f"balance >= best single path: {first}"] is True
    assert verdicts[f"balance >= 0.9x Linux MPTCP: {first}"] is True
    assert verdicts[f"balance >= best single path: {second}"] is False  # 15 < 19
    assert verdicts[f"balance >= 0.9x Linux MPTCP: {second}"] is False
    assert verdicts[f"balance >= best single path: {PROFILES[2].name}"] is None  # no figures: not measured
    equal = next(t for t in unequal_targets(report) if t.text.startswith("equal clean paths"))
    assert equal.value == "0.90x" and equal.met is False  # 36 of 2 x 20 Mbit/s
    assert "| balance >= best single path: " + second + " | 0.79x | **not met** |" in text
    assert to_json(report)["unequal_targets"][0]["met"] is True


def test_profiles_without_figures_are_rows_that_say_so() -> None:
    report = _report()
    text = "\n".join(section_unequal(report))
    third = PROFILES[2].name
    assert f"| {third} | not run: no figures (see the notes) |" in text
    empty = "\n".join(section_unequal(Report({}, Results(), Plan())))
    assert "*Not run by this invocation (`--sections`).*" in empty and "| profile |" not in empty
