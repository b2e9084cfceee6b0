"""FUSE server processes (``daemon/fuseprocs.py``): each active branch of a root daemon on
the FUSE backend is served by a process of its own, mounted on the branch's own path.

Real daemons, real mounts, real processes: a control request is answered while a
server process is stopped (SIGSTOP) and after it died; the branch keeps its path
and its data through a restart; writes through a parent branch reach a child
branch served by another process; a daemon killed with SIGKILL leaves no server
process behind, and the next daemon no mount.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from branching.client import Client
from branching.errors import BranchError

pytestmark = [
    pytest.mark.mount, pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="server processes mount as root only"),
]


@pytest.fixture
def fused(tmp_path: Path) -> Iterator[tuple[EmbeddedDaemon, Client]]:
    root = tmp_path / "d"
    root.mkdir()
    d = EmbeddedDaemon(root, args=["--backend", "fuse"])
    d.start()
    try:
        with Client(d.socket) as c:
            yield d, c
    finally:
        d.stop()


def served(c: Client, name: str, other_than: int | None = None) -> dict:
    """The branch's info once a server process (not *other_than*) has mounted it."""
    deadline = time.monotonic() + 30
    while True:
        info = c.call("info", workspace="proj", name=name)
        if info["server_pid"] not in (None, other_than):
            return info
        assert time.monotonic() < deadline, f"no server process mounted {name}: {info}"
        time.sleep(0.05)


def fuse_mount_at(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path and line.split()[2].startswith("fuse")
                   for line in f)


def server_processes(daemon_pid: int) -> set[int]:
    """The fork server the daemon started and every server process it forked."""
    parents: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if b"branchfs.child" in argv:
            parents[int(pid)] = ppid
    out = {p for p, pp in parents.items() if pp == daemon_pid}
    return out | {p for p, pp in parents.items() if pp in out}


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def add(c: Client, proj: Path) -> None:
    c.call("workspace-add", path=str(proj), name="proj")


def test_a_branch_keeps_its_path_and_is_served_by_its_own_process(
        fused: tuple[EmbeddedDaemon, Client], proj: Path) -> None:
    d, c = fused
    add(c, proj)
    made = c.call("create", workspace="proj", name="b1")
    assert made["path"] == str(d.mountpoint / "proj" / "b1")
    info = served(c, "b1")
    assert info["path"] == made["path"] and info["backend"] == "fuse"
    assert info["server_pid"] in server_processes(d.proc.pid)
    assert fuse_mount_at(made["path"])
    p = Path(made["path"])
    assert (p / "f").read_text() == "base\n"
    (p / "f").write_text("one\n")
    (p / "new").write_text("n\n")
    assert sorted(os.listdir(p)) == ["f", "new"]
    assert c.call("diff", workspace="proj", name="b1")["total"] == 2
    c.call("commit", workspace="proj", name="b1")
    assert (proj / "f").read_text() == "one\n" and (proj / "new").read_text() == "n\n"
    assert not fuse_mount_at(made["path"])
    pid = info["server_pid"]
    deadline = time.monotonic() + 10
    while not gone(pid):  # its mount detached and unused: the kernel ended its session
        assert time.monotonic() < deadline, "the server of a committed branch lives on"
        time.sleep(0.05)


def test_control_requests_are_answered_while_a_server_is_stopped(
        fused: tuple[EmbeddedDaemon, Client], proj: Path) -> None:
    d, c = fused
    add(c, proj)
    c.call("create", workspace="proj", name="b1")
    pid = served(c, "b1")["server_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        for op, args in (("list", {}), ("info", {"workspace": "proj", "name": "b1"}),
                         ("status", {}), ("create", {"workspace": "proj", "name": "b2"})):
            t = time.monotonic()
            c.call(op, **args)
            assert time.monotonic() - t < 2, f"{op} waited for the stopped server"
        # a commit of its sibling needs it to hold still first: refused, not hung
        with pytest.raises(BranchError, match="did not hold still"):
            c.call("commit", workspace="proj", name="b2")  # after QUIESCE_TIMEOUT
        t = time.monotonic()
        c.call("list")
        assert time.monotonic() - t < 2
    finally:
        os.kill(pid, signal.SIGCONT)
    (Path(served(c, "b2")["path"]) / "two").write_text("2\n")
    c.call("commit", workspace="proj", name="b2")
    (Path(served(c, "b1")["path"]) / "f").write_text("after\n")
    assert served(c, "b1")["server_pid"] == pid  # the same process went on
    c.call("commit", workspace="proj", name="b1")
    assert (proj / "f").read_text() == "after\n" and (proj / "two").read_text() == "2\n"


