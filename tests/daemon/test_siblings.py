"""Branches that coexist: a sibling's commit never destroys another branch's work.

Two sub-agents edit different files of one workspace, each in its own branch,
with a process running in it: both commit, in either order, and the processes
run on. Where both changed one file, a text merge (git merge-file) is applied
to the branch that did not commit yet; what does not merge is a conflict: the
branch stays active with its own version, its commit is refused (exit 4) until
``branchctl resolve``. Branches made with ``--on-sibling-commit invalidate``
keep the first-commit-wins rule. Kill -9 at each step of a merge leaves the
branch before or after it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from branching import EmbeddedDaemon
from branching.client import Client
from daemon.protocol import ExitCode

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

LINES = [f"line {i}\n" for i in range(1, 11)]

# holds its file open from the start, waits for the flag {stop} (outside the workspace: a
# run served by its own overlay does not see a name made through FUSE that it has looked
# up already, README's Caveats), then reads it through that descriptor and writes what
# it read to ./seen
HOLDER = ("exec 3<{file}; while [ ! -e {stop} ]; do sleep 0.05; done; "
          "cat <&3 > seen; echo done")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "a.txt").write_text("a\n")
    (ws / "b.txt").write_text("b\n")
    (ws / "f.txt").write_text("".join(LINES))
    (ws / "gone.txt").write_text("to be deleted\n")
    (ws / "bin.dat").write_bytes(b"\0\1\2binary\0")
    return ws


def edit_line(path: Path, n: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[n - 1] = text
    path.write_text("".join(lines))


def holder(client: Client, ws: Path, name: str, file: str, at_branch_path: bool = False) -> str:
    stop = ws.parent / f"stop-{name}"
    run = client.call("exec", workspace=str(ws), name=name, detach=True,
                      at_branch_path=at_branch_path,
                      argv=["/bin/sh", "-c", HOLDER.format(file=file, stop=stop)])["run"]
    return str(run)


def running(client: Client, ws: Path, name: str, run: str) -> bool:
    runs = {r["run"]: r for r in client.call("info", workspace=str(ws), name=name)["runs"]}
    return "result" not in runs[run]


def info(cli: CLI, name: str, ws: Path) -> dict[str, Any]:
    return cli.json("info", name, "-w", str(ws))


@pytest.mark.parametrize("first", ["s1", "s2"])
def test_disjoint_siblings_both_commit_and_their_processes_run_on(
        daemon: EmbeddedDaemon, cli: CLI, project: Path, first: str) -> None:
    p1 = Path(cli("create", "s1", "-w", str(project)).stdout.strip())
    p2 = Path(cli("create", "s2", "-w", str(project)).stdout.strip())
    (p1 / "a.txt").write_text("a by s1\n")
    (p2 / "b.txt").write_text("b by s2\n")
    with Client(daemon.socket) as c:
        runs = {"s1": holder(c, project, "s1", "a.txt"), "s2": holder(c, project, "s2", "b.txt")}
        time.sleep(0.3)  # both hold their file open
        second = "s2" if first == "s1" else "s1"
        out = cli.json("commit", first)
        assert out["invalidated"] == [] and out["rebased"] == [second]
        assert out["conflicted"] == []
        assert running(c, project, second, runs[second])  # never killed
        other = p2 if second == "s2" else p1
        now = info(cli, second, project)
        assert now["status"] == "active" and now["conflicts"] == []
        # it sees the committed file now, and keeps its own change
        assert (other / ("a.txt" if first == "s1" else "b.txt")).read_text().endswith(
            f"by {first}\n")
        assert (other / ("b.txt" if first == "s1" else "a.txt")).read_text().endswith(
            f"by {second}\n")
        (project.parent / f"stop-{second}").write_text("")
        done = c.call("wait", run=runs[second])["result"]
        assert done["returncode"] == 0, done
        assert (other / "seen").read_text() == f"{'a' if second == 's1' else 'b'} by {second}\n"
        (other / "seen").unlink()
        cli("commit", second)
    assert (project / "a.txt").read_text() == "a by s1\n"
    assert (project / "b.txt").read_text() == "b by s2\n"


def test_the_same_file_merges_in_place_where_the_hunks_differ(
        daemon: EmbeddedDaemon, cli: CLI, project: Path) -> None:
    p1 = Path(cli("create", "s1", "-w", str(project)).stdout.strip())
    p2 = Path(cli("create", "s2", "-w", str(project)).stdout.strip())
    edit_line(p1 / "f.txt", 2, "line 2 by s1\n")
    edit_line(p2 / "f.txt", 9, "line 9 by s2\n")
    with Client(daemon.socket) as c:
        # A run served by its own overlay (an unprivileged daemon's) reads a file it holds
        # open at the size it had when opened (README's Caveats): this one gets FUSE.
        own = "unprivileged" in c.call("status")["runs_at"]
        run = holder(c, project, "s2", "f.txt", at_branch_path=own)
        time.sleep(0.3)
        assert cli.json("commit", "s1")["conflicted"] == []
        merged = (p2 / "f.txt").read_text()
        assert "line 2 by s1\n" in merged and "line 9 by s2\n" in merged
        (project.parent / "stop-s2").write_text("")
        assert c.call("wait", run=run)["result"]["returncode"] == 0
        assert (p2 / "seen").read_text() == merged  # the open descriptor reads the merge
        (p2 / "seen").unlink()
    assert [ch["path"] for ch in cli.json("diff", "s2")["changes"]] == ["f.txt"]
    cli("commit", "s2")
    assert (project / "f.txt").read_text() == merged


def test_a_conflict_is_reported_and_resolved_not_punished(cli: CLI, project: Path,
                                                           tmp_path: Path) -> None:
    p1 = Path(cli("create", "s1", "-w", str(project)).stdout.strip())
    p2 = Path(cli("create", "s2", "-w", str(project)).stdout.strip())
    edit_line(p1 / "f.txt", 5, "five by s1\n")
    edit_line(p2 / "f.txt", 5, "five by s2\n")
    (p1 / "gone.txt").unlink()
    (p2 / "gone.txt").write_text("changed by s2\n")
    (p1 / "bin.dat").write_bytes(b"\0s1")
    (p2 / "bin.dat").write_bytes(b"\0s2")
    assert cli.json("commit", "s1")["conflicted"] == ["s2"]
    b = info(cli, "s2", project)
    assert b["status"] == "active" and b["conflicts"] == ["bin.dat", "f.txt", "gone.txt"]
    assert "conflicted (3)" in cli("list", "-w", str(project)).stdout
    assert f"{b['workspace']}/s2: bin.dat, f.txt, gone.txt" in cli.json("status")["conflicted"]
    # its own versions are untouched
    assert "five by s2\n" in (p2 / "f.txt").read_text()
    assert (p2 / "gone.txt").read_text() == "changed by s2\n"
    refused = cli("commit", "s2", check=ExitCode.CONFLICT)
    assert "bin.dat, f.txt, gone.txt" in refused.stderr and len(refused.stderr.splitlines()) == 1
    cli("resolve", "s2", "nope.txt", "--ours", check=ExitCode.NOT_FOUND)
    cli("resolve", "s2", "bin.dat", "--markers", check=ExitCode.CONFLICT)  # not text

    cli("resolve", "s2", "f.txt", "--markers")
    marked = (p2 / "f.txt").read_text()
    assert "<<<<<<< branch\nfive by s2\n=======\nfive by s1\n>>>>>>> parent\n" in marked
    assert info(cli, "s2", project)["conflicts"] == ["bin.dat", "f.txt", "gone.txt"]  # open
    (p2 / "f.txt").write_text(marked.replace(
        "<<<<<<< branch\nfive by s2\n=======\nfive by s1\n>>>>>>> parent\n", "five by both\n"))
    cli("resolve", "s2", "f.txt", "--ours")
    cli("resolve", "s2", "gone.txt", "--theirs")
    assert not (p2 / "gone.txt").exists()  # the parent's: deleted
    mine = tmp_path / "mine.dat"
    mine.write_bytes(b"\0chosen")
    assert cli.json("resolve", "s2", "bin.dat", "--file", str(mine))["conflicts"] == []
    cli("commit", "s2")
    assert "five by both\n" in (project / "f.txt").read_text()
    assert not (project / "gone.txt").exists()
    assert (project / "bin.dat").read_bytes() == b"\0chosen"


def test_rebase_takes_in_changes_made_outside(cli: CLI, project: Path) -> None:
    p = Path(cli("create", "s", "-w", str(project)).stdout.strip())
    (p / "a.txt").write_text("a by s\n")
    (project / "a.txt").write_text("a changed outside\n")  # no base version was kept
    (project / "new.txt").write_text("new outside\n")
    proc = cli("rebase", "s", check=ExitCode.CONFLICT)
    assert "conflict a.txt" in proc.stdout
    assert (p / "new.txt").read_text() == "new outside\n"
    cli("resolve", "s", "a.txt", "--ours")
    assert cli("rebase", "s").stdout.strip() == "s is up to date with its parent"
    cli("commit", "s")
    assert (project / "a.txt").read_text() == "a by s\n"


def test_invalidate_keeps_first_commit_wins(cli: CLI, project: Path) -> None:
    for n in ("inv1", "inv2"):
        cli("create", n, "-w", str(project), "--on-sibling-commit", "invalidate")
    mine = Path(cli("create", "bystander", "-w", str(project)).stdout.strip())
    (mine / "b.txt").write_text("b by mine\n")
    out = cli.json("commit", "inv1")
    assert out["invalidated"] == ["inv2"] and out["rebased"] == ["bystander"]
    assert info(cli, "inv2", project)["status"] == "invalidated"
    cli("commit", "inv2", check=ExitCode.CONFLICT)
    cli("commit", "bystander")


def test_a_pattern_commit_leaves_branches_outside_it_alone(cli: CLI, project: Path) -> None:
    mine = Path(cli("create", "bystander", "-w", str(project)).stdout.strip())
    (mine / "b.txt").write_text("b by mine\n")
    cli("speculate", "-w", str(project), "--no-progress", "-c", "echo won > a.txt",
        "-c", "exit 1")
    assert (project / "a.txt").read_text() == "won\n"
    assert info(cli, "bystander", project)["status"] == "active"
    assert (mine / "a.txt").read_text() == "won\n"
    cli("commit", "bystander")
    assert (project / "b.txt").read_text() == "b by mine\n"


@pytest.fixture
def own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedDaemon]:
    (tmp_path / "d").mkdir()
    d = EmbeddedDaemon(tmp_path / "d")
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize("point", ["merge-journal-tmp", "merge-journal", "merge-step"])
def test_kill_9_in_a_merge_leaves_the_branch_before_or_after_it(
        own: EmbeddedDaemon, project: Path, monkeypatch: pytest.MonkeyPatch,
        point: str) -> None:
    monkeypatch.setenv("BRANCHFS_CRASH_AT", point)
    own.start()
    cli = CLI(own.socket)
    p1 = Path(cli("create", "s1", "-w", str(project)).stdout.strip())
    p2 = Path(cli("create", "s2", "-w", str(project)).stdout.strip())
    edit_line(p1 / "f.txt", 2, "line 2 by s1\n")
    edit_line(p2 / "f.txt", 9, "line 9 by s2\n")
    ours = (p2 / "f.txt").read_text()
    cli("commit", "s1", check=ExitCode.UNAVAILABLE)
    assert own.proc is not None
    own.proc.wait(timeout=30)
    assert own.proc.returncode == -signal.SIGKILL
    own.stop()
    monkeypatch.delenv("BRANCHFS_CRASH_AT")
    own.start()
    assert "line 2 by s1\n" in (project / "f.txt").read_text()  # s1's commit is complete
    now = (p2 / "f.txt").read_text()
    merged = ours.replace("line 2\n", "line 2 by s1\n")
    assert now in (ours, merged)  # before the merge, or after it: never a part
    if now == ours:  # the merge never became durable: a rebase does it, from the kept base
        assert cli.json("rebase", "s2")["merged"] == ["f.txt"]
    assert (p2 / "f.txt").read_text() == merged
    assert os.listdir(own.state_dir / "journal") == []
    cli("commit", "s2")
    assert (project / "f.txt").read_text() == merged
