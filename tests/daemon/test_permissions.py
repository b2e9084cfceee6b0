"""Who may do what (the trust issue): every op of the protocol, asked by an outside user.

A root daemon started with ``--allow-uid 65534`` and a socket that user can reach,
on both backends. Root has a workspace of its own (0755: uid 65534 may read it, not
write it) with a branch carrying metadata and a run; uid 65534 has a workspace of
theirs in which root keeps a 0600 file, a directory of its own, and a branch with
a run. The outside user is a stdlib socket client (the system's python3 under
``setpriv``: the venv's interpreter is out of their reach). protocol.OPS declares a
permission per op; the table here says what each op must answer that user, and
must cover exactly the protocol's ops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from branching import Client, EmbeddedDaemon
from daemon import protocol

from .conftest import passable_dir

pytestmark = [
    pytest.mark.mount, pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv")
                       or not os.access("/usr/bin/python3", os.X_OK),
                       reason="needs root, setpriv and a system python uid 65534 may run"),
]

NOBODY = 65534
SECRET = "root's secret\n"
ASK = r"""
import json, socket, sys
out = []
for op, args in json.load(sys.stdin):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)  # a wait that is let through would block: say so instead
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    f.write(b'{"id":1,"op":"hello","args":{"version":1}}\n')
    f.write(json.dumps({"id": 2, "op": op, "args": args}).encode() + b"\n")
    f.flush()
    try:
        json.loads(f.readline())
        out.append(json.loads(f.readline()))
    except (TimeoutError, socket.timeout):
        out.append({"ok": True, "result": {"blocked": True}})
    s.close()
print(json.dumps(out))
"""


@dataclass
class World:
    daemon: EmbeddedDaemon
    top: Path
    root_ws: Path  # root's, 0755
    theirs: Path  # uid 65534's, holding root's secret and root's directory sys/
    roots: dict[str, Any]  # root's branch in root_ws (with meta and a run)
    root_run: str
    rootb: dict[str, Any]  # root's branch in theirs (with a run)
    rootb_run: str


def nobody(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], input=stdin, capture_output=True,
                          text=True, timeout=200, cwd="/")


def ask(world: World, *requests: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each request on its own connection of uid 65534; the responses."""
    proc = nobody("/usr/bin/python3", "-I", "-c", ASK, str(world.daemon.socket),
                  stdin=json.dumps(requests))
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def ask1(world: World, op: str, **args: Any) -> dict[str, Any]:
    return ask(world, (op, args))[0]