@pytest.mark.daemon_log_allows(r"the FUSE server of proj/b1 \(pid \d+\) died")
def test_a_dead_server_is_replaced_and_the_branch_keeps_its_data(
        fused: tuple[EmbeddedDaemon, Client], proj: Path) -> None:
    d, c = fused
    add(c, proj)
    made = c.call("create", workspace="proj", name="b1")
    p = Path(made["path"])
    first = served(c, "b1")["server_pid"]
    (p / "f").write_text("kept\n")
    os.kill(first, signal.SIGKILL)
    assert c.call("list")["branches"][0]["name"] == "b1"  # answered at once
    again = served(c, "b1", other_than=first)
    assert again["path"] == made["path"]
    assert (p / "f").read_text() == "kept\n"
    (p / "g").write_text("g\n")
    c.call("commit", workspace="proj", name="b1")
    assert (proj / "f").read_text() == "kept\n" and (proj / "g").read_text() == "g\n"


@pytest.mark.daemon_log_allows(r"the FUSE fork server \(pid \d+\) ended",
                               r"the FUSE server of proj/b1 \(pid \d+\) died")
def test_a_dead_fork_server_is_replaced_with_the_servers_it_took_along(
        fused: tuple[EmbeddedDaemon, Client], proj: Path) -> None:
    d, c = fused
    add(c, proj)
    p = Path(c.call("create", workspace="proj", name="b1")["path"])
    first = served(c, "b1")["server_pid"]
    (p / "f").write_text("kept\n")
    with open(f"/proc/{first}/stat") as f:
        forker = int(f.read().rsplit(")", 1)[1].split()[1])
    os.kill(forker, signal.SIGKILL)  # its server processes die with it (PDEATHSIG)
    again = served(c, "b1", other_than=first)
    assert gone(first) and again["server_pid"] in server_processes(d.proc.pid)
    assert (p / "f").read_text() == "kept\n"
    c.call("commit", workspace="proj", name="b1")
    assert (proj / "f").read_text() == "kept\n"


def test_a_parent_branchs_writes_reach_its_child_served_by_another_process(
        fused: tuple[EmbeddedDaemon, Client], proj: Path) -> None:
    d, c = fused
    add(c, proj)
    parent = Path(c.call("create", workspace="proj", name="up")["path"])
    (parent / "f").write_text("parent v1\n")
    kid = Path(c.call("create", workspace="proj", name="down", parent="up")["path"])
    assert served(c, "up")["server_pid"] != served(c, "down")["server_pid"]
    assert (kid / "f").read_text() == "parent v1\n"
    os.stat(kid / "f")
    (parent / "f").write_text("parent v2, longer\n")
    (parent / "g").write_text("g\n")
    assert (kid / "f").read_text() == "parent v2, longer\n"
    assert (kid / "g").read_text() == "g\n"
    (kid / "mine").write_text("kid\n")
    c.call("commit", workspace="proj", name="down")  # into up, served by its own process
    assert (parent / "mine").read_text() == "kid\n"
    c.call("discard", workspace="proj", name="up")
    assert not fuse_mount_at(str(parent))


def test_sigkill_of_the_daemon_leaves_no_server_process_and_no_mount(
        tmp_path: Path, proj: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    d = EmbeddedDaemon(root, args=["--backend", "fuse"])
    d.start()
    try:
        with Client(d.socket) as c:
            add(c, proj)
            for n in ("k1", "k2"):
                c.call("create", workspace="proj", name=n)
                served(c, n)
        assert d.proc is not None
        servers = server_processes(d.proc.pid)
        assert len(servers) >= 4  # the fork server, two branches and the spare
        d.proc.kill()
        d.proc.wait()
        deadline = time.monotonic() + 10
        while not all(gone(p) for p in servers):
            assert time.monotonic() < deadline, "server processes outlived the daemon"
            time.sleep(0.05)
    finally:
        d.stop()
    again = EmbeddedDaemon(root, args=["--backend", "fuse"])
    again.start()  # detaches the dead mounts
    try:
        with Client(again.socket) as c:
            path = served(c, "k1")["path"]
            assert (Path(path) / "f").read_text() == "base\n"
    finally:
        again.stop()
    with open("/proc/self/mounts") as f:
        assert str(root) not in f.read()
