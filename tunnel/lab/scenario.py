"""What `mptun lab` runs: paths, impairments, outage, traffic and modes, as one value.

Why: the lab showcase compares scheduler modes under one set of conditions,
and those conditions should be easy to vary, share and reproduce: two bad
links or five, short or long, with or without an outage.  A :class:`Scenario`
holds all of it; it comes from the built-in defaults (``scenarios/default.toml``
spells them out), from a TOML file (``mptun lab --scenario FILE``), and from
command-line options, which override the file.  Files are validated like the
tunnel's own configs (:mod:`tunnel.app.config`): every error is one line naming
the file, the table and the key.

File format (every key optional; an empty file is the default scenario)::

    [scenario]
    name = "default"
    description = "..."
    duration = 15                 # seconds of traffic per mode
    modes = ["duplicate", "lowest-rtt", "balance", "webrtc"]  # webrtc: policies/webrtc.toml;
                                  # mptcp: Linux MPTCP over the raw paths, bulk flow only
    bulk = true                   # an iperf3 TCP flow beside the media stream

    [media]
    rate = 50                     # packets per second
    size = 200                    # UDP payload bytes

    [outage]                      # one path blackholed for part of each run
    enabled = true
    path = 0
    start = 0.4                   # fractions of the run: 40 % .. 60 %
    end = 0.6

    [[path]]                      # one table per path, path 0 first;
    delay_ms = 30                 # each way; a key left out means "none"
    jitter_ms = 0
    loss_percent = 2              # each way, independent random loss
    rate_mbit = 20                # each way; leave out for no limit
    trace_up = "ATT-LTE-driving-2016.up"   # a cellular capacity trace (mahimahi's format)
    trace_down = "ATT-LTE-driving-2016.down"  # per direction; replaces rate_mbit there
    trace_scale = 8               # each opportunity carries 8 x 1500 bytes
    trace_queue_ms = 200          # drop-tail queue: 200 ms at the scaled mean rate (default)
    trace_queue_packets = 300     # or this many packets (replaces trace_queue_ms)

A trace is a path relative to the scenario file or the name of one shipped in
tunnel/lab/traces/ (see its README and :mod:`tunnel.lab.linktrace`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

# The lab reuses the tunnel config's TOML loading and per-key error reporting.
from tunnel.app.config import ConfigError, _load, _only_tables, _Section
from tunnel.core.scheduler import MODES
from tunnel.lab.linktrace import TRACE_QUEUE_MS, TraceError, load_trace, resolve_trace

if TYPE_CHECKING:  # imported where used: `mptun`'s parser imports this module, pyroute2 is slow
    from tunnel.lab.impair import Impairment

MAX_PATHS = 8  # each path costs delay-line work and a DTLS session; more says nothing new
CLI = "command line"  # the "file" named in errors about command-line options

# (lowest, highest) accepted value of each number, shared by the file and the command line.
LIMITS: dict[str, tuple[float, float]] = {
    "duration": (2.0, 3600.0),
    "paths": (1, MAX_PATHS),
    "delay_ms": (0.0, 5000.0),
    "jitter_ms": (0.0, 5000.0),
    "loss_percent": (0.0, 100.0),
    "rate_mbit": (0.1, 10000.0),
    "trace_scale": (0.01, 1000.0),
    "trace_queue_ms": (0.0, 60000.0),
    "trace_queue_packets": (1, 1_000_000),
    "media_rate": (1.0, 5000.0),
    "media_size": (16, 1400),  # 16: the stream tool's header
    "start": (0.0, 1.0),
    "end": (0.0, 1.0),
}


class ScenarioError(ConfigError):
    """A bad scenario file or option; str() is one line naming the file (or option) and key."""


@dataclass(frozen=True)
class PathSpec:
    """How one path is impaired: the same in both directions, except for the traces.

    ``trace_up``/``trace_down`` are absolute paths of capacity traces; a
    direction with a trace takes its rate from it instead of ``rate_mbit``.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_percent: float = 0.0
    rate_mbit: Optional[float] = None
    trace_up: Optional[str] = None
    trace_down: Optional[str] = None
    trace_scale: float = 1.0
    trace_queue_ms: float = TRACE_QUEUE_MS
    trace_queue_packets: Optional[int] = None

    def trace(self, direction: str) -> Optional[str]:
        return self.trace_up if direction == "up" else self.trace_down

    def impairment(self, outages: Sequence[tuple[float, float]] = (),
                   direction: str = "up") -> Impairment:
        """This path's ``direction`` as an :class:`Impairment`; ``outages`` in seconds of the schedule."""
        from tunnel.lab.impair import Impairment

        trace = self.trace(direction)
        return Impairment(delay_ms=self.delay_ms, jitter_ms=self.jitter_ms,
                          loss=self.loss_percent / 100,
                          rate_mbit=self.rate_mbit if trace is None else None,
                          outages=tuple(outages), trace=trace, trace_scale=self.trace_scale,
                          trace_queue_ms=self.trace_queue_ms,
                          trace_queue_packets=self.trace_queue_packets)

    def describe(self) -> str:
        """E.g. ``"30 ms, 2 % loss, 20 Mbit/s"`` or ``"30 ms, up: trace X x8 (15.3 Mbit/s mean), ..."``."""
        parts = [f"{self.delay_ms:g} ms" + (f" ± {self.jitter_ms:g}" if self.jitter_ms else "")]
        if self.loss_percent:
            parts.append(f"{self.loss_percent:g} % loss")
        traced = [d for d in ("up", "down") if self.trace(d)]
        if self.rate_mbit is not None and len(traced) < 2:
            parts.append(f"{self.rate_mbit:g} Mbit/s" + ("" if not traced else
                                                         f" {'down' if traced == ['up'] else 'up'}"))
        for d in traced:
            trace = load_trace(self.trace(d) or "")
            parts.append(f"{d}: trace {trace.name} x{self.trace_scale:g} "
                         f"({trace.mean_mbit(self.trace_scale):.1f} Mbit/s mean)")
        if traced:
            parts.append(f"{self.trace_queue_packets} packets of queue" if self.trace_queue_packets
                         else f"{self.trace_queue_ms:g} ms of queue")
        return ", ".join(parts)


