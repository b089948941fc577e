"""The unequal-paths section's profiles, as data: two paths that differ in rate, delay, random
or burst loss, or follow recorded cellular traces.

Why: issue 18 asks whether `balance` aggregates links that are *not* alike, which is what
bonded links are in real life (two modems, DSL + LTE).  A profile only says what each path
does; one runner (:func:`tunnel.lab.bench.measure.run_unequal`) measures every profile the
same way and the report (:func:`tunnel.lab.bench.report.section_unequal`) describes them from
this data, so another profile is one more entry in :data:`PROFILES`.

Nothing here starts a lab: :class:`~tunnel.lab.impair.Impairment` and the trace reader are
imported where they are used, so the report can describe profiles without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from tunnel.lab.delayline import GilbertElliott

if TYPE_CHECKING:
    from tunnel.lab.impair import Direction, Impairment

UDP_FACTOR = 1.3  # the UDP stream's offered rate, times the faster path's capacity


@dataclass(frozen=True)
class Link:
    """One path of a profile, the same in both directions (a trace has one file per direction)."""

    delay_ms: float  # one way
    rate_mbit: Optional[float] = None  # tbf at the router; None when a trace sets the rate
    loss: float = 0.0  # independent random loss, 0..1, each way
    burst: Optional[GilbertElliott] = None  # burst loss in the delay line, each way
    trace: Optional[str] = None  # a trace shipped in tunnel/lab/traces/: "<trace>.up" and "<trace>.down"
    trace_scale: float = 1.0  # bytes per trace opportunity x this

    def trace_file(self, direction: Direction) -> str:
        from tunnel.lab.linktrace import resolve_trace

        return str(resolve_trace(f"{self.trace}.{direction}"))

    def impairment(self, direction: Direction) -> Impairment:
        from tunnel.lab.impair import Impairment

        traced = {} if self.trace is None else {"trace": f"{self.trace}.{direction}",
                                                "trace_scale": self.trace_scale}
        return Impairment(delay_ms=self.delay_ms, rate_mbit=self.rate_mbit, loss=self.loss,
                          burst=self.burst, **traced)

    def capacity_mbit(self) -> float:
        """Client -> server capacity: the rate limit, or the scaled trace's mean rate."""
        if self.trace is None:
            assert self.rate_mbit is not None, "a link needs a rate or a trace"
            return self.rate_mbit
        from tunnel.lab.linktrace import load_trace

        return load_trace(self.trace_file("up")).mean_mbit(self.trace_scale)

    def describe(self) -> str:
        """E.g. ``"20 Mbit/s, 10 ms, 1 % loss"`` (one way, each way)."""
        if self.trace is None:
            parts = [f"{self.rate_mbit:g} Mbit/s", f"{self.delay_ms:g} ms"]
        else:
            parts = [f"trace {self.trace} x{self.trace_scale:g} ({self.capacity_mbit():.1f} Mbit/s mean up)",
                     f"{self.delay_ms:g} ms"]
        if self.loss:
            parts.append(f"{100 * self.loss:g} % random loss")
        if self.burst:
            b = self.burst
            parts.append(f"burst loss (Gilbert-Elliott: good->bad {100 * b.p_good_to_bad:g} %, bad->good "
                         f"{100 * b.p_bad_to_good:g} % per packet, loss in bad {100 * b.loss_in_bad:g} %: "
                         f"{100 * b.mean_loss():.1f} % on average in bursts of {1 / b.p_bad_to_good:g} packets)")
        return ", ".join(parts)


@dataclass(frozen=True)
class Profile:
    """Two paths; ``name`` is the profile's row in the report and its key in the results."""

    name: str
    links: tuple[Link, Link]

    def plan(self) -> dict[tuple[int, Direction], Impairment]:
        """The :meth:`~tunnel.lab.impair.Impairments.apply` plan: every path, both directions."""
        return {(i, d): link.impairment(d) for i, link in enumerate(self.links) for d in ("up", "down")}

    def traced(self) -> bool:
        return any(link.trace for link in self.links)

    def unavailable(self) -> str:
        """Why this profile cannot run here (a trace that cannot be read), or ""."""
        if not self.traced():
            return ""
        from tunnel.lab.linktrace import TraceError

        try:
            self.capacities()
        except TraceError as exc:
            return f"trace missing or unreadable: {exc}"
        return ""

    def capacities(self) -> list[float]:
        """Each path's client -> server capacity in Mbit/s."""
        return [link.capacity_mbit() for link in self.links]

    def udp_mbit(self) -> float:
        """The UDP stream's offered rate: :data:`UDP_FACTOR` x the faster path's capacity."""
        return UDP_FACTOR * max(self.capacities())

    def describe(self) -> str:
        return "; ".join(f"path {i}: {link.describe()}" for i, link in enumerate(self.links))


ISSUE = "issue 18"  # the issue's own profile

PROFILES: tuple[Profile, ...] = (
    Profile("unequal rates", (Link(20, 30), Link(20, 10))),
    Profile("unequal delays", (Link(5, 20), Link(50, 20))),
    Profile("random loss", (Link(10, 20, loss=0.01), Link(40, 10))),  # on the faster, shorter path
    Profile("burst loss", (Link(20, 20), Link(20, 20, burst=GilbertElliott(0.002, 0.2)))),
    Profile("cellular traces", (Link(25, trace="ATT-LTE-driving-2016", trace_scale=8),
                                Link(40, trace="TMobile-UMTS-driving", trace_scale=8))),
    Profile(ISSUE, (Link(5, 30), Link(50, 10))),
)
