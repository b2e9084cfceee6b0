"""Killing a branch's processes is never silent: each way a run ends has its own ``ended_by``.

Each test runs ``branchctl exec NAME --json -- CMD`` as a user would (its own
process, its own connection), ends the run the way under test from another
client, and reads what ``exec`` said: its exit code, the result's ``ended_by``
in its JSON, and the one line on stderr that names who killed the run (none
when the command ended by itself).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from branching import EmbeddedDaemon
from branching.client import Client
from daemon import protocol

from .conftest import CLI

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

HOG = "x = 'x' * (512 << 20); print('allocated')"


class Exec:
    """One ``branchctl exec --json`` in the background."""

    def __init__(self, cli: CLI, name: str, ws: Path, argv: list[str],
                 opts: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "branching.cli", "exec", name, "-w", str(ws), "--json",
             *opts, "--", *argv],
            env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.run = ""  # its id, once finished

    def finish(self) -> tuple[int, dict[str, Any], str]:
        """Its exit code, the run's result and what it wrote on stderr."""
        out, err = self.proc.communicate(timeout=60)
        assert out.strip(), (self.proc.returncode, err)
        reply = json.loads(out[out.index("{"):])  # the command's own output comes first
        self.run = reply["run"]
        return self.proc.returncode, reply["result"], err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def client(daemon: EmbeddedDaemon) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        yield c


@pytest.fixture
def execs() -> Iterator[list[Exec]]:
    started: list[Exec] = []
    yield started
    for e in started:  # a failed test leaves no branchctl behind
        e.kill()


def start(cli: CLI, execs: list[Exec], client: Client, name: str, ws: Path,
          argv: list[str] | None = None, *opts: str) -> tuple[Exec, str]:
    """``exec`` of *argv* (default ``sleep 60``) in branch *name*, once its run is running."""
    e = Exec(cli, name, ws, argv or ["sleep", "60"], opts)
    execs.append(e)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        runs = client.call("info", workspace=str(ws), name=name)["runs"]
        live = [r["run"] for r in runs if "result" not in r]
        if live:
            return e, live[0]
        assert e.proc.poll() is None, e.proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no run started in {name}")


def killed_line(err: str, run: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"branchctl: run {run} ")]


def test_commit_of_its_branch(cli: CLI, ws: Path, client: Client, execs: list[Exec]) -> None:
    cli("create", "kc", "-w", str(ws))
    e, run = start(cli, execs, client, "kc", ws)
    cli("commit", "kc", "-w", str(ws))
    rc, result, err = e.finish()
    assert result["ended_by"] == "commit" and result["killed"], result
    assert rc == 137
    assert killed_line(err, run) == [f"branchctl: run {run} {protocol.ENDED_BY['commit']}"]


def test_discard(cli: CLI, ws: Path, client: Client, execs: list[Exec]) -> None:
    cli("create", "kd", "-w", str(ws))
    e, run = start(cli, execs, client, "kd", ws)
    cli("discard", "kd", "-w", str(ws))
    rc, result, err = e.finish()
    assert result["ended_by"] == "discard" and result["killed"], result
    assert rc == 137
    assert killed_line(err, run) == [f"branchctl: run {run} killed: its branch was discarded"]


def test_kill_op(cli: CLI, ws: Path, client: Client, execs: list[Exec]) -> None:
    cli("create", "kk", "-w", str(ws))
    e, run = start(cli, execs, client, "kk", ws)
    client.call("kill", run=run)
    rc, result, err = e.finish()
    assert result["ended_by"] == "kill" and result["killed"], result
    assert rc == 137
    assert killed_line(err, run) == [f"branchctl: run {run} killed on request"]


def test_timeout(cli: CLI, ws: Path, client: Client, execs: list[Exec]) -> None:
    cli("create", "kt", "-w", str(ws))
    e, run = start(cli, execs, client, "kt", ws, None, "--timeout", "1")
    rc, result, err = e.finish()
    assert result["ended_by"] == "timeout" and result["timed_out"], result
    assert not result["killed"] and rc == 124
    assert killed_line(err, run) == [f"branchctl: run {run} timed out after 1s and was killed"]