@dataclass(frozen=True)
class Outage:
    """Path ``path`` drops everything from ``start`` to ``end`` (fractions of the run)."""

    path: int = 0
    start: float = 0.4
    end: float = 0.6

    def window(self, duration: float) -> tuple[float, float]:
        """The outage in seconds after the start of a run of ``duration`` seconds."""
        return self.start * duration, self.end * duration


@dataclass(frozen=True)
class Scenario:
    """Everything one `mptun lab` showcase run does; the defaults are the default scenario."""

    name: str = "default"
    description: str = ("two lossy 20 Mbit/s paths of different length; "
                        "the shorter one fails for a fifth of each run")
    duration: float = 15.0
    modes: tuple[str, ...] = ("duplicate", "lowest-rtt", "balance", "webrtc")
    # The rate limit makes the links the bottleneck, as they are in real life: without one
    # it is this machine's CPU (Python tunnel and delay line), and the figures would
    # describe the machine more than the modes.
    paths: tuple[PathSpec, ...] = (PathSpec(delay_ms=30, loss_percent=2, rate_mbit=20),
                                   PathSpec(delay_ms=60, loss_percent=2, rate_mbit=20))
    media_rate: float = 50.0
    media_size: int = 200
    bulk: bool = True
    outage: Optional[Outage] = field(default_factory=Outage)
    source: str = "built-in defaults"

    def outage_window(self) -> Optional[tuple[float, float]]:
        """(t1, t2) seconds into each run during which the outage path is dead, if any."""
        return self.outage.window(self.duration) if self.outage else None

    def impairments(self, with_outage: bool, direction: str = "up") -> dict[int, Impairment]:
        """Each path's :class:`Impairment` in ``direction``; ``with_outage`` adds the outage to its path."""
        window = self.outage_window() if with_outage else None
        return {i: spec.impairment([window] if window and self.outage and i == self.outage.path
                                   else [], direction)
                for i, spec in enumerate(self.paths)}

    def media_count(self) -> int:
        """Datagrams of the media stream in one run."""
        return max(1, round(self.duration * self.media_rate))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------
