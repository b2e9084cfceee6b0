"""A description of the machine a run measured: CPU, cores, memory, kernel, filesystem."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def describe(bench_dir: Path) -> dict[str, Any]:
    """What a reader needs to compare two runs; every field is a plain string or number."""
    fs_type, device = filesystem_of(bench_dir)
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bench_dir": str(bench_dir),
        "filesystem": fs_type,
        "device": device,
        "branchd_commit": _git_head(),
        "euid": os.geteuid(),
        "loadavg_start": loadavg(),
        "executable": sys.executable,
    }


def filesystem_of(path: Path) -> tuple[str, str]:
    """The (type, device) of the mount holding ``path``: the longest mountpoint prefix wins."""
    path = path.resolve()
    best = ("", "unknown", "unknown")
    with open("/proc/mounts") as f:
        for line in f:
            device, mountpoint, fs_type = line.split()[:3]
            mountpoint = mountpoint.replace("\\040", " ")
            if (path == Path(mountpoint) or Path(mountpoint) in path.parents) and len(
                mountpoint
            ) > len(best[0]):
                best = (mountpoint, fs_type, device)
    return best[1], best[2]


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every row."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _git_head() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def summary(machine: dict[str, Any]) -> str:
    """One line for the head of the table."""
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, bench dir on {machine['filesystem']} ({machine['device']}), "
        f"Python {machine['python']}, branchd {machine['branchd_commit']}, "
        f"load {machine['loadavg_start']}"
    )