def test_oom(cli: CLI, ws: Path, client: Client, execs: list[Exec]) -> None:
    cli("create", "ko", "-w", str(ws))
    # not start(): killed within milliseconds, the run may be over before it is seen
    e = Exec(cli, "ko", ws, [sys.executable, "-c", HOG], ("--memory", "32M"))
    execs.append(e)
    rc, result, err = e.finish()
    run = e.run
    unenforced = [w for w in client.call("status")["cgroup_warnings"]
                  if w.startswith("memory limit cannot be enforced")]
    if unenforced:
        pytest.skip(unenforced[0])
    assert result["ended_by"] == "oom" and result["oom_killed"], result
    assert not result["killed"] and rc == 137
    assert killed_line(err, run) == [
        f"branchctl: run {run} killed by the kernel for memory (OOM)"]


def test_sibling_commit_invalidates(cli: CLI, ws: Path, client: Client,
                                    execs: list[Exec]) -> None:
    for n in ("ki1", "ki2"):
        cli("create", n, "-w", str(ws), "--on-sibling-commit", "invalidate")
    e, run = start(cli, execs, client, "ki2", ws)
    assert cli.json("commit", "ki1", "-w", str(ws))["invalidated"] == ["ki2"]
    rc, result, err = e.finish()
    assert result["ended_by"] == "invalidated" and result["killed"], result
    assert rc == 137
    assert killed_line(err, run) == [
        f"branchctl: run {run} killed: a sibling's commit invalidated its branch"]


def test_exit_on_its_own(cli: CLI, ws: Path, client: Client, execs: list[Exec]) -> None:
    cli("create", "kx", "-w", str(ws))
    # waits until seen running, so that start() finds it
    e, run = start(cli, execs, client, "kx", ws,
                   ["sh", "-c", f"while [ ! -e {ws.parent}/go ]; do sleep 0.05; done; exit 3"])
    (ws.parent / "go").write_text("")  # not in the branch: see tests/daemon/test_siblings.py
    rc, result, err = e.finish()
    assert result["ended_by"] == "exit" and not result["killed"], result
    assert rc == 3 and killed_line(err, run) == []


def test_signal_nobody_in_branchd_sent(cli: CLI, ws: Path, client: Client,
                                       execs: list[Exec]) -> None:
    cli("create", "ks", "-w", str(ws))
    e, run = start(cli, execs, client, "ks", ws,
                   ["sh", "-c",
                    f"while [ ! -e {ws.parent}/go ]; do sleep 0.05; done; kill -TERM $$"])
    (ws.parent / "go").write_text("")  # not in the branch: see tests/daemon/test_siblings.py
    rc, result, err = e.finish()
    assert result["ended_by"] == "signal" and not result["killed"], result
    assert result["signal"] == 15 and rc == 128 + 15
    assert killed_line(err, run) == []


def test_a_run_of_another_branch_is_not_touched(cli: CLI, ws: Path, client: Client,
                                                execs: list[Exec]) -> None:
    """The reason belongs to the branch that ended: a bystander's run goes on."""
    cli("create", "kb1", "-w", str(ws))
    cli("create", "kb2", "-w", str(ws))
    e, run = start(cli, execs, client, "kb2", ws)
    cli("discard", "kb1", "-w", str(ws))
    time.sleep(0.2)
    assert e.proc.poll() is None
    client.call("kill", run=run)
    assert e.finish()[1]["ended_by"] == "kill"



def test_the_client_going_away(daemon: EmbeddedDaemon, ws: Path, cli: CLI,
                               client: Client) -> None:
    cli("create", "kg", "-w", str(ws))
    with Client(daemon.socket) as gone, gone.connection() as c:  # the run belongs to it
        run = c.call("exec", workspace=str(ws), name="kg", argv=["sleep", "60"])["run"]
    result = client.call("wait", run=run)["result"]
    assert result["ended_by"] == "detached" and result["killed"], result