# Checks shared by the file and the command line
# --------------------------------------------------------------------------

def range_error(key: str, value: float) -> Optional[str]:
    """Why ``value`` is not acceptable for ``key`` (see :data:`LIMITS`), or None."""
    lo, hi = LIMITS[key]
    return None if lo <= value <= hi else f"{value:g} is out of range ({lo:g} to {hi:g})"


# Runs that use a policy file instead of one mode for everything (name -> file in policies/).
POLICY_RUNS = {"webrtc": "webrtc.toml"}
# Runs with no mptun at all, for reference: the bulk flow with Linux MPTCP over the raw paths.
REFERENCE_RUNS = ("mptcp",)


def mode_error(modes: Sequence[str]) -> Optional[str]:
    """Why ``modes`` is not a usable list of scheduler modes (or policy runs), or None."""
    if not modes:
        return "no mode given"
    unknown = [m for m in modes if m not in MODES and m not in POLICY_RUNS and m not in REFERENCE_RUNS]
    if unknown:
        return f"{unknown[0]!r} is not one of {', '.join((*MODES, *POLICY_RUNS, *REFERENCE_RUNS))}"
    if len(set(modes)) != len(modes):
        return "a mode is listed twice"
    return None


def outage_error(outage: Outage, n_paths: int) -> Optional[tuple[str, str]]:
    """(key, why) if ``outage`` does not fit a lab of ``n_paths`` paths, else None."""
    if not 0 <= outage.path < n_paths:
        return "path", f"no path {outage.path} (the scenario has {n_paths}, numbered from 0)"
    if outage.start >= outage.end:
        return "end", f"{outage.end:g} is not after start ({outage.start:g})"
    return None


# --------------------------------------------------------------------------
# TOML file
# --------------------------------------------------------------------------

TABLES = {"scenario", "media", "outage", "path"}


def _number(sec: _Section, key: str, default: Optional[float], limit: Optional[str] = None,
            kind: type = float) -> Any:
    """A number from ``sec`` (None stays None), checked against ``LIMITS[limit or key]``."""
    value = sec.get(key, kind, default, what="an integer" if kind is int else "a number")
    if value is not None and (why := range_error(limit or key, value)):
        raise sec.error(key, why)
    return value


def _scenario_table(path: Path, table: Any, base: Scenario) -> Scenario:
    sec = _Section(path, "scenario", table)
    name = sec.get("name", str, path.stem)
    description = sec.get("description", str, "")
    duration = _number(sec, "duration", base.duration)
    modes = sec.get("modes", list, list(base.modes), what="a list of mode names")
    if not all(isinstance(m, str) for m in modes) or (why := mode_error(modes)):
        raise sec.error("modes", why if all(isinstance(m, str) for m in modes)
                        else f"expected mode names, got {modes!r}")
    bulk = sec.get("bulk", bool, base.bulk)
    sec.finish()
    return replace(base, name=name, description=description, duration=duration,
                   modes=tuple(modes), bulk=bulk)


def _media_table(path: Path, table: Any, base: Scenario) -> Scenario:
    sec = _Section(path, "media", table)
    rate = _number(sec, "rate", base.media_rate, "media_rate")
    size = _number(sec, "size", base.media_size, "media_size", kind=int)
    sec.finish()
    return replace(base, media_rate=rate, media_size=size)


def _trace(sec: _Section, key: str) -> Optional[str]:
    """A trace key: the file, resolved against the scenario file's folder and read."""
    value = sec.get(key, str, None, what="a trace file path or a shipped trace's name")
    if value is None:
        return None
    try:
        found = resolve_trace(value, sec.path.parent)
        load_trace(found)
    except TraceError as exc:
        raise sec.error(key, str(exc)) from None
    return str(found)


