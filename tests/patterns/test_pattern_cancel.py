"""Async use (trio and asyncio) and interruption: cancelled patterns leave nothing behind."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
from pattern_candidates import hang
from pattern_helpers import (
    SETTLE,
    alive,
    env_with_tests_path,
    files,
    interrupt_once_started,
    popen_interruptible,
    wait_for,
)

from branching import EmbeddedDaemon, Workspace
from branching.patterns import BestOfN, Command, Speculate

pytestmark = [pytest.mark.mount, pytest.mark.cgroup]


def hanging(pids: Path, n: int) -> Speculate:
    return Speculate([functools.partial(hang, str(pids))] * n, max_parallel=n)


def test_arun_under_trio(ws: Workspace, base: Path) -> None:
    async def main() -> None:
        outcome = await Speculate([Command("echo trio > value.txt")]).arun(ws)
        assert outcome.committed

    trio.run(main)
    assert (base / "value.txt").read_text() == "trio\n"


def test_arun_under_asyncio(ws: Workspace, base: Path) -> None:
    async def main() -> None:
        outcome = await BestOfN(Command("echo asyncio > value.txt"), n=2).arun(ws)
        assert outcome.committed

    asyncio.run(main())
    assert (base / "value.txt").read_text() == "asyncio\n"


def _started(pids: Path) -> int:
    return len(list(pids.iterdir()))


async def _until_started(pids: Path, n: int) -> None:
    deadline = time.monotonic() + SETTLE
    while _started(pids) < n:
        assert time.monotonic() < deadline, "candidates never started"
        await trio.sleep(0.05)


def test_trio_cancellation_discards_branches_and_kills(ws: Workspace, base: Path,
                                                      pids: Path) -> None:
    before = files(base)

    async def main() -> None:
        with trio.move_on_after(SETTLE) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hanging(pids, 3).arun, ws)
                await _until_started(pids, 3)
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught, "the cancelled pattern did not return"

    trio.run(main)
    # arun returns only after the branches are discarded, which kills their processes
    assert not [b for b in ws.branches() if b.status == "active"]
    wait_for(lambda: not alive(pids), "the candidates' processes to die")
    assert files(base) == before


def test_asyncio_cancellation_discards_branches_and_kills(ws: Workspace, base: Path,
                                                         pids: Path) -> None:
    before = files(base)

    async def main() -> None:
        task = asyncio.ensure_future(hanging(pids, 2).arun(ws))
        deadline = time.monotonic() + SETTLE
        while _started(pids) < 2:
            assert time.monotonic() < deadline, "candidates never started"
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not [b for b in ws.branches() if b.status == "active"]
    wait_for(lambda: not alive(pids), "the candidates' processes to die")
    assert files(base) == before


def test_ctrl_c_discards_branches_and_kills(daemon: EmbeddedDaemon, base: Path,
                                            pids: Path) -> None:
    """SIGINT to a program blocked in a sync pattern: KeyboardInterrupt, nothing left."""
    before = files(base)
    program = textwrap.dedent(f"""
        import functools
        from branching import Workspace
        from branching.patterns import Speculate
        from pattern_candidates import hang
        with Workspace({str(base)!r}, daemon={str(daemon.socket)!r}) as ws:
            Speculate([functools.partial(hang, {str(pids)!r})] * 2, max_parallel=2)(ws)
    """)
    proc = popen_interruptible([sys.executable, "-c", program], env=env_with_tests_path(),
                               stderr=subprocess.PIPE)
    err = interrupt_once_started(proc, pids)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    wait_for(lambda: not alive(pids), "the candidates' processes to die")
    assert files(base) == before
    with Workspace(base, daemon=daemon.socket) as ws:
        assert not [b.name for b in ws.branches() if b.status == "active"]
