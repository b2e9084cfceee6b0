"""``branchctl fsck``: each kind of damage, made for real on a real daemon, is reported,
then repaired by ``--repair`` where that loses nothing, and the next check is clean."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from daemon.protocol import ExitCode

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


@pytest.fixture
def own(tmp_path: Path) -> Iterator[EmbeddedDaemon]:
    """A daemon of the test's own: the damage stays in it."""
    root = tmp_path / "d"
    root.mkdir()
    d = EmbeddedDaemon(root).start()
    try:
        yield d
    finally:
        d.stop()


def kinds(cli: CLI, *args: str, check: int = ExitCode.FAILED) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in cli.json("fsck", *args, check=check)["findings"]:
        out.setdefault(f["kind"], []).append(f)
    return out


def clean(cli: CLI, tries: int = 50) -> None:
    """fsck finds nothing (the trash may take a moment to empty what repair queued)."""
    for _ in range(tries):
        proc = cli("fsck", check=None)
        if proc.returncode == ExitCode.OK:
            assert proc.stdout.strip() == "clean", proc.stdout
            return
        time.sleep(0.1)
    raise AssertionError(f"fsck still finds: {proc.stdout}")


def test_a_fresh_daemon_is_clean(own: EmbeddedDaemon, ws: Path) -> None:
    cli = CLI(own.socket)
    cli("create", "b1", "-w", str(ws))
    clean(cli)
    assert cli.json("fsck")["findings"] == []


def test_an_orphan_delta_is_reported_then_trashed(own: EmbeddedDaemon, ws: Path) -> None:
    cli = CLI(own.socket)
    cli("create", "b1", "-w", str(ws))
    orphan = own.state_dir / "branches" / "00000000deadbeef"
    (orphan / "upper").mkdir(parents=True)
    (orphan / "upper" / "f").write_text("whose?\n")
    found = kinds(cli)
    assert [f["path"] for f in found["orphan-delta"]] == [str(orphan)]
    text = cli("fsck", check=ExitCode.FAILED).stdout
    assert text.startswith("error: orphan-delta: ") and len(text.splitlines()) == 1
    repaired = kinds(cli, "--repair", check=ExitCode.OK)
    assert repaired["orphan-delta"][0]["repaired"] == "moved to the trash"
    assert not orphan.exists()
    clean(cli)