def _path_table(path: Path, index: int, table: Any) -> PathSpec:
    sec = _Section(path, f"path {index}", table)
    spec = PathSpec(delay_ms=_number(sec, "delay_ms", 0.0),
                    jitter_ms=_number(sec, "jitter_ms", 0.0),
                    loss_percent=_number(sec, "loss_percent", 0.0),
                    rate_mbit=_number(sec, "rate_mbit", None),
                    trace_up=_trace(sec, "trace_up"),
                    trace_down=_trace(sec, "trace_down"),
                    trace_scale=_number(sec, "trace_scale", 1.0),
                    trace_queue_ms=_number(sec, "trace_queue_ms", TRACE_QUEUE_MS),
                    trace_queue_packets=_number(sec, "trace_queue_packets", None, kind=int))
    sec.finish()
    return spec


def _paths(path: Path, tables: Any) -> tuple[PathSpec, ...]:
    if not isinstance(tables, list):
        raise ScenarioError(f"{path}: path must be an array of tables ([[path]])")
    if not 1 <= len(tables) <= MAX_PATHS:
        raise ScenarioError(f"{path}: [[path]]: {len(tables)} paths (1 to {MAX_PATHS} allowed)")
    return tuple(_path_table(path, i, t) for i, t in enumerate(tables))


def _outage_table(path: Path, table: Any, n_paths: int) -> Optional[Outage]:
    sec = _Section(path, "outage", table)
    enabled = sec.get("enabled", bool, True)
    default = Outage()
    outage = Outage(path=sec.get("path", int, default.path),
                    start=_number(sec, "start", default.start),
                    end=_number(sec, "end", default.end))
    sec.finish()
    if enabled and (problem := outage_error(outage, n_paths)):
        raise sec.error(*problem)
    return outage if enabled else None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raises :class:`ScenarioError` naming file and key."""
    try:
        p, data = _load(path)
        _only_tables(p, data, TABLES)
        scenario = Scenario(source=str(p))
        scenario = _scenario_table(p, data.get("scenario", {}), scenario)
        scenario = _media_table(p, data.get("media", {}), scenario)
        if "path" in data:
            scenario = replace(scenario, paths=_paths(p, data["path"]))
        # Without an [outage] table the default outage stays: path 0, which always exists.
        outage = _outage_table(p, data.get("outage", {}), len(scenario.paths))
        return replace(scenario, outage=outage)
    except ScenarioError:
        raise
    except ConfigError as exc:  # from tunnel.app.config's helpers: same message, our type
        raise ScenarioError(str(exc)) from None


# --------------------------------------------------------------------------
# Command-line overrides
# --------------------------------------------------------------------------

def number_list(text: str) -> list[float]:
    """argparse type of --delay/--loss/--rate: ``"30,60"`` -> ``[30.0, 60.0]``."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def trace_list(text: str) -> list[Optional[str]]:
    """argparse type of --trace-up/--trace-down: ``"a.up,,b.up"`` -> ``["a.up", None, "b.up"]``.

    An empty entry or ``none`` is a path without a trace; the files are checked later
    (:func:`with_overrides`), so that a bad one is a scenario error (exit 2).
    """
    return [None if v.strip().lower() in ("", "none") else v.strip() for v in text.split(",")]


