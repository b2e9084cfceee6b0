"""branchctl end to end: a real daemon, a real FUSE mount, real processes.

Each test uses its own workspace directory; branch names are unique per test
because the daemon is shared by the session.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from branching import BranchError, Client, EmbeddedDaemon
from daemon.protocol import ExitCode

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def test_create_prints_a_path_that_shows_the_workspace(cli: CLI, ws: Path) -> None:
    path = Path(cli("create", "c1", "--workspace", str(ws)).stdout.strip())
    assert (path / "README").read_text() == "hello\n"
    assert sorted(os.listdir(path)) == ["README", "src"]


def test_branch_changes_stay_in_the_branch_until_commit(cli: CLI, ws: Path) -> None:
    path = Path(cli("create", "c2", "-w", str(ws)).stdout.strip())
    (path / "src" / "app.py").write_text("print('v2')\n")
    (path / "NEW").write_text("new\n")
    os.unlink(path / "README")
    assert (ws / "src" / "app.py").read_text() == "print('v1')\n"
    assert (ws / "README").exists() and not (ws / "NEW").exists()

    changes = cli.json("diff", "c2")["changes"]
    assert {(c["kind"], c["path"]) for c in changes} == {
        ("modified", "src/app.py"), ("added", "NEW"), ("deleted", "README")}
    patch = cli("diff", "c2", "--patch").stdout
    assert "-print('v1')" in patch and "+print('v2')" in patch

    result = cli.json("commit", "c2")
    assert result["changes"] == 3
    assert (ws / "src" / "app.py").read_text() == "print('v2')\n"
    assert (ws / "NEW").read_text() == "new\n" and not (ws / "README").exists()
    assert "c2" not in {b["name"] for b in cli.json("list")["branches"]}


def test_discard_leaves_the_workspace_untouched(cli: CLI, ws: Path) -> None:
    path = Path(cli("create", "c3", "-w", str(ws)).stdout.strip())
    (path / "README").write_text("changed\n")
    assert cli.json("discard", "c3")["discarded"] == ["c3"]
    assert (ws / "README").read_text() == "hello\n"
    assert not path.exists()


def test_nested_branch_commits_into_its_parent_then_the_workspace(cli: CLI, ws: Path) -> None:
    outer = Path(cli("create", "n1", "-w", str(ws)).stdout.strip())
    (outer / "a").write_text("outer\n")
    inner = Path(cli("create", "n1b", "--from", "n1").stdout.strip())
    assert (inner / "a").read_text() == "outer\n"
    (inner / "b").write_text("inner\n")
    cli("commit", "n1b")
    assert (outer / "b").read_text() == "inner\n"
    assert not (ws / "b").exists()
    cli("commit", "n1")
    assert (ws / "a").read_text() == "outer\n" and (ws / "b").read_text() == "inner\n"


def test_first_commit_wins_and_the_sibling_is_stale(cli: CLI, ws: Path) -> None:
    first_wins = ("--on-sibling-commit", "invalidate")
    p1 = Path(cli("create", "r1", "-w", str(ws), *first_wins).stdout.strip())
    p2 = Path(cli("create", "r2", "-w", str(ws), *first_wins).stdout.strip())
    (p1 / "f").write_text("one\n")
    (p2 / "f").write_text("two\n")
    assert "r2" in cli.json("commit", "r1")["invalidated"]
    lost = cli("commit", "r2", check=ExitCode.CONFLICT)
    assert lost.stderr.startswith("branchctl: error:") and len(lost.stderr.splitlines()) == 1
    assert (ws / "f").read_text() == "one\n"


def test_prefix_named_branches_do_not_affect_each_other(cli: CLI, ws: Path) -> None:
    p1 = Path(cli("create", "x1", "-w", str(ws)).stdout.strip())
    (p1 / "mine").write_text("x1\n")
    p10 = Path(cli("create", "x10", "-w", str(ws)).stdout.strip())
    (p10 / "mine").write_text("x10\n")
    with open(p10 / "mine") as held:
        cli("discard", "x1")
        assert held.read() == "x10\n"
    assert (p10 / "mine").read_text() == "x10\n"


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "x" * 256])
def test_bad_names_get_one_line_and_exit_2(cli: CLI, ws: Path, name: str) -> None:
    proc = cli("create", name, "-w", str(ws), check=None)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert cli.json("list", "-w", str(ws))["branches"] == []


def test_nul_in_a_name_is_a_bad_name(daemon, ws: Path) -> None:
    with Client(daemon.socket) as client:
        client.call("workspace-add", path=str(ws))
        with pytest.raises(BranchError) as e:
            client.call("create", workspace=str(ws), name="bad\0name")
    assert e.value.code == "bad-name"


def test_missing_branch_and_workspace(cli: CLI, ws: Path, tmp_path: Path) -> None:
    for args in (["commit", "nope"], ["discard", "nope"], ["diff", "nope"], ["info", "nope"]):
        proc = cli(*args, check=ExitCode.NOT_FOUND)
        assert "nope" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = cli("create", "w1", "-w", str(tmp_path / "absent"), check=ExitCode.NOT_FOUND)
    assert "absent" in proc.stderr


def test_discarded_branch_cannot_be_committed(cli: CLI, ws: Path) -> None:
    cli("create", "d1", "-w", str(ws))
    cli("discard", "d1")
    proc = cli("commit", "d1", check=ExitCode.NOT_FOUND)
    assert "discarded" in proc.stderr


def test_workspace_inside_the_mount_is_refused(cli: CLI, daemon, ws: Path) -> None:
    path = cli("create", "m1", "-w", str(ws)).stdout.strip()
    proc = cli("create", "m2", "-w", path, check=None)
    assert proc.returncode == ExitCode.USAGE, proc.stderr


def test_exec_passes_the_exit_code_and_streams_output(cli: CLI, ws: Path) -> None:
    cli("create", "e1", "-w", str(ws))
    proc = cli("exec", "e1", "--", "sh", "-c", "pwd; cat README; echo oops >&2; exit 7", check=7)
    lines = proc.stdout.splitlines()
    assert lines[0] == str(ws) and lines[1] == "hello"  # the branch, at the workspace path
    assert proc.stderr.strip() == "oops"
    cli("exec", "e1", "--", "sh", "-c", "echo made > out.txt")
    assert cli.json("diff", "e1")["changes"] == [
        {"kind": "added", "path": "out.txt", "type": "file", "old_path": None}]


def test_exec_timeout_kills_the_tree_and_exits_124(cli: CLI, ws: Path) -> None:
    cli("create", "t1", "-w", str(ws))
    proc = cli("exec", "t1", "--timeout", "1", "--", "sh", "-c", "sleep 60 & sleep 60",
               check=124)
    assert "timed out" in proc.stderr


def test_json_everywhere(cli: CLI, ws: Path) -> None:
    created = cli.json("create", "j1", "-w", str(ws))
    assert created["name"] == "j1" and created["status"] == "active"
    assert cli.json("info", "j1")["path"] == created["path"]
    assert cli.json("status")["branches"] >= 1
    assert any(w["base"] == str(ws) for w in cli.json("workspace", "list")["workspaces"])


def test_no_daemon_is_exit_5(tmp_path: Path) -> None:
    proc = CLI(tmp_path / "none.sock")("list", check=ExitCode.UNAVAILABLE)
    assert "cannot reach branchd" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_exec_sees_the_branch_at_the_workspace_path(cli: CLI, ws: Path, daemon) -> None:
    cli("create", "abs1", "-w", str(ws))
    other = Path(cli("create", "abs2", "-w", str(ws)).stdout.strip())
    (other / "secret").write_text("sibling's\n")
    script = (f"pwd; echo written > {ws}/abs.txt; cat {ws}/README; "
              f"ls -A {daemon.mountpoint} | wc -l; ls -A {daemon.state_dir} | wc -l")
    proc = cli("exec", "abs1", "--", "sh", "-c", script)
    # the daemon's mount (the sibling views) and its state are hidden
    assert proc.stdout.splitlines() == [str(ws), "hello", "0", "0"]
    assert not (ws / "abs.txt").exists()
    assert [c["path"] for c in cli.json("diff", "abs1")["changes"]] == ["abs.txt"]
    # started in the same directory of the workspace as the caller
    proc = cli("exec", "abs1", "--", "pwd", cwd=str(ws / "src"))
    assert proc.stdout.strip() == str(ws / "src")


def test_exec_at_branch_path_opts_out(cli: CLI, ws: Path) -> None:
    path = cli("create", "bp1", "-w", str(ws)).stdout.strip()
    proc = cli("exec", "bp1", "--at-branch-path", "--", "sh", "-c",
               f"pwd; echo through > {ws}/abs.txt")
    assert proc.stdout.strip() == path
    assert (ws / "abs.txt").read_text() == "through\n"  # an absolute path reaches the base


def test_commit_refuses_to_overwrite_an_outside_change_unless_forced(cli: CLI, ws: Path) -> None:
    p = Path(cli("create", "o1", "-w", str(ws)).stdout.strip())
    (p / "README").write_text("branch\n")
    (ws / "README").write_text("edited outside\n")
    proc = cli("commit", "o1", check=ExitCode.CONFLICT)
    assert "README" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert (ws / "README").read_text() == "edited outside\n"
    assert (p / "README").read_text() == "branch\n"
    cli("commit", "o1", "--force")
    assert (ws / "README").read_text() == "branch\n"


MMAP_READER = """
import mmap, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    print(m[:].decode(), end="", flush=True)   # fault the pages in
    sys.stdin.readline()                       # ... the sibling commits meanwhile
    print(m[:].decode(), end="", flush=True)
