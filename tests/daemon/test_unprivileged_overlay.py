"""An unprivileged daemon's runs get their branch from a kernel overlay in their own
namespace, over the same delta the FUSE mount serves (daemon/runs.py).

Each scenario is a driver script run as uid 65534 (``run_as_nobody``), with an
embedded daemon as in a notebook; it prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import NOBODY, passable_dir, run_as_nobody

pytestmark = [pytest.mark.mount, pytest.mark.timeout(200)]

COHERENCE = textwrap.dedent("""
    import json, os, sys, threading, time
    from pathlib import Path
    from branching import Workspace

    top = Path(sys.argv[1])
    root = top / "proj"
    root.mkdir()
    (root / "f").write_text("base\\n")
    (root / "g").write_text("base g\\n")
    out = {}
    with Workspace(root) as ws:
        b = ws.create("b1")
        p = b.path
        out["before"] = (p / "f").read_text(), (p / "g").read_text()  # cached by FUSE
        # the run waits for the outside to read (and the kernel to cache) its files, writes,
        # waits for the outside's writes, then reads them (flags outside the workspace)
        script = f'''
            grep " {root} " /proc/self/mountinfo | sed 's/.* - //'
            touch {top}/started
            while [ ! -e {top}/cached ]; do sleep 0.02; done
            echo run > f; echo made > fromrun; rm g
            touch {top}/ready
            while [ ! -e {top}/go ]; do sleep 0.02; done
            echo "new=$(cat new)"; echo "f=$(cat f)"
            '''
        res = {}
        t = threading.Thread(target=lambda: res.update(r=b.run(["sh", "-c", script], cwd=root)))
        t.start()

        def wait(flag):
            for _ in range(1000):
                if (top / flag).exists():
                    return
                time.sleep(0.02)

        wait("started")
        out["cached"] = [(p / "f").read_text(), (p / "g").read_text(),
                         (p / "fromrun").exists(), sorted(q.name for q in p.iterdir())]
        (top / "cached").touch()
        wait("ready")
        out["outside"] = [(p / "f").read_text(), (p / "fromrun").read_text(),
                          (p / "g").exists(), sorted(q.name for q in p.iterdir())]
        (p / "new").write_text("outside\\n")
        (p / "f").write_text("outside f\\n")
        (top / "go").touch()
        t.join()
        r = res["r"]
        out["run"] = r.ok, r.stdout.splitlines(), r.stderr
        out["runs"] = b.info["runs"]
        out["served"] = r.served_by, r.served_why
        out["after"] = (p / "f").read_text()
        # a nested branch: its overlay's lowers are its parent's delta, then the base
        c = b.create("c1")
        r = c.run(["sh", "-c", "cat f fromrun; test ! -e g && echo no-g; echo kid > k"],
                  cwd=root)
        out["nested"] = r.stdout, c.info["runs"][0]["served_by"], (c.path / "k").read_text()
        c.commit()
        out["nested_commit"] = (p / "k").read_text()
        # commit while a run is inside: the run is killed first, as on every backend
        res = {}
        t = threading.Thread(target=lambda: res.update(r=b.run(
            ["sh", "-c", f"touch {top}/slept; exec sleep 100"], cwd=root)))
        t.start()
        wait("slept")
        b.commit()
        t.join()
        out["commit"] = res["r"].ended_by, (root / "f").read_text(), (root / "k").read_text()
        out["workdirs"] = [os.listdir(d) for d in top.glob("**/branches/*/work")
                           if os.access(d, os.R_OK)]
    with open("/proc/self/mountinfo") as f:
        out["left"] = [line for line in f if str(top) in line]
    print(json.dumps(out))
    """)


def test_a_run_gets_a_kernel_overlay_coherent_with_the_fuse_view(
        nobody_top: Path, user_python: str, delegated: list[str]) -> None:
    proc = run_as_nobody(COHERENCE, nobody_top, user_python, delegated, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    ok, lines, err = out["run"]
    assert ok, err
    # the workspace path in the run's namespace is an overlay, not the FUSE bind
    assert lines[0].startswith("overlay overlay rw,"), out
    assert "userxattr" in lines[0]
    [run] = out["runs"]
    assert run["served_by"] == "overlay" and "served_why" not in run, run
    assert out["served"] == ["overlay", ""]
    # the run's writes, seen through FUSE at once, though FUSE had f cached
    assert out["before"] == ["base\n", "base g\n"]
    assert out["cached"] == ["base\n", "base g\n", False, ["f", "g"]]
    assert out["outside"] == ["run\n", "made\n", False, ["f", "fromrun"]]
    # the outside's writes through FUSE, seen by the run while it runs
    assert lines[1:] == ["new=outside", "f=outside f"]
    assert out["after"] == "outside f\n"
    assert out["nested"] == ["outside f\nmade\nno-g\n", "overlay", "kid\n"]
    assert out["nested_commit"] == "kid\n"  # the child's delta went into its parent's
    assert out["commit"] == ["commit", "outside f\n", "kid\n"]
    assert all(d == [] for d in out["workdirs"]), out["workdirs"]  # runs' work dirs went
    assert out["left"] == []  # nothing mounted outside, nothing left


FALLBACK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from branching import Workspace

    root = Path((Path(sys.argv[1]) / "base").read_text())
    out = {}
    with Workspace(root) as ws:
        b = ws.create("b1")
        r = b.run(["sh", "-c", f"grep ' {root} ' /proc/self/mountinfo | sed 's/.* - //'; "
                   "cat f; echo run > f"], cwd=root)
        out["run"] = r.ok, r.stdout.splitlines(), r.stderr
        out["runs"] = b.info["runs"]
        out["served"] = r.served_by, r.served_why
        out["f"] = (b.path / "f").read_text()
    print(json.dumps(out))
    """)