def mode_list(text: str) -> list[str]:
    """argparse type of --modes: ``"duplicate,balance"`` -> ``["duplicate", "balance"]``."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if why := mode_error(modes):
        raise argparse.ArgumentTypeError(why)
    return modes


def _cli_error(option: str, why: str) -> ScenarioError:
    return ScenarioError(f"{CLI}: {option}: {why}")


def _per_path(option: str, values: Sequence[float], n_paths: int, limit: str,
              zero_is_none: bool = False) -> list[Optional[float]]:
    """``values`` stretched to ``n_paths`` (the last one repeats) and checked.

    With ``zero_is_none`` a 0 stands for "no such limit" and becomes None.
    """
    if not values:
        raise _cli_error(option, "no value given")
    if len(values) > n_paths:
        raise _cli_error(option, f"{len(values)} values for {n_paths} paths")
    checked: list[Optional[float]] = []
    for v in values:
        if zero_is_none and v == 0:
            checked.append(None)
        elif why := range_error(limit, v):
            raise _cli_error(option, why)
        else:
            checked.append(v)
    return [checked[min(i, len(checked) - 1)] for i in range(n_paths)]


def _per_path_traces(option: str, values: Sequence[Optional[str]], n_paths: int) -> list[Optional[str]]:
    """Trace names stretched to ``n_paths`` like :func:`_per_path`, resolved and read."""
    if len(values) > n_paths:
        raise _cli_error(option, f"{len(values)} values for {n_paths} paths")
    checked: list[Optional[str]] = []
    for v in values:
        try:
            checked.append(None if v is None else str(load_trace(resolve_trace(v)).path))
        except TraceError as exc:
            raise _cli_error(option, str(exc)) from None
    return [checked[min(i, len(checked) - 1)] for i in range(n_paths)]


def _resized(paths: Sequence[PathSpec], n_paths: int) -> list[PathSpec]:
    """``paths`` cut or stretched to ``n_paths`` (added paths copy the last one)."""
    return [paths[min(i, len(paths) - 1)] for i in range(n_paths)]


def with_overrides(scenario: Scenario, *, duration: Optional[float] = None,
                   modes: Optional[Sequence[str]] = None, paths: Optional[int] = None,
                   delay: Optional[Sequence[float]] = None, loss: Optional[Sequence[float]] = None,
                   rate: Optional[Sequence[float]] = None, no_outage: bool = False,
                   no_bulk: bool = False, trace_up: Optional[Sequence[Optional[str]]] = None,
                   trace_down: Optional[Sequence[Optional[str]]] = None,
                   trace_scale: Optional[Sequence[float]] = None) -> Scenario:
    """``scenario`` with the command line's options applied (None: not given).

    ``delay`` (ms), ``loss`` (%), ``rate`` (Mbit/s, 0 = no limit), ``trace_up``
    and ``trace_down`` (trace files or shipped names, None = no trace) and
    ``trace_scale`` are per path; a list shorter than the number of paths
    repeats its last value.
    Without ``paths``, the number of paths is the scenario's, or the longest
    list's.
    """
    if duration is not None and (why := range_error("duration", duration)):
        raise _cli_error("--duration", why)
    if modes is not None and (why := mode_error(modes)):
        raise _cli_error("--modes", why)
    if paths is not None and (why := range_error("paths", paths)):
        raise _cli_error("--paths", why)
    lists = (delay, loss, rate, trace_up, trace_down, trace_scale)
    n = paths or max([len(scenario.paths)] + [len(v) for v in lists if v])
    if n > MAX_PATHS:
        raise _cli_error("--paths", f"{n} paths (1 to {MAX_PATHS} allowed)")
    specs = _resized(scenario.paths, n)
    for option, values, key in (("--delay", delay, "delay_ms"), ("--loss", loss, "loss_percent"),
                                ("--rate", rate, "rate_mbit"),
                                ("--trace-scale", trace_scale, "trace_scale")):
        if values is not None:
            stretched = _per_path(option, values, n, key, zero_is_none=key == "rate_mbit")
            specs = [replace(s, **{key: v}) for s, v in zip(specs, stretched)]
    for option, names, key in (("--trace-up", trace_up, "trace_up"),
                               ("--trace-down", trace_down, "trace_down")):
        if names is not None:
            specs = [replace(s, **{key: v})
                     for s, v in zip(specs, _per_path_traces(option, names, n))]
    outage = None if no_outage else scenario.outage
    if outage and (problem := outage_error(outage, n)):
        raise _cli_error("--paths", f"{problem[1]} for the outage; add --no-outage")
    return replace(scenario, duration=scenario.duration if duration is None else duration,
                   modes=tuple(modes) if modes is not None else scenario.modes,
                   paths=tuple(specs), outage=outage, bulk=scenario.bulk and not no_bulk)
