"""Sessions: branches that do not outlive the block, or the process, that made them.

A session's branches are tied to one daemon connection. A body that raises has them
discarded on the way out; a client killed with SIGKILL has them discarded by the
daemon when it sees the connection close, and leaves it no descriptor behind;
``keep=True`` opts a branch out; a session that ends cleanly leaves its branches
to the caller.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from branching import EmbeddedDaemon, Workspace

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

WAIT = 30.0  # seconds the daemon has to notice a dead client


def names(ws: Workspace) -> set[str]:
    return {b.name for b in ws.branches()}


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT:.0f} s: {what}"
        time.sleep(0.1)


def test_a_session_that_raises_discards_its_branches(daemon: EmbeddedDaemon,
                                                      proj: Path) -> None:
    with Workspace(proj, daemon=daemon) as ws:
        with pytest.raises(RuntimeError, match="boom"), ws.session() as s:
            a = s.create("s-a")
            child = a.create("s-a-child")  # a session branch's branches are the session's
            s.create("s-b")
            s.create("s-kept", keep=True)
            assert child.session is s
            assert child.run("echo x > f").ok
            raise RuntimeError("boom")
        assert names(ws) == {"s-kept"}
        assert (proj / "f").read_text() == "base\n"
        ws.get("s-kept").abort()


def test_a_session_that_ends_cleanly_leaves_its_branches(daemon: EmbeddedDaemon,
                                                         proj: Path) -> None:
    with Workspace(proj, daemon=daemon) as ws:
        with ws.session() as s:
            with s.branch("s-done") as b:
                assert b.run("echo done > f").ok
            s.create("s-left")
        ws.client.close()  # every connection of the session's closed: nothing more goes
        assert names(ws) == {"s-left"}
        assert (proj / "f").read_text() == "done\n"
        ws.get("s-left").abort()


CHILD = """
import sys, time
from branching import Workspace
ws = Workspace(sys.argv[1], daemon=sys.argv[2])
with ws.session() as s:
    for i in range(3):
        s.create(f"held{i}")
    s.create("outlives", keep=True)
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_client_killed_in_a_session_has_its_branches_discarded(daemon: EmbeddedDaemon,
                                                                 proj: Path) -> None:
    assert daemon.proc is not None
    fds = Path(f"/proc/{daemon.proc.pid}/fd")
    with Workspace(proj, daemon=daemon) as ws:
        before = len(os.listdir(fds))
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(proj), str(daemon.socket)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            assert names(ws) == {"held0", "held1", "held2", "outlives"}
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        eventually(lambda: names(ws) == {"outlives"}, "the session's branches discarded")
        ws.get("outlives").abort()  # (a live branch holds descriptors of its overlay)
        eventually(lambda: len(os.listdir(fds)) <= before,
                   f"the daemon's descriptors back to {before}")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_an_async_session_that_raises_discards_its_branches(daemon: EmbeddedDaemon,
                                                                  proj: Path) -> None:
    with Workspace(proj, daemon=daemon) as ws:
        with pytest.raises(RuntimeError, match="boom"):
            async with ws.asession() as s:
                a = await s.acreate("as-a")
                await a.acreate("as-a-child")
                async with s.abranch("as-done") as b:
                    assert (await b.arun("echo async > f")).ok
                await s.acreate("as-kept", keep=True)
                raise RuntimeError("boom")
        assert {b.name for b in await ws.abranches()} == {"as-kept"}
        assert (proj / "f").read_text() == "async\n"
        await (await ws.aget("as-kept")).aabort()


def test_an_idle_session_is_not_timed_out(tmp_path: Path, proj: Path) -> None:
    """The daemon closes idle connections; one holding a session's branches it must not:
    closing it would discard them under a live client."""
    (tmp_path / "impatient").mkdir()
    d = EmbeddedDaemon(tmp_path / "impatient", args=["--idle-timeout", "1"]).start()
    try:
        with Workspace(proj, daemon=d) as ws:
            with ws.session() as s:
                s.create("idle1")
                time.sleep(2.5)  # idle on the wire, twice the daemon's patience
                s.create("idle2")  # on the same connection: it is still open
                assert names(ws) == {"idle1", "idle2"}
            time.sleep(2.5)  # settled: now it may be closed, and nothing goes with it
            assert names(ws) == {"idle1", "idle2"}
            assert "went away in a session" not in d.log_path.read_text()
    finally:
        d.stop()
