"""branchctl's rough edges a new user met: options after the command, nested and
ambiguous workspaces, what ``list --all`` and ``--progress`` print, and the
message when no daemon runs."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from branching.cli import cli as root
from daemon.protocol import ExitCode

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]


def _commands(group: click.Group, ctx: click.Context,
              path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        out.append(((*path, name), cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, click.Context(cmd, parent=ctx, info_name=name), (*path, name))
    return out


COMMANDS = _commands(root, click.Context(root, info_name="branchctl"))
# what prints data, and so takes --json
NO_DATA = {("serve",), ("mcp",), ("workspace",)}


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_every_command_takes_socket_after_its_name(path: tuple[str, ...], tmp_path: Path) -> None:
    cli = CLI(tmp_path / "unused.sock")
    helptext = cli(*path, "--help").stdout
    assert "--socket" in helptext
    if path not in NO_DATA:
        assert "--json" in helptext


def test_socket_after_the_command_is_used(cli: CLI, ws: Path, tmp_path: Path) -> None:
    wrong = CLI(tmp_path / "none.sock")
    socket = cli.env["BRANCHD_SOCKET"]
    wrong("create", "sock1", "-w", str(ws), "--socket", socket)
    names = {b["name"] for b in wrong.json("list", "--socket", socket)["branches"]}
    assert "sock1" in names
    listed = wrong.json("workspace", "list", "--socket", socket)["workspaces"]
    assert any(w["base"] == str(ws) for w in listed)
    wrong("exec", "sock1", "--socket", socket, "--", "true")
    wrong("discard", "sock1", "--socket", socket)


def test_no_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    proc = CLI(tmp_path / "none.sock")("list", check=ExitCode.UNAVAILABLE)
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "branchctl serve" in proc.stderr and "systemctl start branchd" in proc.stderr
    assert "BRANCHD_SOCKET" in proc.stderr


def test_run_names_its_branch_run(cli: CLI, ws: Path) -> None:
    out = json.loads(cli("run", "-w", str(ws), "--json", "--", "touch", "ran").stdout)
    branch = out["candidates"][0]["branch"]
    assert branch.startswith("run-") and out["winner_branch"] == branch
    assert (ws / "ran").exists()


def test_progress_lines_are_not_wrapped_when_stderr_is_a_pipe(cli: CLI, ws: Path) -> None:
    long = "true " + " ".join(f"word{i}" for i in range(60))  # far past 80 columns
    proc = cli("speculate", "-w", str(ws), "--progress", "-c", long)
    running = [line for line in proc.stderr.splitlines() if "running" in line]
    assert running == [f"… #1 {long}: running"], proc.stderr


def test_list_all_shows_no_backend_for_ended_branches(cli: CLI, ws: Path) -> None:
    backend = cli.json("status")["backend"]
    for name in ("end1", "end2", "end3"):
        cli("create", name, "-w", str(ws), "--on-sibling-commit", "invalidate")
    (Path(cli.json("info", "end1")["path"]) / "f").write_text("one\n")
    cli("commit", "end1")  # end2 and end3 become invalidated
    cli("discard", "end2")
    cli("create", "end4", "-w", str(ws))
    listed = {b["name"]: b for b in cli.json("list", "-w", str(ws), "--all")["branches"]}
    assert {n: listed[n]["backend"] for n in ("end1", "end2", "end3", "end4")} == {
        "end1": None, "end2": None, "end3": None, "end4": backend}
    rows = {line.split()[0]: line.split() for line in
            cli("list", "-w", str(ws), "--all").stdout.splitlines()[1:]}
    assert rows["end1"][4] == rows["end2"][4] == rows["end3"][4] == "-"
    assert rows["end4"][4] == backend


def test_a_workspace_inside_or_around_another_is_refused(cli: CLI, ws: Path) -> None:
    cli("create", "nest1", "-w", str(ws))
    for nested in (ws / "src", ws.parent):
        proc = cli("create", "nest2", "-w", str(nested), check=ExitCode.USAGE)
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
        assert f"registered workspace {ws}" in proc.stderr and "use that one" in proc.stderr
        proc = cli("workspace", "add", str(nested), check=ExitCode.USAGE)
    bases = [w["base"] for w in cli.json("workspace", "list")["workspaces"]]
    assert str(ws / "src") not in bases and str(ws.parent) not in bases
    assert [b["name"] for b in cli.json("list", "-w", str(ws))["branches"]] == ["nest1"]


def test_an_ambiguous_name_means_the_workspace_the_caller_stands_in(
        cli: CLI, ws: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "deep").mkdir(parents=True)
    one = Path(cli("create", "amb", "-w", str(ws)).stdout.strip())
    two = Path(cli("create", "amb", "-w", str(other)).stdout.strip())
    assert cli("info", "amb", check=ExitCode.CONFLICT, cwd=str(tmp_path)).stderr.count(
        "ambiguous") == 1
    assert cli.json("info", "amb", cwd=str(ws / "src"))["base"] == str(ws)
    assert cli.json("info", "amb", cwd=str(other / "deep"))["base"] == str(other)
    assert cli.json("info", "amb", cwd=str(one / "src"))["base"] == str(ws)
    assert cli.json("info", "amb", cwd=str(two))["base"] == str(other)
    assert cli("exec", "amb", "--", "pwd", cwd=str(ws / "src")).stdout.strip() == str(ws / "src")
    kid = cli.json("create", "amb-kid", "--from", "amb", cwd=str(other))
    assert kid["parent"] == "amb" and kid["base"] == str(other)
    cli("discard", "amb", cwd=str(other))
    assert cli.json("info", "amb")["base"] == str(ws)  # no longer ambiguous
    (one / "touched").write_text("x\n")
    cli("commit", "amb", cwd=str(ws))
    assert (ws / "touched").read_text() == "x\n"
