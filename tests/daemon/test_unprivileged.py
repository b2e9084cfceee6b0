"""An unprivileged daemon (uid 65534, embedded as in a notebook): runs see their branch at
the workspace's path through a user namespace.

The whole scenario runs as uid 65534 with the interpreter an ordinary user has
(``user_python``, built by tests/run.sh) and /dev/fuse at its usual mode: a
driver script makes the project (venv + editable install), opens a Workspace
(which starts an embedded daemon as that user), races a breaking and a good
candidate, makes a venv inside a branch and commits it, and runs callables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

NOBODY = 65534
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
    out["lib"] = (root / "src/mylib/__init__.py").read_text()
    out["venv2_check"] = subprocess.run([root / ".venv2/bin/mylib-check"]).returncode
    print(json.dumps(out))
    """)


@pytest.fixture
def top() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="branchd-unpriv-"))
    os.chown(d, NOBODY, NOBODY)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


def test_an_unprivileged_daemon_runs_candidates_at_the_workspace_path(
        top: Path, user_python: str) -> None:
    here = Path(__file__).parent
    shutil.copy(here / "project.py", top / "project.py")
    (top / "driver.py").write_text(DRIVER)
    env = {"PATH": os.defpath, "HOME": str(top), "XDG_RUNTIME_DIR": str(top),
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         user_python, str(top / "driver.py"), str(top)],
        env=env, capture_output=True, text=True, timeout=280, cwd=str(top))
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
    with open("/proc/self/mounts") as f:
        assert str(top) not in f.read()  # the embedded daemon unmounted everything
