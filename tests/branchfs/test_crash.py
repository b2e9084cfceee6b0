"""Unit tier: a commit killed (SIGKILL, for real) at every step, then the Store
reopened: the target is all-old or all-new, never a mix, and the branch
statuses agree with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bfs_helpers import tree, w

from branchfs import Store, commit
from branchfs.view import View

REPO = Path(__file__).parent.parent.parent
CHILD = """
import sys
from branchfs import Store
s = Store(sys.argv[1])
s.commit("ws", sys.argv[2])
s.close()
"""


def scenario(tmp: Path, nested: bool) -> tuple[Store, str]:
    base = tmp / "base"
    (base / "d" / "sub").mkdir(parents=True)
    (base / "a").write_text("a")
    (base / "d" / "f").write_text("f")
    (base / "d" / "sub" / "g").write_text("g")
    (base / "gone").write_text("gone")
    s = Store(tmp / "state")
    s.add_workspace(str(base), name="ws")
    name = "b"
    if nested:
        s.create_branch("ws", "p")
        w(s.view("ws", "p"), "from-p", b"p")
        s.create_branch("ws", name, parent="p")
    else:
        s.create_branch("ws", name)
        s.create_branch("ws", "sibling", on_sibling_commit="invalidate")
    v = s.view("ws", name)
    w(v, "a", b"new a")
    v.unlink(("gone",))
    v.mkdir(("n",), 0o750)
    w(v, "n/x", b"x")
    v.rename(("d", "sub"), ("moved",))
    v.symlink(("ln",), "/etc/passwd")
    v.chmod(("d",), 0o700)
    w(v, "d/h", b"h")
    return s, name


def observed(tmp: Path, s: Store, nested: bool) -> object:
    if not nested:
        return tree(tmp / "base")
    v: View = s.view("ws", "p")
    return sorted((n, e.st.st_mode) for n, e in v.listdir(()).items()), tree(tmp / "base")


def crash_points(tmp: Path, nested: bool) -> list[str]:
    s, name = scenario(tmp, nested)
    r = s._recs[s.branch("ws", name).id]
    n = len(commit.plan(s._dir_fds[r.id][0], s._parent_view(r), not nested))
    s.close()
    return ["journal-tmp", "journal", *(f"step:{i}" for i in range(1, n + 1)), "steps", "state"]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("nested", [False, True], ids=["into-base", "into-parent"])
def test_kill_at_every_step(tmp_path: Path, nested: bool) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    s, name = scenario(ref, nested)
    old = observed(ref, s, nested)
    s.commit("ws", name)
    new = observed(ref, s, nested)
    s.close()
    assert old != new
    count = tmp_path / "count"
    count.mkdir()
    points = crash_points(count, nested)
    outcomes = {}
    for point in points:
        d = tmp_path / point.replace(":", "-")
        d.mkdir()
        s, name = scenario(d, nested)
        s.close()
        env = dict(os.environ, BRANCHFS_CRASH_AT=point, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-c", CHILD, str(d / "state"), name], env=env,
                              capture_output=True)
        assert proc.returncode == -9, (point, proc.stderr.decode())
        s = Store(d / "state")
        try:
            got = observed(d, s, nested)
            status = s.branch("ws", name).status
            if got == old:
                outcomes[point] = "old"
                assert status == "active"
                if not nested:
                    assert s.branch("ws", "sibling").status == "active"
            else:
                assert got == new, point
                outcomes[point] = "new"
                assert status == "committed" and len(s.recovered) == 1
                if not nested:
                    assert s.branch("ws", "sibling").status == "invalidated"
            assert os.listdir(d / "state" / "journal") == []
            if nested:  # records the parent took over (journal replay included) hold
                s.commit("ws", "p" if got == new else name)
        finally:
            s.close()
    assert outcomes["journal-tmp"] == "old"
    assert all(v == "new" for k, v in outcomes.items() if k != "journal-tmp"), outcomes
