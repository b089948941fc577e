"""Every figure of every run, and its summary (median with min-max).  The measurements
fill :class:`Results` and the report reads it; :func:`progress` prints the bench's progress
lines on stderr."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


Series = dict[str, list[float]]  # figure -> one value per run
Table = dict[str, Series]  # row (setup, mode, ...) -> its figures


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def fmt(self, spec: str) -> str:
        """"median (min–max)", or the bare value for a single run or when all runs agree."""
        f = spec.format
        if self.n == 1 or f(self.low) == f(self.high):
            return f(self.median)
        return f"{f(self.median)} ({f(self.low)}–{f(self.high)})"


@dataclass
class Results:
    """Figures per section and row, notes (failures, quirks) per section, ciphers per setup."""

    tables: dict[str, Table] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    ciphers: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # sections that were run

    def add(self, section: str, row: str, figures: dict[str, float]) -> None:
        series = self.tables.setdefault(section, {}).setdefault(row, {})
        for key, value in figures.items():
            series.setdefault(key, []).append(float(value))

    def note(self, section: str, text: str) -> None:
        notes = self.notes.setdefault(section, [])
        if text not in notes:
            notes.append(text)

    def stat(self, section: str, row: str, key: str) -> Optional[Stat]:
        values = self.tables.get(section, {}).get(row, {}).get(key)
        return Stat.of(values) if values else None

    def median(self, section: str, row: str, key: str) -> Optional[float]:
        s = self.stat(section, row, key)
        return s.median if s else None

    def failed(self, section: str, what: str, exc: BaseException) -> None:
        """Record that ``what`` could not be measured, with the first lines of the reason."""
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        progress(f"  {what} FAILED: {reason}")
        self.note(section, f"{what}: could not be measured: {type(exc).__name__}: {reason}")
