"""A workspace directory removed and made again at the same path is a new directory.

``rm -rf proj && cp -a src proj`` (or ``git clone ... proj``) with the daemon
running, or while it is stopped: new branches fork the new directory; branches
of the old one say so (``base_replaced``), cannot be committed into the new one
(exit 9), and can still be diffed and discarded; a commit journal is never
replayed into a directory other than the one it was written for.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from branching.client import Client
from branching.errors import BranchError
from daemon.protocol import ExitCode

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[EmbeddedDaemon]:
    (tmp_path / "d").mkdir()
    d = EmbeddedDaemon(tmp_path / "d").start()
    try:
        yield d
    finally:
        d.stop()


def make(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def replace(ws: Path, **files: str) -> None:
    """What a user does: remove the directory, make a new one with other contents."""
    src = make(ws.parent / "src", **files)
    shutil.rmtree(ws)
    shutil.copytree(src, ws)
    shutil.rmtree(src)


def branches(cli: CLI, ws: Path) -> dict[str, dict]:
    return {b["name"]: b for b in cli.json("list", "-w", str(ws))["branches"]}


def test_new_branches_fork_the_new_directory_and_old_ones_never_commit_into_it(
        started: EmbeddedDaemon, tmp_path: Path) -> None:
    ws = make(tmp_path / "proj", **{"a.txt": "old a\n"})
    cli = CLI(started.socket)
    old = Path(cli("create", "old", "-w", str(ws)).stdout.strip())
    (old / "a.txt").write_text("old a, edited\n")
    replace(ws, **{"b.txt": "new b\n"})

    assert cli.json("workspace", "add", str(ws))["name"] == "proj"  # the same workspace
    new = Path(cli("create", "new", "-w", str(ws)).stdout.strip())
    assert sorted(os.listdir(new)) == ["b.txt"]  # the new directory, not the deleted one
    listed = branches(cli, ws)
    assert listed["old"]["base_replaced"] and not listed["new"]["base_replaced"]
    assert "(base replaced)" in cli("list", "-w", str(ws)).stdout
    assert cli.json("info", "old")["base_replaced"]

    refused = cli("commit", "old", check=ExitCode.BASE_REPLACED)
    assert "no longer at" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert sorted(os.listdir(ws)) == ["b.txt"]
    assert os.listdir(started.state_dir / "journal") == []
    # still the user's: its own view, its diff against the directory it forked
    # (which rm -rf emptied: its file shows as added)
    assert (old / "a.txt").read_text() == "old a, edited\n"
    changes = cli.json("diff", "old")["changes"]
    assert [(c["kind"], c["path"]) for c in changes] == [("added", "a.txt")]

    (new / "c.txt").write_text("c\n")
    cli("commit", "new")  # a commit into the new directory leaves the old branch alone
    assert sorted(os.listdir(ws)) == ["b.txt", "c.txt"]
    assert branches(cli, ws)["old"]["status"] == "active"
    cli("discard", "old")
    cli("create", "again", "-w", str(ws))


def test_a_directory_replaced_while_the_daemon_is_stopped(tmp_path: Path) -> None:
    ws = make(tmp_path / "proj", **{"a.txt": "old a\n"})
    (tmp_path / "d").mkdir()
    d = EmbeddedDaemon(tmp_path / "d").start()
    try:
        cli = CLI(d.socket)
        old = Path(cli("create", "old", "-w", str(ws)).stdout.strip())
        (old / "mine.txt").write_text("mine\n")
        d.stop()
        replace(ws, **{"b.txt": "new b\n"})
        d.start()
        assert "is not the directory it was" in d.log_path.read_text()
        listed = branches(cli, ws)
        assert listed["old"]["base_replaced"]
        # the old directory is gone for good: the branch shows its own changes only
        assert sorted(os.listdir(old)) == ["mine.txt"]
        cli("commit", "old", check=ExitCode.BASE_REPLACED)
        assert sorted(os.listdir(ws)) == ["b.txt"]
        changes = cli.json("diff", "old")["changes"]
        assert [(c["kind"], c["path"]) for c in changes] == [("added", "mine.txt")]
        new = Path(cli("create", "new", "-w", str(ws)).stdout.strip())
        assert sorted(os.listdir(new)) == ["b.txt"]
        cli("discard", "old")
    finally:
        d.stop()


def test_a_journal_is_never_replayed_into_another_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = make(tmp_path / "proj", **{f"f{i}": "old\n" for i in range(4)})
    (tmp_path / "d").mkdir()
    d = EmbeddedDaemon(tmp_path / "d")
    monkeypatch.setenv("BRANCHFS_CRASH_AT", "step:1")  # the daemon dies mid-commit
    d.start()
    try:
        cli = CLI(d.socket)
        p = Path(cli("create", "c", "-w", str(ws)).stdout.strip())
        for i in range(4):
            (p / f"f{i}").write_text("new\n")
        cli("commit", "c", check=ExitCode.UNAVAILABLE)
        assert d.proc is not None
        d.proc.wait(timeout=30)
        assert d.proc.returncode == -signal.SIGKILL
    finally:
        d.stop()
    assert list((d.state_dir / "journal").glob("commit-*.json"))
    replace(ws, **{"other": "someone else's\n"})
    monkeypatch.delenv("BRANCHFS_CRASH_AT")
    d.start()
    try:
        cli = CLI(d.socket)
        assert sorted(os.listdir(ws)) == ["other"]  # nothing replayed into it
        assert "not replayed" in d.log_path.read_text()
        assert [j.name for j in (d.state_dir / "journal").iterdir()] == [
            f"kept-commit-{cli.json('info', 'c')['id']}.json"]
        assert cli.json("info", "c")["base_replaced"]
        cli("commit", "c", check=ExitCode.BASE_REPLACED)
        cli("discard", "c")
        d.stop()
        d.start()  # a kept journal stays kept
        assert sorted(os.listdir(ws)) == ["other"]
    finally:
        d.stop()


# the workspace's directory stays gone: fsck says so when the daemon stops
@pytest.mark.daemon_log_allows(r"fsck: warning: workspace-gone: workspace proj: ")
def test_a_removed_directory_refuses_new_branches(started: EmbeddedDaemon,
                                                  tmp_path: Path) -> None:
    ws = make(tmp_path / "proj", **{"a.txt": "a\n"})
    cli = CLI(started.socket)
    cli("create", "old", "-w", str(ws))
    shutil.rmtree(ws)
    proc = cli("create", "x", "-w", str(ws), check=ExitCode.NOT_FOUND)
    assert len(proc.stderr.splitlines()) == 1
    client = Client(started.socket)
    with pytest.raises(BranchError) as info:  # by name: the daemon has no directory for it
        client.call("create", workspace="proj", name="x")
    client.close()
    assert info.value.code == "not-found" and "has no directory" in str(info.value)
    assert cli.json("diff", "old")["changes"] == []
    cli("discard", "old")


def test_workspace_remove(started: EmbeddedDaemon, tmp_path: Path) -> None:
    ws = make(tmp_path / "proj", **{"a.txt": "a\n"})
    cli = CLI(started.socket)
    p = Path(cli("create", "b", "-w", str(ws)).stdout.strip())
    (p / "a.txt").write_text("changed\n")
    cli("workspace", "add", str(ws), "--name", "other", check=ExitCode.CONFLICT)
    refused = cli("workspace", "remove", "proj", check=ExitCode.CONFLICT)
    assert "--force" in refused.stderr
    assert cli.json("workspace", "remove", str(ws), "--force")["discarded"] == ["b"]
    assert cli.json("workspace", "list")["workspaces"] == []
    assert (ws / "a.txt").read_text() == "a\n"  # the directory is not touched
    assert not (started.mountpoint / "proj").exists()
    cli("workspace", "remove", "proj", check=ExitCode.NOT_FOUND)
    assert cli.json("workspace", "add", str(ws))["name"] == "proj"
    cli("create", "b", "-w", str(ws))