@pytest.fixture
def stacked() -> Iterator[Path]:
    """A workspace directory of uid 65534's on an overlay over an overlay (made by root):
    the kernel's stacking limit (two) leaves no room for a run's overlay above it."""
    made: list[Path] = []
    with passable_dir("branchd-stack-") as top:
        try:
            for n in ("l", "u1", "w1", "m1", "u2", "w2", "m2"):
                (top / n).mkdir()
            (top / "l" / "proj").mkdir()
            (top / "l" / "proj" / "f").write_text("base\n")
            os.chown(top / "l" / "proj", NOBODY, NOBODY)
            os.chown(top / "l" / "proj" / "f", NOBODY, NOBODY)
            for lower, n in (("l", "1"), ("m1", "2")):
                subprocess.run(["mount", "-t", "overlay", "stack", "-o",
                                f"lowerdir={top / lower},upperdir={top / f'u{n}'},"
                                f"workdir={top / f'w{n}'}", str(top / f"m{n}")], check=True)
                made.append(top / f"m{n}")
            yield top / "m2" / "proj"
        finally:
            for m in reversed(made):
                subprocess.run(["umount", "-l", str(m)], check=False)


@pytest.mark.root("mounts the workspace's overlay over an overlay itself")
def test_a_run_whose_overlay_the_kernel_refuses_gets_the_fuse_bind(
        nobody_top: Path, stacked: Path, user_python: str, delegated: list[str]) -> None:
    (nobody_top / "base").write_text(str(stacked))
    proc = run_as_nobody(FALLBACK, nobody_top, user_python, delegated, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    ok, lines, err = out["run"]
    assert ok, err
    assert lines[0].startswith("fuse.branchfs "), lines  # the FUSE bind, as before
    assert lines[1] == "base"
    [run] = out["runs"]
    assert run["served_by"] == "fuse"
    assert run["served_why"].startswith(f"the kernel refused an overlay on {stacked} ("), run
    assert out["served"] == ["fuse", run["served_why"]]
    assert out["f"] == "run\n"


TWO_RUNS = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    from branching import Workspace

    top = Path(sys.argv[1])
    root = top / "proj"
    root.mkdir()
    out = {}
    with Workspace(root) as ws:
        b = ws.create("b1")
        res = {}
        first = threading.Thread(target=lambda: res.update(first=b.run(
            ["sh", "-c", f"touch {top}/in; while [ ! -e {top}/done ]; do sleep 0.02; done"],
            cwd=root)))
        first.start()
        for _ in range(1000):
            if (top / "in").exists():
                break
            time.sleep(0.02)
        second = b.run(["sh", "-c", f"echo second > s; touch {top}/done"], cwd=root)
        first.join()
        third = b.run(["true"], cwd=root)
        out["served"] = [(r.served_by, r.served_why) for r in (res["first"], second, third)]
    print(json.dumps(out))
    """)


def test_one_run_of_a_branch_at_a_time_gets_an_overlay(
        nobody_top: Path, user_python: str, delegated: list[str]) -> None:
    """Overlays over one upper dir would not see each other's changes (the kernel warns
    of it): a run that starts while another of its branch has its overlay gets the bind."""
    proc = run_as_nobody(TWO_RUNS, nobody_top, user_python, delegated, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second, third = json.loads(proc.stdout.splitlines()[-1])["served"]
    assert first == ["overlay", ""]
    assert second[0] == "fuse" and second[1].startswith("another run of the branch has its own")
    assert third == ["overlay", ""]  # the first one ended: the next one gets an overlay again
