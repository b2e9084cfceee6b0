"""An unprivileged daemon (uid 65534, embedded as in a notebook): runs see their branch at
the workspace's path through a user namespace, with limits and the whole-tree kill.

The whole scenario runs as uid 65534 with what an ordinary user's machine gives
it: the interpreter (``user_python``, built by tests/run.sh), /dev/fuse at its
usual mode, and a cgroup subtree of its own in every hierarchy, as systemd's
user@.service (Delegate=yes) gives a logged-in user. A driver script makes the
project (venv + editable install), opens a Workspace (which starts an embedded
daemon as that user), races a breaking and a good candidate, makes a venv
inside a branch and commits it, runs callables, and checks a memory limit and
the kill of a process that left its session.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from tests.daemon.conftest import run_as_nobody

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from project import candidates, editable_script, make_project
    from branching import Speculate, Workspace

    top = Path(sys.argv[1])
    root = make_project(top / "proj", sys.executable)
    out = {}
    with Workspace(root) as ws:
        out["status"] = ws.client.call("status")
        outcome = Speculate(candidates(root), first_wins=False)(ws)
        out["winner"] = outcome.winner.label if outcome.winner else None
        out["break_ok"] = outcome.candidates[0].success
        with ws.branch("venv2") as b:
            r = b.run(editable_script(".venv2", sys.executable), cwd=root)
            out["venv2"] = r.ok, r.stderr[-500:]
            out["in_branch"] = b.run(["pwd"], cwd=root).stdout.strip()
            out["hidden"] = b.run(["sh", "-c", f"ls -A {ws.mountpoint} | wc -l"]).stdout.strip()
        n = 2
        outcome = Speculate([lambda p: n == 3, lambda p: (p / "cb.txt").write_text("cb")
                             and p == root], first_wins=False)(ws)
        out["callable"] = outcome.winner.index if outcome.winner else None
        env = {**os.environ, "BRANCHD_SOCKET": str(ws.client.socket_path)}
        cli = [sys.executable, "-m", "branching.cli", "speculate", "-w", str(root), "--in-order"]
        lib = root / "src/mylib/__init__.py"
        cli += ["-c", f"sed -i 's/a + b/a - b/' {lib} && {root}/.venv/bin/mylib-check",
                "-c", f"echo '# cli' >> {lib} && {root}/.venv/bin/mylib-check"]
        out["cli"] = subprocess.run(cli, env=env, capture_output=True, text=True).returncode
        with ws.branch("limits", on_success="abort") as b:
            from cgroups import Limits
            hog = b.run([sys.executable, "-c", "x = bytearray(400 << 20)"],
                        limits=Limits(memory="64M"))
            out["oom"] = hog.oom_killed
            # a process that leaves its session (setsid) dies with the run's tree
            r = b.run(["sh", "-c", f"setsid sleep 300 & echo $! > {top}/escaped; exit 0"],
                      at_branch_path=True)
            out["escaped"] = int((top / "escaped").read_text())
    out["lib"] = (root / "src/mylib/__init__.py").read_text()
    out["venv2_check"] = subprocess.run([root / ".venv2/bin/mylib-check"]).returncode
    try:  # a zombie (killed, not yet reaped by init) is not alive
        with open(f"/proc/{out['escaped']}/stat") as f:
            out["escaped_alive"] = f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        out["escaped_alive"] = False
    print(json.dumps(out))
    """)


def test_an_unprivileged_daemon_runs_candidates_at_the_workspace_path(
        nobody_top: Path, user_python: str, delegated: list[str]) -> None:
    top = nobody_top
    shutil.copy(Path(__file__).parent / "project.py", top / "project.py")
    proc = run_as_nobody(DRIVER, top, user_python, delegated)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    root = top / "proj"
    assert out["status"]["runs_at"].startswith("workspace path (unprivileged: a user"), out
    assert out["winner"] == "good" and out["break_ok"] is False
    assert out["venv2"][0], out["venv2"]
    assert out["in_branch"] == str(root) and out["hidden"] == "0"
    assert out["callable"] == 1
    assert out["cli"] == 0
    assert "a + b" in out["lib"] and "# reviewed" in out["lib"] and "# cli" in out["lib"]
    assert out["venv2_check"] == 0  # a venv made in a branch works in the base after commit
    assert out["oom"] is True  # the memory limit holds for an unprivileged daemon's run
    assert out["escaped_alive"] is False  # and so does the whole-tree kill
    assert out["status"]["cgroup_warnings"] == [], out["status"]
    with open("/proc/self/mounts") as f:
        assert str(top) not in f.read()  # the embedded daemon unmounted everything