"""


def test_mmap_in_an_invalidated_branch_never_reads_the_new_parent(cli: CLI, ws: Path) -> None:
    (ws / "mapped").write_text("base data\n")
    loser = Path(cli("create", "mm1", "-w", str(ws)).stdout.strip())
    winner = Path(cli("create", "mm2", "-w", str(ws)).stdout.strip())
    (winner / "mapped").write_text("new parent\n")
    with subprocess.Popen([sys.executable, "-c", MMAP_READER, str(loser / "mapped")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as reader:
        try:
            assert reader.stdout is not None and reader.stdin is not None
            assert reader.stdout.readline() == "base data\n"
            cli("commit", "mm2")
            reader.stdin.write("go\n")
            reader.stdin.flush()
            rest = reader.stdout.read()
            reader.wait(30)
        finally:
            if reader.poll() is None:
                reader.kill()
    # the loser's mapping shows its own data, or the access fails (SIGBUS): never the new file
    assert "new parent" not in rest
    assert rest == "base data\n" or reader.returncode != 0
    assert (ws / "mapped").read_text() == "new parent\n"


def test_shell_is_an_interactive_shell_in_the_branch_at_the_workspace_path(
        cli: CLI, ws: Path) -> None:
    branch = Path(cli("create", "sh1", "-w", str(ws)).stdout.strip())
    env = {**cli.env, "SHELL": "/bin/sh"}
    proc = subprocess.run([sys.executable, "-m", "branching.cli", "shell", "sh1"], env=env,
                          input="pwd\necho typed > t.txt\nexit 3\n", capture_output=True,
                          text=True, timeout=60, cwd=str(ws / "src"))
    assert proc.returncode == 3, proc.stderr
    assert str(ws / "src") in proc.stdout.splitlines()  # where the caller stood, in the branch
    assert (branch / "src" / "t.txt").read_text() == "typed\n"
    assert not (ws / "src" / "t.txt").exists()


def test_runs_get_the_open_file_limit_the_daemon_had_before_raising_its_own(
        ws: Path, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the daemon
    try:
        (tmp_path / "d").mkdir()
        d = EmbeddedDaemon(tmp_path / "d").start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert d.proc is not None
        with open(f"/proc/{d.proc.pid}/limits") as f:
            daemon_soft = next(int(line.split()[3]) for line in f if "open files" in line)
        assert daemon_soft == hard  # raised for its own connections
        cli = CLI(d.socket)
        cli("create", "fd1", "-w", str(ws))
        assert cli("exec", "fd1", "--", "sh", "-c", "ulimit -n").stdout.strip() == "256"
    finally:
        d.stop()