@pytest.fixture(scope="module", params=["fuse", "overlay"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    with passable_dir("branchd-perm-") as top:
        root_ws, theirs = top / "rootws", top / "theirs"
        root_ws.mkdir(mode=0o755)
        (root_ws / "f").write_text("root's\n")
        theirs.mkdir()
        (theirs / "mine").write_text("mine\n")
        (theirs / "secret").write_text(SECRET)
        (theirs / "secret").chmod(0o600)
        (theirs / "sys").mkdir(mode=0o755)
        (theirs / "sys" / "conf").write_text("root's conf\n")
        os.chown(theirs, NOBODY, NOBODY)
        os.chown(theirs / "mine", NOBODY, NOBODY)
        (top / "daemon").mkdir(mode=0o755)
        d = EmbeddedDaemon(top / "daemon", args=["--allow-uid", str(NOBODY), "--socket-mode",
                                                 "0666", "--backend", request.param])
        try:
            d.start()
            with Client(d.socket) as c:
                c.call("workspace-add", path=str(root_ws), name="rootws")
                c.call("workspace-add", path=str(theirs), name="theirs")
                roots = c.call("create", name="roots", workspace="rootws", meta={"kv": "root's"})
                run = c.call("exec", name="roots", workspace="rootws", argv=["sleep", "300"],
                             detach=True)["run"]
                rootb = c.call("create", name="rootb", workspace="theirs")
                runb = c.call("exec", name="rootb", workspace="theirs", argv=["sleep", "300"],
                              detach=True)["run"]
            yield World(d, top, root_ws, theirs, roots, run, rootb, runb)
        finally:
            d.stop()


def roots_(**more: Any) -> dict[str, Any]:
    return {"name": "roots", "workspace": "rootws", **more}


# op -> (its arguments, given the world; the error code uid 65534 must get, None: ok)
OUTSIDER: dict[str, tuple[Any, str | None]] = {
    "hello": (lambda w: {"version": protocol.VERSION}, None),
    "status": (lambda w: {}, None),
    "workspace-add": (lambda w: {"path": str(w.root_ws)}, "permission"),
    "workspace-list": (lambda w: {}, None),
    "workspace-remove": (lambda w: {"workspace": "rootws", "force": True}, "permission"),
    "create": (lambda w: {"name": "sneak", "workspace": "rootws"}, "permission"),
    "list": (lambda w: {"workspace": "rootws"}, "permission"),
    "info": (lambda w: roots_(), "permission"),
    "set-meta": (lambda w: roots_(meta={"kv": "nobody's"}), "permission"),
    "diff": (lambda w: roots_(patch=True), "permission"),
    "commit": (lambda w: roots_(), "permission"),
    "discard": (lambda w: roots_(), "permission"),
    "rebase": (lambda w: roots_(), "permission"),
    "resolve": (lambda w: roots_(path="x", how="ours"), "permission"),
    "exec": (lambda w: roots_(argv=["true"]), "permission"),
    "wait": (lambda w: {"run": w.root_run}, "permission"),
    "kill": (lambda w: {"run": w.root_run}, "permission"),
    "fsck": (lambda w: {"repair": True}, "permission"),
    "shutdown": (lambda w: {}, "permission"),
    "session-end": (lambda w: {"discard": True}, None),  # ends their own connection's only
}


def test_every_op_declares_a_permission_and_is_tested_here() -> None:
    assert set(OUTSIDER) == set(protocol.OPS)
    assert {op.permission for op in protocol.OPS.values()} <= set(protocol.PERMISSIONS)
    from daemon.handlers import HANDLERS
    assert set(HANDLERS) == set(protocol.OPS)


def test_every_op_as_an_outside_user_against_roots_things(world: World) -> None:
    ops = list(OUTSIDER)
    answers = ask(world, *[(op, OUTSIDER[op][0](world)) for op in ops])
    for op, answer in zip(ops, answers, strict=True):
        want = OUTSIDER[op][1]
        if want is None:
            assert answer["ok"], (op, answer)
        else:
            assert not answer["ok"] and answer["error"]["code"] == want, (op, answer)
            assert protocol.ERROR_EXIT[want] == protocol.ExitCode.PERMISSION
    got = dict(zip(ops, answers, strict=True))
    status = got["status"]["result"]
    assert status["runs_active"] == 0 and status["recovered"] == []
    assert status["workspaces"] == 1 and status["branches"] == 1  # theirs and rootb
    assert [w["name"] for w in got["workspace-list"]["result"]["workspaces"]] == ["theirs"]
    # nothing of root's changed: the branch, its metadata (a KV handle), its run, the daemon
    with Client(world.daemon.socket) as c:
        info = c.call("info", **roots_())
        assert info["status"] == "active" and info["meta"] == {"kv": "root's"}
        assert [r["run"] for r in info["runs"] if "result" not in r] == [world.root_run]
        names = {b["name"] for b in c.call("list")["branches"]}
        assert "sneak" not in names and {"roots", "rootb"} <= names
        assert c.call("status")["pid"] == world.daemon.proc.pid  # type: ignore[union-attr]


def test_roots_branch_is_no_parent_for_an_outside_user(world: World) -> None:
    answer = ask1(world, "create", name="sneak2", parent="roots", workspace="rootws")
    assert answer["error"]["code"] == "permission", answer


def test_in_a_shared_workspace_roots_runs_stay_roots(world: World) -> None:
    """uid 65534 may use the workspace and root's branch in it, but not see, wait for or
    kill root's run there; their own runs are theirs to wait for and kill."""
    b = {"name": "rootb", "workspace": "theirs"}
    info, wait, kill, listed = ask(world, ("info", b), ("wait", {"run": world.rootb_run}),
                                   ("kill", {"run": world.rootb_run}), ("list", {}))
    assert info["ok"] and info["result"]["runs"] == [], info
    assert wait["error"]["code"] == "permission" and kill["error"]["code"] == "permission"
    assert [x["name"] for x in listed["result"]["branches"]] == ["rootb"]
    own = {"name": "theirs-own", "workspace": "theirs"}
    assert ask1(world, "create", **own)["ok"]
    run = ask1(world, "exec", **own, argv=["sleep", "300"], detach=True)
    assert run["ok"], run
    mine = run["result"]["run"]
    info, status, kill, wait = ask(world, ("info", own), ("status", {}), ("kill", {"run": mine}),
                                   ("wait", {"run": mine}))
    assert [r["run"] for r in info["result"]["runs"]] == [mine]
    assert status["result"]["runs_active"] == 1
    assert kill["ok"] and wait["ok"] and "result" in wait["result"], (kill, wait)
    with Client(world.daemon.socket) as c:
        runs = {r["run"]: r for r in c.call("info", **b)["runs"]}
    assert world.rootb_run in runs and "result" not in runs[world.rootb_run]  # still running


def test_no_workspace_on_a_directory_the_user_cannot_write(world: World) -> None:
    hidden = world.top / "hidden"  # 0700 root's: what is inside is out of their reach,
    (hidden / "open").mkdir(parents=True)  # even a directory of mode 0777
    hidden.chmod(0o700)
    (hidden / "open").chmod(0o777)
    answers = ask(world, ("workspace-add", {"path": str(world.root_ws)}),
                  ("workspace-add", {"path": str(hidden / "open")}),
                  ("workspace-add", {"path": str(hidden / "absent")}),  # no oracle either
                  ("workspace-add", {"path": "/etc"}))
    for a in answers:
        assert not a["ok"] and a["error"]["code"] == "permission", a
    with Client(world.daemon.socket) as c:
        bases = {w["base"] for w in c.call("workspace-list")["workspaces"]}
    assert bases == {str(world.root_ws), str(world.theirs)}
    mine = world.top / "mine"
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    assert ask1(world, "workspace-add", path=str(mine), name="mine")["ok"]


def test_a_branch_reads_no_file_the_base_would_not_let_them_read(world: World) -> None:
    made = ask1(world, "create", name="reader", workspace="theirs")
    assert made["ok"], made
    for path in (made["result"]["path"], world.rootb["path"]):  # theirs, and root's
        read = nobody("cat", f"{path}/secret")
        assert read.returncode != 0 and "Permission denied" in read.stderr, (path, read)
        assert nobody("cat", f"{path}/mine").stdout == "mine\n"
        assert Path(path, "secret").read_text() == SECRET  # root still reads it
    assert ask1(world, "discard", name="reader", workspace="theirs")["ok"]


def test_no_commit_into_a_directory_the_user_could_not_write(world: World) -> None:
    # in their own branch the kernel refuses the write in root's directory ...
    made = ask1(world, "create", name="writer", workspace="theirs")
    path = made["result"]["path"]
    write = nobody("sh", "-c", f"echo x > {path}/sys/new || exit 9; echo x > {path}/mine")
    assert write.returncode == 9 and "Permission denied" in write.stderr, write
    assert nobody("sh", "-c", f"echo x > {path}/sys/conf").returncode != 0
    # ... and a branch of root's, written there by root, is not theirs to commit
    with Client(world.daemon.socket) as c:
        p = c.call("create", name="rootw", workspace="theirs")["path"]
    Path(p, "sys", "new").write_text("root's new\n")
    answer = ask1(world, "commit", name="rootw", workspace="theirs")
    assert answer["error"]["code"] == "permission", answer
    assert not (world.theirs / "sys" / "new").exists()
    with Client(world.daemon.socket) as c:
        assert c.call("info", name="rootw", workspace="theirs")["status"] == "active"
        c.call("discard", name="rootw", workspace="theirs")
    # what they could write themselves, they commit
    made = nobody("sh", "-c", f"echo changed > {path}/mine && mkdir -p {path}/new/deeper && "
                  f"echo x > {path}/new/deeper/x && rm {path}/secret")  # theirs to remove
    assert made.returncode == 0, made.stderr
    done = ask1(world, "commit", name="writer", workspace="theirs")
    assert done["ok"], done
    assert (world.theirs / "mine").read_text() == "changed\n"
    assert (world.theirs / "new" / "deeper" / "x").read_text() == "x\n"
    assert not (world.theirs / "secret").exists()
    (world.theirs / "secret").write_text(SECRET)  # for the tests after this one
    (world.theirs / "secret").chmod(0o600)
    assert sorted(os.listdir(world.theirs / "sys")) == ["conf"]


def test_a_branch_named_alone_is_looked_for_in_their_workspaces_only(world: World) -> None:
    """Root's workspaces are not named to them, not even as making a name ambiguous."""
    (world.top / "hidden").mkdir(mode=0o700, exist_ok=True)
    with Client(world.daemon.socket) as c:
        c.call("create", name="dup", workspace="rootws")
    try:
        assert ask1(world, "create", name="dup", workspace="theirs")["ok"]
        dup, roots, by_path, hidden = ask(
            world, ("info", {"name": "dup"}), ("info", {"name": "roots"}),
            ("info", {"name": "roots", "workspace": str(world.root_ws)}),
            ("list", {"workspace": str(world.top / "hidden" / "absent")}))
        assert dup["ok"] and dup["result"]["workspace"] == "theirs", dup
        assert roots["error"]["code"] == "permission", roots
        assert "rootws" not in roots["error"]["message"]
        assert by_path["error"]["code"] == "permission", by_path
        assert hidden["error"]["code"] == "permission", hidden  # not whether it exists
    finally:
        with Client(world.daemon.socket) as c:
            c.call("discard", name="dup", workspace="rootws")
            c.call("discard", name="dup", workspace="theirs")


def test_in_a_shared_workspace_roots_branch_is_roots_to_change(world: World) -> None:
    """uid 65534 may use the workspace, so it may read root's branch there (info, diff),
    but not run in it, change its metadata, rebase, resolve, commit or discard it, nor
    discard it by removing the workspace; its own branch there is its to do all that."""
    b = {"name": "rootb", "workspace": "theirs"}
    refused = ask(world, ("set-meta", {**b, "meta": {"kv": "nobody's"}}),
                  ("exec", {**b, "argv": ["true"]}), ("rebase", b),
                  ("resolve", {**b, "path": "x", "how": "ours"}), ("commit", b),
                  ("discard", b), ("workspace-remove", {"workspace": "theirs", "force": True}))
    for answer in refused:
        assert not answer["ok"] and answer["error"]["code"] == "permission", answer
        assert "uid 0's" in answer["error"]["message"]
    info, diff = ask(world, ("info", b), ("diff", b))
    assert info["ok"] and diff["ok"], (info, diff)
    with Client(world.daemon.socket) as c:
        assert c.call("info", **b)["status"] == "active" and c.call("info", **b)["meta"] == {}
    own = {"name": "theirs-own2", "workspace": "theirs"}
    made, meta, rebase, commit = ask(world, ("create", own),
                                     ("set-meta", {**own, "meta": {"kv": "mine"}}),
                                     ("rebase", own), ("commit", own))
    assert all(a["ok"] for a in (made, meta, rebase, commit)), (made, meta, rebase, commit)
    assert made["result"]["owner"] == NOBODY
