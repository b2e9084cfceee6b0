"""Fixtures for the cgroup tests: real cgroups, real processes, real mount namespaces.

Every Manager made here is named with this session's prefix; a session-end
check fails the run if any cgroup with that prefix is left in any hierarchy
(and removes it, so the machine stays usable). Tests that need root or a
hierarchy this host lacks are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cgroup_helpers import PREFIX, counter, layout_for, leftover_cgroups, need_root, remove_tree

from cgroups import Layout, Manager, share_mountpoint


@pytest.fixture(scope="session", autouse=True)
def no_cgroup_left_behind() -> Iterator[None]:
    yield
    left = leftover_cgroups()
    for path in left:
        remove_tree(path)
    assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def make_manager() -> Iterator[Callable[..., Manager]]:
    made: list[Manager] = []

    def make(layout: Layout | None = None, name: str | None = None) -> Manager:
        if layout is None:
            layout = layout_for("detected")
        m = Manager(name or f"{PREFIX}-{next(counter)}", layout=layout)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture(params=["detected", "v1-only", "v2-only"])
def any_layout(request: pytest.FixtureRequest) -> Layout:
    return layout_for(request.param)


@pytest.fixture
def manager(make_manager: Callable[..., Manager]) -> Manager:
    return make_manager()


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids of processes a test starts itself (outside any Manager): killed at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@pytest.fixture
def tmpfs(tmp_path: Any) -> Iterator[Callable[[str], str]]:
    """Mount a small tmpfs (stand-in for the daemon's FUSE mount), optionally on a
    mountpoint prepared with share_mountpoint; lazily unmounted at teardown."""
    mounted: list[str] = []

    def mount(name: str, shared_parent: bool = False) -> str:
        need_root()
        path = str(tmp_path / name)
        os.mkdir(path)
        if shared_parent:
            share_mountpoint(path)
            mounted.append(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", path], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", path], check=False, stderr=subprocess.DEVNULL)
