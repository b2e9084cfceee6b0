"""The backend serving each branch is reported, and it is the one the run asked for.

tests/run.sh runs the daemon-level suites once per backend (``BRANCHD_BACKEND``
read by every daemon the fixtures start): a daemon that silently fell back to
the other backend would make the second run test nothing new, so this fails then.
So for its unprivileged pass (tests/user_pass.sh, ``BRANCHD_TEST_UNPRIVILEGED=1``):
its daemons must run as the user, their runs in user namespaces, with limits.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from branching import EmbeddedDaemon

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def overlay_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) and line.split()[2] == "overlay" for line in f)


def test_branches_report_the_backend_the_run_asked_for(cli: CLI, ws: Path) -> None:
    backend = cli.json("status")["backend"]
    asked = os.environ.get("BRANCHD_BACKEND", "auto")
    if asked != "auto":
        assert backend == asked, f"BRANCHD_BACKEND={asked} but the daemon serves {backend}"
    assert backend in ("fuse", "overlay")
    made = cli.json("create", "bk1", "-w", str(ws))
    cli("create", "bk2", "--from", "bk1")
    listed = {b["name"]: b for b in cli.json("list", "-w", str(ws))["branches"]}
    for name in ("bk1", "bk2"):
        assert cli.json("info", name)["backend"] == backend
        assert listed[name]["backend"] == backend
        assert overlay_mounted(Path(listed[name]["path"])) == (backend == "overlay")
    assert made["backend"] == backend
    cli("discard", "bk1")
    assert not overlay_mounted(Path(made["path"]))


def test_the_daemon_is_as_privileged_as_the_pass_says(cli: CLI, daemon: EmbeddedDaemon,
                                                      ws: Path) -> None:
    assert daemon.proc is not None
    assert os.stat(f"/proc/{daemon.proc.pid}").st_uid == os.geteuid()
    if os.environ.get("BRANCHD_TEST_UNPRIVILEGED") != "1":
        return
    assert os.geteuid() != 0, "the unprivileged pass runs as root"
    status = cli.json("status")
    assert status["backend"] == "fuse"  # the overlay backend needs root
    assert status["runs_at"].startswith(
        "workspace path (unprivileged: a user and mount namespace per run"), status
    assert status["cgroup_warnings"] == [], status  # every limit, in the delegated cgroups
    cli("create", "pv1", "-w", str(ws))
    got = cli("exec", "pv1", "--", "cat", "/proc/self/uid_map")
    uid = os.geteuid()
    assert got.stdout.split() == [str(uid), str(uid), "1"]  # a user namespace of its own
    cli("discard", "pv1")


def test_an_invalidated_sibling_is_gone_from_its_path(cli: CLI, ws: Path) -> None:
    p1 = Path(cli("create", "st1", "-w", str(ws)).stdout.strip())
    p2 = Path(cli("create", "st2", "-w", str(ws), "--on-sibling-commit",
                  "invalidate").stdout.strip())
    (p2 / "mine").write_text("two\n")
    (p1 / "f").write_text("one\n")
    cli("commit", "st1")
    with pytest.raises(FileNotFoundError):  # its name left the workspace directory
        (p2 / "mine").read_text()
    assert not overlay_mounted(p2)
    assert cli.json("info", "st2")["status"] == "invalidated"


def test_an_embedded_daemon_takes_its_backend_from_its_args(tmp_path: Path, ws: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    d = EmbeddedDaemon(root, args=["--backend", "fuse"]).start()
    try:
        cli = CLI(d.socket)
        assert cli.json("status")["backend"] == "fuse"
        made = cli.json("create", "emb", "-w", str(ws))
        assert made["backend"] == "fuse" and not overlay_mounted(Path(made["path"]))
        assert (Path(made["path"]) / "README").read_text() == "hello\n"
    finally:
        d.stop()
