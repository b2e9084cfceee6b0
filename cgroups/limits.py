"""Resource limits of one candidate run, and the size parser they accept.

Limits are plain values (bytes, fractions of cores, counts, seconds) so that
they cross the control protocol as JSON unchanged (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str | int) -> int:
    """Bytes from `4096`, "1024", "512M", "1.5G", "2GiB" (binary units, case-insensitive)."""
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"invalid size {text!r}: expected bytes as an integer or a string")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text}: must not be negative")
        return text
    m = _SIZE.fullmatch(text)
    if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise ValueError(
            f"invalid size {text!r}: expected a byte count with an optional K, M, G or T suffix"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value != int(value) and not m.group(2):
        raise ValueError(f"invalid size {text!r}: a byte count must be a whole number")
    return int(value)


@dataclass(frozen=True)
class Limits:
    """What one run may use. None means unlimited.

    Invariant: after construction every field is validated and `memory` is in bytes.
    """

    memory: int | None = None  # bytes; "512M" is accepted and normalised
    cpus: float | None = None  # fraction of cores, e.g. 1.5
    pids: int | None = None
    io_weight: int | None = None  # 1..10000, cgroup v2 io.weight scale (default weight is 100)
    timeout: float | None = None  # seconds of wall clock

    def __post_init__(self) -> None:
        if self.memory is not None:
            memory = parse_size(self.memory)
            if memory < 1 << 20:
                raise ValueError(f"memory limit {memory} bytes is below the 1M minimum")
            object.__setattr__(self, "memory", memory)
        if self.cpus is not None and not (0.01 <= float(self.cpus) < 1 << 20):
            raise ValueError(f"cpus {self.cpus!r} out of range: give a fraction of cores >= 0.01")
        if self.pids is not None and (isinstance(self.pids, bool) or int(self.pids) < 1):
            raise ValueError(f"pids {self.pids!r} out of range: give at least 1")
        if self.io_weight is not None and not 1 <= int(self.io_weight) <= 10000:
            raise ValueError(f"io_weight {self.io_weight!r} out of range 1..10000")
        if self.timeout is not None and not (0 < float(self.timeout) < math.inf):
            raise ValueError(f"timeout {self.timeout!r} out of range: give seconds > 0")

    def to_dict(self) -> dict[str, Any]:
        """The limits that are set, as JSON-ready values."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Limits:
        """Inverse of `to_dict`; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown limit(s): {', '.join(unknown)}")
        return cls(**d)