def test_a_live_branch_whose_delta_went_while_stopped_is_discarded_and_clean(
        tmp_path: Path, ws: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    d = EmbeddedDaemon(root).start()
    try:
        cli = CLI(d.socket)
        bid = cli.json("create", "lost", "-w", str(ws))["id"]
    finally:
        d.stop()
    shutil.rmtree(root / "state" / "branches" / bid / "upper")
    d.start()
    try:
        cli = CLI(d.socket)
        gone = cli("info", "lost", check=ExitCode.NOT_FOUND).stderr
        assert "discarded at start-up: the delta directory it needs was missing" in gone
        clean(cli)  # the rest of its directory went to the trash at start-up
    finally:
        d.stop()


def test_a_leftover_journal_of_a_done_commit_is_removed(own: EmbeddedDaemon, ws: Path) -> None:
    cli = CLI(own.socket)
    p = Path(cli("create", "b1", "-w", str(ws)).stdout.strip())
    (p / "new").write_text("n\n")
    bid = cli.json("info", "b1")["id"]
    cli("commit", "b1")
    journal = own.state_dir / "journal" / f"commit-{bid}.json"
    journal.write_text(json.dumps({"version": 2, "branch": bid, "name": "b1",
                                   "workspace": ws.name, "steps": [], "records": []}))
    kept = own.state_dir / "journal" / "kept-commit-0000.json"
    kept.write_text("{}")
    found = kinds(cli)
    assert [f["path"] for f in found["journal"]] == [str(journal)]
    assert "committed" in found["journal"][0]["message"]
    assert found["kept-journal"][0]["level"] == "info"
    repaired = kinds(cli, "--repair", check=ExitCode.OK)
    assert repaired["journal"][0]["repaired"] == "removed: its commit is done"
    assert not journal.exists() and kept.exists()
    assert set(kinds(cli, check=ExitCode.OK)) == {"kept-journal"}  # info: exit 0


def test_a_journal_of_a_live_branch_is_reported_and_kept(own: EmbeddedDaemon,
                                                         ws: Path) -> None:
    cli = CLI(own.socket)
    bid = cli.json("create", "b1", "-w", str(ws))["id"]
    journal = own.state_dir / "journal" / f"commit-{bid}.json"
    journal.write_text(json.dumps({"version": 2, "branch": bid, "name": "b1",
                                   "workspace": ws.name, "steps": [], "records": []}))
    assert "active" in kinds(cli, "--repair")["journal"][0]["message"]
    assert journal.exists()  # a restart would apply it: that is the user's call
    journal.unlink()
    clean(cli)


def test_a_damaged_state_log_and_origins_are_reported(own: EmbeddedDaemon, ws: Path) -> None:
    cli = CLI(own.socket)
    bid = cli.json("create", "b1", "-w", str(ws))["id"]
    logs = sorted(own.state_dir.glob("state.log.*"))
    assert len(logs) == 1
    origins = own.state_dir / "branches" / bid / "origins"
    saved = {p: p.read_bytes() for p in (logs[0], origins)}
    for p in saved:
        with open(p, "ab") as f:
            f.write(b"not a record\n")
    found = kinds(cli, "--repair")
    assert [f["path"] for f in found["state-log"]] == [str(logs[0])]
    assert [f["path"] for f in found["origins"]] == [str(origins)]
    assert all(f["repaired"] is None for fs in found.values() for f in fs)  # never by guess
    for p, data in saved.items():
        p.write_bytes(data)
    clean(cli)


def test_a_workspace_directory_gone_is_a_warning(own: EmbeddedDaemon, ws: Path) -> None:
    cli = CLI(own.socket)
    cli("create", "b1", "-w", str(ws))
    shutil.rmtree(ws)
    found = kinds(cli, "--repair")
    assert found["workspace-gone"][0]["level"] == "warning"
    assert found["workspace-gone"][0]["repaired"] is None
    ws.mkdir()
    found = kinds(cli, check=ExitCode.OK)  # a new directory: the branch forks the old one
    assert [f["level"] for f in found["base-replaced"]] == ["info"]
    cli("discard", "b1")
    clean(cli)


def test_a_trash_entry_nothing_deletes_is_queued_again(own: EmbeddedDaemon) -> None:
    cli = CLI(own.socket)
    stuck = own.state_dir / "trash" / "stuck.0000"
    (stuck / "sub").mkdir(parents=True)
    assert kinds(cli)["trash"][0]["level"] == "error"
    kinds(cli, "--repair", check=ExitCode.OK)
    clean(cli)
    assert not stuck.exists()


def test_a_leftover_cgroup_is_removed(own: EmbeddedDaemon, ws: Path) -> None:
    cli = CLI(own.socket)
    cli("create", "b1", "-w", str(ws))
    cli("exec", "b1", "--", "true")
    dirs = cli.json("fsck")["cgroup_dirs"]
    if not dirs:
        pytest.skip("no usable cgroup hierarchy here")
    stray = Path(dirs[0]) / "run.stray"
    stray.mkdir()
    found = kinds(cli)
    assert [f["path"] for f in found["cgroup-stray"]] == [str(stray)]
    repaired = kinds(cli, "--repair", check=ExitCode.OK)
    assert repaired["cgroup-stray"][0]["repaired"] == "removed (it was empty)"
    assert not stray.exists()
    clean(cli)


def overlays_at(path: str) -> int:
    with open("/proc/self/mounts") as f:
        return sum(1 for line in f if line.split()[1] == path and line.split()[2] == "overlay")


def test_overlays_unmounted_or_unknown_are_put_right(own: EmbeddedDaemon, ws: Path,
                                                     tmp_path: Path) -> None:
    cli = CLI(own.socket)
    b = cli.json("create", "b1", "-w", str(ws))
    if b["backend"] != "overlay":
        pytest.skip("the daemon serves branches by FUSE here")
    path = b["path"]
    # an administrator's umount: reported until healed (the daemon's mount watcher
    # may be quicker than fsck), then the overlay is there again
    subprocess.run(["umount", "-l", path], check=True)
    found = kinds(cli, "--repair", check=ExitCode.OK) if cli("fsck", check=None).returncode \
        else {}
    assert all(f["repaired"] == "mounted again" for f in found.get("overlay-missing", []))
    for _ in range(50):
        if overlays_at(path) == 1:
            break
        time.sleep(0.1)
    assert overlays_at(path) == 1
    clean(cli)
    # an overlay the daemon did not mount, stacked on the branch's
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},"
                    f"workdir={tmp_path / 'work'}", path], check=True)
    try:
        found = kinds(cli)
        assert [f["path"] for f in found["overlay-stray"]] == [path]
        repaired = kinds(cli, "--repair", check=ExitCode.OK)
        assert repaired["overlay-stray"][0]["repaired"] == "detached"
        assert overlays_at(path) == 1  # the branch's own stays
    finally:
        if overlays_at(path) > 1:
            subprocess.run(["umount", "-l", path], check=False)
    clean(cli)


@pytest.mark.daemon_log_allows(r"fsck: warning: missing-delta: branch proj/b1 has no work ")
def test_a_delta_removed_under_a_running_daemon_is_reported_not_repaired(
        own: EmbeddedDaemon, ws: Path) -> None:
    cli = CLI(own.socket)
    bid = cli.json("create", "b1", "-w", str(ws))["id"]
    work = own.state_dir / "branches" / bid / "work"
    shutil.rmtree(work)
    for args in ((), ("--repair",)):
        [f] = kinds(cli, *args)["missing-delta"]
        assert f["level"] == "warning" and f["repaired"] is None
        assert f["message"].startswith("branch proj/b1 has no work directory")
    assert (own.state_dir / "branches" / bid / "upper").is_dir()  # nothing of it deleted
