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


def _number(limits: Limits, name: str, kind: type[int] | type[float]) -> Any:
    """Field `name` as `kind` (normalised in place: "64" from a CLI becomes 64), or None."""
    value = getattr(limits, name)
    if value is None:
        return None
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and value % 1):
        raise ValueError(f"{name} {value!r} is not a whole number")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    object.__setattr__(limits, name, number)
    return number


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
        cpus = _number(self, "cpus", float)
        if cpus is not None and not 0.01 <= cpus < 1 << 20:
            raise ValueError(f"cpus {cpus!r} out of range: give a fraction of cores >= 0.01")
        pids = _number(self, "pids", int)
        if pids is not None and pids < 1:
            raise ValueError(f"pids {pids!r} out of range: give at least 1")
        io_weight = _number(self, "io_weight", int)
        if io_weight is not None and not 1 <= io_weight <= 10000:
            raise ValueError(f"io_weight {io_weight!r} out of range 1..10000")
        timeout = _number(self, "timeout", float)
        if timeout is not None and not 0 < timeout < math.inf:
            raise ValueError(f"timeout {timeout!r} out of range: give seconds > 0")

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
