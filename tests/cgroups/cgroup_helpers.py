"""Helpers shared by the cgroup tests (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psutil
import pytest

from cgroups import Layout, detect

PREFIX = f"bdtest{os.getpid()}"
counter = itertools.count(1)


def hierarchy_roots(layout: Layout) -> list[str]:
    roots = [d for _, d in layout.v1]
    if layout.v2_dir is not None:
        roots.append(layout.v2_dir)
    return sorted(set(roots))


def leftover_cgroups() -> list[str]:
    found = []
    for root in hierarchy_roots(detect()):
        with contextlib.suppress(OSError):
            found += [os.path.join(root, n) for n in os.listdir(root) if n.startswith(PREFIX)]
    return found


def remove_tree(path: str) -> None:
    """rmdir a cgroup tree bottom-up (the session-end cleanup of a failed run)."""
    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")


def layout_for(kind: str) -> Layout:
    """This host's layout, or a restriction of it that exercises one code path.

    "v1-only" drops the v2 tree (kill and freeze through the v1 freezer, CPU
    time from cpuacct); "v2-only" drops the v1 hierarchies (placement, kill and
    freeze through the unified tree, whatever controllers it offers).
    """
    need_root()
    real = detect()
    if kind == "detected":
        if real.kind == "none":
            pytest.skip("no cgroup hierarchy on this host")
        return real
    if kind == "v1-only":
        if not real.v1:
            pytest.skip("no cgroup v1 hierarchy on this host")
        return replace(real, kind="v1", v2_dir=None, v2_controllers=frozenset())
    if kind == "v2-only":
        if real.v2_dir is None:
            pytest.skip("no cgroup v2 tree on this host")
        return replace(real, kind="v2", v1=())
    raise AssertionError(kind)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll until predicate() is truthy; a deadline only so that a broken test ends."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def gone(pid: int) -> bool:
    """The process no longer runs (reaped, or a zombie waiting for its new parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def read_pid(path: str) -> int:
    def ready() -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(path) as f:
                text = f.read()
            if text.endswith("\n"):
                return int(text)
        return None

    return int(wait_for(ready, f"a pid in {path}"))


# A candidate that leaves a daemon behind: fork, setsid, fork again (the
# classic double fork), the grandchild writes its pid and sleeps forever.
DOUBLE_FORK = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\\n")
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(1000)
    os._exit(0)
os.wait()
while not os.path.exists(sys.argv[1]):  # exit only once the daemon is up
    time.sleep(0.01)
if sys.argv[2] == "stay":
    time.sleep(1000)
"""
