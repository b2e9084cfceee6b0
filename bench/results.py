"""What a run produces: one Row per (scenario, parameter, backend), and their summary."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """Measurements of one operation on one backend. Invariant: ``samples`` are seconds,
    one per run; a row whose runs failed has ``error`` set and may have no samples."""

    scenario: str
    param: str
    backend: str
    samples: list[float] = field(default_factory=list)
    error: str | None = None
    checks: list[str] = field(default_factory=list)  # what was verified, in words
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.scenario, self.param)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples and not self.error else None

    def as_dict(self, native: Row | None) -> dict[str, Any]:
        ratio = None
        if native is not None and native.median and self.median is not None:
            ratio = self.median / native.median
        return {
            "scenario": self.scenario,
            "param": self.param,
            "backend": self.backend,
            "unit": "s",
            "samples": self.samples,
            "median": self.median,
            "ratio_to_native": ratio,
            "error": self.error,
            "checks": self.checks,
            **({"extra": self.extra} if self.extra else {}),
        }


class Results:
    """All rows of a run, in the order they were measured."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def get(self, scenario: str, param: str, backend: str) -> Row | None:
        for row in self.rows:
            if (row.scenario, row.param, row.backend) == (scenario, param, backend):
                return row
        return None

    def measured(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for row in self.rows:
            seen.setdefault(row.key, None)
        return list(seen)

    def backends(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.setdefault(row.backend, None)
        return list(seen)
