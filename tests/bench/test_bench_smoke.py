"""The benchmark at tiny sizes: it runs end to end on every backend this machine has, and
what it writes is complete and checked. No timing is asserted anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import agent, scenarios, trees
from bench.backends import OverlayBackend, apply_upper, overlay_unavailable
from bench.branchd_backend import ApiWorkspace, CliWorkspace, WrongBackend
from bench.profiling import top_functions
from branching import Client, EmbeddedDaemon

ROOT = Path(__file__).resolve().parents[2]


def _mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory whose mounts are lazily detached whatever the test did."""
    yield tmp_path
    for mnt in reversed(_mounted_under(tmp_path)):
        subprocess.run(["umount", "-l", mnt], check=False)


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_run_is_complete(scratch: Path) -> None:
    out = scratch / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--mode", "tiny", "--json", str(out),
         "--dir", str(scratch / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _mounted_under(scratch), "the benchmark left mounts behind"
    assert list((scratch / "work").iterdir()) == [], "the benchmark left files behind"
    doc = json.loads(out.read_text())
    assert doc["mode"] == "tiny" and doc["scaled_down"]
    assert doc["machine"]["filesystem"] and doc["machine"]["cores"] >= 1
    expected = {"native"}
    kernel_overlay = overlay_unavailable(scratch / "probe") is None
    if kernel_overlay:
        expected.add("overlay")
    if Path("/dev/fuse").exists():
        expected |= {"branchd", "branchd-cli"}
        if kernel_overlay:  # the fast path: its daemon runs with --backend overlay
            expected.add("branchd-overlay")
    measured = {(r["backend"], r["scenario"]) for r in doc["rows"]}
    for backend in expected:
        wanted = ({"branch create", "commit", "discard after changes", "run `true` in a branch"}
                  if backend == "branchd-cli" else
                  {"branch create", "commit", "discard after changes", "inside: stat",
                   "inside: cold seq read", "agent workload", "parallel branches"})
        if backend == "branchd":  # the control rows: a daemon's own, on its FUSE column
            wanted |= {"control: branchctl list", "control: API list"}
        missing = {s for s in wanted if (backend, s) not in measured}
        assert not missing, f"{backend} lacks rows {missing}; notes: {doc['notes']}"
    for row in doc["rows"]:
        assert row["error"] is None, row
        assert row["samples"] and all(s > 0 for s in row["samples"]), row
        if row["backend"].startswith("branchd") and row["scenario"] == "branch create":
            assert any("served by the column's backend" in c for c in row["checks"]), row
    targets = {t["target"]: t for t in doc["targets"]}
    fast = [t for text, t in targets.items() if text.startswith("fast path:")]
    assert fast and "branch create" in proc.stdout
    if "branchd-overlay" in expected:
        assert all(t["value"] is not None for t in fast), fast


@pytest.mark.mount
def test_a_branch_served_by_another_backend_fails_its_row(daemon: EmbeddedDaemon,
                                                          tmp_path: Path) -> None:
    """The check that keeps a column honest: the shared daemon serves one backend (overlay
    where it can, as root; FUSE otherwise), and a column expecting the other one fails."""
    with Client(daemon.socket) as client:
        served = client.call("status")["backend"]
    other = "fuse" if served == "overlay" else "overlay"
    base = trees.make_base(tmp_path / "base", 3)
    for kind in (ApiWorkspace, CliWorkspace):
        right = kind(base, daemon, served)
        try:
            right.create_verified("right")
        finally:
            right.close()
        wrong = kind(base, daemon, other)
        try:
            with pytest.raises(WrongBackend, match=f"served by '{served}', not '{other}'"):
                wrong.create_verified("wrong")
        finally:
            wrong.close()


def test_agent_workload_detects_a_wrong_result(tmp_path: Path) -> None:
    """The agent workload's checks fail on a tree that does not match its own edits."""
    tarball = trees.make_agent_tarball(tmp_path, 6)
    branch = tmp_path / "branch"
    branch.mkdir()
    times = agent.run(branch, tarball, 6, 2, tmp_path)
    assert set(times) == {*agent.STEPS, "total"}
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    # one edit more than the workload makes: git status and grep must notice
    (tmp_path / "extra").mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(tmp_path / "extra")], check=True)
    with open(tmp_path / "extra" / trees.module_path(5), "a") as f:
        f.write(trees.EDIT_MARKER + "\n")
    bad = tmp_path / "bad.tar"
    subprocess.run(["tar", "-cf", str(bad), "-C", str(tmp_path / "extra"), "."], check=True)
    with pytest.raises(agent.WorkloadError):
        agent.run(wrong, bad, 6, 2, tmp_path)


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlayfs needs root")
def test_overlay_commit_matches_the_merged_view(scratch: Path) -> None:
    """The overlayfs baseline's commit leaves the base as the branch showed it."""
    if why := overlay_unavailable(scratch / "probe"):
        pytest.skip(why)
    base = trees.make_base(scratch / "base", 250)
    ws = OverlayBackend().workspace(base)
    try:
        branch = ws.create("b")
        (branch / "new.txt").write_text("new\n")
        (branch / trees.base_file(3)[0]).write_text("changed\n")
        (branch / trees.base_file(4)[0]).unlink()
        (branch / "d0001" / "f000150.txt").rename(branch / "moved.txt")
        subprocess.run(["rm", "-rf", str(branch / "d0002")], check=True)
        (branch / "d0002").mkdir()  # an opaque directory replacing a deleted one
        (branch / "d0002" / "only.txt").write_text("only\n")
        view = _snapshot(branch)
        ws.commit("b")
        assert _snapshot(base) == view
    finally:
        ws.close()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(root.rglob("*"))}


def test_apply_upper_merges_plain_directories(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "keep").write_text("keep")
    (lower / "d" / "old").write_text("old")
    (upper / "d").mkdir(parents=True)
    (upper / "d" / "old").write_text("new")
    apply_upper(upper, lower)
    assert (lower / "d" / "keep").read_text() == "keep"
    assert (lower / "d" / "old").read_text() == "new"


def test_top_functions_reads_collapsed_stacks(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("main (a.py:1);lookup (branchfs/view.py:10) 30\n"
                    "main (a.py:1);lookup (branchfs/view.py:12);stat (os.py:3) 10\n"
                    "main (a.py:2);read (branchfs/fs.py:40) 60\n"
                    "main (a.py:2);EpollIOManager.get_events (trio/_core/_io_epoll.py:9) 50\n")
    text = top_functions(path)
    assert text.startswith("100 busy samples (and 50 idle")
    own, inclusive = text.split("inclusive")
    assert own.index("read (branchfs/fs.py)") < own.index("lookup (branchfs/view.py)")
    assert own.index("lookup (branchfs/view.py)") < own.index("stat (os.py)")
    assert "  60.0%  read (branchfs/fs.py)" in own
    assert "  40.0%  lookup (branchfs/view.py)" in inclusive
    assert "main (a.py)" not in inclusive and "get_events" not in text


def test_fmt_bytes_and_labels() -> None:
    assert scenarios.fmt_bytes(1 << 30) == "1 GiB" and scenarios.fmt_bytes(3000) == "3000 B"
    assert scenarios.files_label(1) == "1 file" and scenarios.files_label(10) == "10 files"
