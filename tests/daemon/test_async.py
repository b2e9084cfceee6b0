"""The async API (``acreate``, ``abranch``, ``arun``, ...) under asyncio and trio alike.

Runs are concurrent for real: sixteen ``arun``s of ``sleep 1`` in sixteen branches
all start before any of them ends (each run writes its own start and end time), on
one event loop thread with no worker threads for the waits. No time is asserted: on
a loaded machine sixteen spawns may take longer than a second, so after its sleep
each run also waits (a minute at most) until all sixteen have started; runs made
one after another would never get there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from branching import BranchError, BranchRef, EmbeddedDaemon, Workspace, workspace

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180), pytest.mark.anyio]

N = 16


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_sixteen_runs_overlap(daemon: EmbeddedDaemon, proj: Path, tmp_path: Path) -> None:
    started = tmp_path / "started"
    started.mkdir()
    with Workspace(proj, daemon=daemon) as ws:
        branches = [await ws.acreate(f"par{i}") for i in range(N)]
        results: dict[str, tuple[float, float, str]] = {}
        threads_before = threading.active_count()

        async def one(i: int) -> None:
            b = branches[i]
            r = await b.arun(
                f"date +%s.%N; touch {started}/{i}; echo {i} > f; sleep 1; "
                f"for _ in $(seq 600); do [ $(ls {started} | wc -l) -ge {N} ] && break; "
                "sleep 0.1; done; date +%s.%N; cat f")
            assert r.ok, (r, r.stderr)
            start, end, content = r.stdout.split()
            results[b.name] = (float(start), float(end), content)

        async with anyio.create_task_group() as tg:
            for i in range(N):
                tg.start_soon(one, i)
        assert threading.active_count() <= threads_before  # no thread per call
        assert sorted(results) == sorted(b.name for b in branches)
        assert max(s for s, _, _ in results.values()) < min(e for _, e, _ in results.values())
        for i, b in enumerate(branches):
            assert results[b.name][2] == str(i)  # each run saw its own branch
            assert [c["path"] for c in await b.adiff()] == ["f"]
        assert (proj / "f").read_text() == "base\n"
        await branches[3].acommit()
        assert (proj / "f").read_text() == "3\n"
        for b in branches[4:]:
            await b.adiscard()
        assert {b.name for b in await ws.abranches()} == {f"par{i}" for i in range(3)}
        for b in branches[:3]:
            await b.aabort()


async def test_abranch_commits_on_success_and_discards_on_error(daemon: EmbeddedDaemon,
                                                                proj: Path) -> None:
    with Workspace(proj, daemon=daemon) as ws:
        async with ws.abranch("good") as b:
            assert (await b.ainfo())["status"] == "active"
            assert (await b.arun(["sh", "-c", "echo good > f"])).ok
        assert (proj / "f").read_text() == "good\n"
        with pytest.raises(RuntimeError, match="boom"):
            async with ws.abranch("bad") as b:
                assert (await b.arun(["sh", "-c", "echo bad > f"])).ok
                raise RuntimeError("boom")
        assert (proj / "f").read_text() == "good\n"
        assert not any(x.name == "bad" for x in await ws.abranches())
        assert (await b.ainfo())["status"] == "discarded"


async def test_a_cancelled_arun_kills_its_run_and_abranch_discards(daemon: EmbeddedDaemon,
                                                                   proj: Path) -> None:
    with Workspace(proj, daemon=daemon) as ws:
        with anyio.move_on_after(1):
            async with ws.abranch("cancelled") as b:
                await b.arun(["sleep", "60"])
        assert not any(x.name == "cancelled" for x in await ws.abranches())


async def test_arun_passes_cwd_and_env_as_run_does(daemon: EmbeddedDaemon, proj: Path) -> None:
    (proj / "sub").mkdir()
    with Workspace(proj, daemon=daemon) as ws:
        b = await ws.acreate("cwd")
        sync = b.run("pwd; echo $X", cwd=proj / "sub", env={"X": "y", "PATH": "/usr/bin:/bin"})
        r = await b.arun("pwd; echo $X", cwd=proj / "sub",
                         env={"X": "y", "PATH": "/usr/bin:/bin"})
        assert r.stdout == sync.stdout and r.stdout.split()[1] == "y"
        await b.aabort()


@pytest.fixture
def shared_workspaces() -> Iterator[None]:
    """``BranchRef.aopen`` keeps a Workspace per daemon and directory for the rest of the
    process: closed after the test, so that its connections do not outlive the daemon."""
    yield
    with workspace._shared_lock:
        opened = list(workspace._shared.values())
        workspace._shared.clear()
    for ws in opened:
        ws.close()


@pytest.mark.usefixtures("shared_workspaces")
async def test_errors_and_refs_as_in_the_sync_api(daemon: EmbeddedDaemon, proj: Path) -> None:
    with Workspace(proj, daemon=daemon) as ws:
        with pytest.raises(BranchError) as e:
            await ws.aget("no-such-branch")
        assert e.value.code == "not-found"
        b = await ws.acreate("ref")  # the connection that answered the error serves on
        ref = b.ref()
        again = await BranchRef.from_dict(ref.to_dict()).aopen()
        assert (again.id, again.path) == (b.id, b.path)
        assert (await ws.aopen(ref)).id == b.id
        await b.adiscard()
        await ws.acreate("ref")  # a later branch of the same name is another one
        with pytest.raises(BranchError) as e:
            await ws.aopen(ref)
        assert e.value.code == "not-found"
        await (await ws.aget("ref")).adiscard()
