"""What only the kernel overlay backend has: its mounts, its xattrs, its restarts.

Each test starts its own daemon with ``--backend overlay`` (skipped where a
probe overlay mount fails: not root). The behaviour both backends share is
tested by the daemon-level suites, run once per backend.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchfs import fs, overlay
from branching import BranchError, EmbeddedDaemon, Workspace
from daemon.protocol import ExitCode

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

NOBODY = 65534


def _probe() -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        return overlay.probe(os.path.join(tmp, "probe"))


if os.geteuid() != 0 or (_why := _probe()) is not None:
    pytest.skip("no kernel overlay mounts here", allow_module_level=True)


def overlays_below(root: Path) -> set[str]:
    return set(overlay.mounted_below(str(root)))


def overlay_ids_below(root: Path) -> dict[int, str]:
    """Mount id -> mount point of the overlays below *root*."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4]
            if fields[fields.index("-") + 1] == "overlay" and point.startswith(f"{root}/"):
                out[int(fields[0])] = point
    return out


def kernel_xattrs(top: Path) -> list[str]:
    """Every ``user.overlay.*`` xattr in the tree at *top* (the directory itself too)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            found += [f"{p}: {x}" for x in os.listxattr(p, follow_symlinks=False)
                      if x.startswith("user.overlay.")]
    return found


@pytest.fixture
def base(tmp_path: Path) -> Path:
    b = tmp_path / "proj"
    (b / "src" / "deep").mkdir(parents=True)
    (b / "README").write_text("hello\n")
    (b / "src" / "app.py").write_text("print('v1')\n")
    (b / "src" / "deep" / "x").write_text("x\n")
    return b


@pytest.fixture
def daemon_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "d"
    root.mkdir()
    yield root
    left = overlays_below(root)
    for m in sorted(left, reverse=True):
        overlay.detach(m)
    assert not left, f"overlays left behind: {left}"


@pytest.fixture
def od(daemon_root: Path) -> Iterator[EmbeddedDaemon]:
    d = EmbeddedDaemon(daemon_root, args=["--backend", "overlay"]).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def ws(od: EmbeddedDaemon, base: Path) -> Iterator[Workspace]:
    with Workspace(base, daemon=od) as w:
        yield w


def test_no_overlay_xattr_reaches_the_base_or_a_parent(od: EmbeddedDaemon, ws: Workspace,
                                                       base: Path) -> None:
    b = ws.create("top")
    assert b.backend == "overlay"
    (b.path / "README").write_text("top\n")  # a copy-up: origin xattr
    (b.path / "src" / "deep" / "x").write_text("y\n")  # copied-up directories: origin, impure
    (b.path / "src" / "new").mkdir()
    (b.path / "src" / "new" / "f").write_text("f\n")
    os.unlink(b.path / "src" / "app.py")  # a whiteout
    kid = b.create("kid")
    (kid.path / "src" / "deep" / "x").write_text("kid\n")
    (kid.path / "src" / "new" / "g").write_text("g\n")
    (kid.path / "kid-only").mkdir()
    assert kernel_xattrs(kid.path) == []  # never visible through the mount
    kid.commit()
    parent_upper = od.state_dir / "branches" / b.id / "upper"
    for x in kernel_xattrs(parent_upper):
        # the parent's own overlay marks its own upper dir; the child's must not be there
        assert x.split(": ")[1] in ("user.overlay.origin", "user.overlay.impure",
                                    "user.overlay.uuid"), x
    b.commit()
    assert kernel_xattrs(base) == []
    assert (base / "src" / "deep" / "x").read_text() == "kid\n"
    assert (base / "src" / "new" / "g").read_text() == "g\n"
    assert not (base / "src" / "app.py").exists()
    assert (base / "kid-only").is_dir()


def test_parent_shows_a_child_commit_at_once(od: EmbeddedDaemon, ws: Workspace) -> None:
    parent = ws.create("p")
    (parent.path / "README").write_text("parent\n")
    assert sorted(os.listdir(parent.path / "src")) == ["app.py", "deep"]  # cached by the kernel
    kid = parent.create("k")
    (kid.path / "src" / "from-kid").write_text("kid\n")
    (kid.path / "README").write_text("kid\n")
    kid.commit()
    assert parent.backend == "overlay"
    assert sorted(os.listdir(parent.path / "src")) == ["app.py", "deep", "from-kid"]
    assert (parent.path / "README").read_text() == "kid\n"
    assert overlays_below(od.mountpoint) == {str(parent.path)}


def test_a_process_in_a_remounted_parent_keeps_working(od: EmbeddedDaemon, ws: Workspace,
                                                        base: Path) -> None:
    """Its working directory is in the detached overlay; the new one must not take the
    workdir that overlay copies up in."""
    parent = ws.create("busy")
    proc = subprocess.Popen(["sh", "-c", "read go && echo more >> README && cat README"],
                            cwd=parent.path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        kid = parent.create("busy-kid")
        (kid.path / "from-kid").write_text("kid\n")
        kid.commit()  # the parent's overlay is mounted afresh
        out, _ = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out == "hello\nmore\n"
    assert (parent.path / "README").read_text() == "hello\nmore\n"  # same upper dir
    assert (base / "README").read_text() == "hello\n"


def test_an_overlay_detached_behind_the_daemon_is_mounted_again(od: EmbeddedDaemon,
                                                                ws: Workspace) -> None:
    """As the kernel does when the name it sits on is invalidated: the daemon sees the
    mount table change and mounts the branch again, with no request to prompt it."""
    b = ws.create("knocked")
    (b.path / "mine").write_text("kept\n")
    assert overlay.detach(str(b.path))
    # bounded by the test timeout; the mount shows in the table a moment before the
    # daemon's worker thread hands it back and the daemon records it as the branch's
    while str(b.path) not in overlays_below(od.mountpoint) or b.backend != "overlay":
        time.sleep(0.01)
    assert (b.path / "mine").read_text() == "kept\n"


def test_discard_detaches_the_branch_and_its_children(od: EmbeddedDaemon, ws: Workspace) -> None:
    a = ws.create("a")
    a.create("a-kid")
    other = ws.create("other")
    assert len(overlays_below(od.mountpoint)) == 3
    a.abort()
    assert overlays_below(od.mountpoint) == {str(other.path)}


def test_a_child_sees_what_its_parent_writes_after_the_fork(ws: Workspace) -> None:
    """Names the child has not looked at yet (docs/format.md: cached ones may not)."""
    parent = ws.create("wp")
    kid = parent.create("wk")
    (parent.path / "later").write_text("later\n")
    (parent.path / "src" / "deep" / "x").write_text("parent\n")
    assert (kid.path / "later").read_text() == "later\n"
    assert (kid.path / "src" / "deep" / "x").read_text() == "parent\n"


def test_a_lower_directory_rename_is_exdev_and_mv_copies(ws: Workspace, base: Path) -> None:
    """docs/format.md, Directory renames: no redirect_dir, so EXDEV for a
    directory with lower content (to a new name or into another directory);
    one made in the branch renames; mv copies (new inode numbers)."""
    b = ws.create("mv")
    (b.path / "fresh").mkdir()
    (b.path / "fresh" / "f").write_text("f\n")
    os.rename(b.path / "fresh", b.path / "made")
    for src, dst in (("src", "moved"), ("src/deep", "made/deep")):
        with pytest.raises(OSError) as err:
            os.rename(b.path / src, b.path / dst)
        assert err.value.errno == errno.EXDEV
    ino = os.stat(b.path / "src" / "deep" / "x").st_ino
    subprocess.run(["mv", str(b.path / "src"), str(b.path / "moved")], check=True)
    assert (b.path / "moved" / "deep" / "x").read_text() == "x\n"
    assert os.stat(b.path / "moved" / "deep" / "x").st_ino != ino
    assert not (b.path / "src").exists()
    b.commit()
    assert sorted(os.listdir(base)) == ["README", "made", "moved"]
    assert kernel_xattrs(base) == []


@pytest.mark.slow
def test_the_mount_outlives_the_entry_timeout(od: EmbeddedDaemon, ws: Workspace) -> None:
    """The kernel detaches a mount whose mountpoint's dentry is invalidated; the FUSE
    side must answer the revalidation of a branch's name with the same inode."""
    b = ws.create("lasting")
    ws.create("neighbour").abort()  # invalidates names next to it
    time.sleep(fs.ENTRY_TIMEOUT + 1)
    assert os.listdir(b.path)  # revalidates the name through the FUSE mount
    assert overlays_below(od.mountpoint) == {str(b.path)}
    assert b.backend == "overlay"


def test_restart_after_sigkill_mounts_the_active_branches_again(daemon_root: Path,
                                                               base: Path) -> None:
    first = EmbeddedDaemon(daemon_root, args=["--backend", "overlay"]).start()
    second = EmbeddedDaemon(daemon_root, args=["--backend", "overlay"])
    try:
        with Workspace(base, daemon=first) as ws:
            keep = ws.create("keep")
            (keep.path / "data").write_text("precious\n")
            keep.create("kid")
            ws.create("gone").abort()
        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        stale = overlay_ids_below(daemon_root)  # on the dead FUSE mount, until it goes
        assert len(stale) == 2
        second.start()  # detaches the dead FUSE mount, and the overlays with it
        with Workspace(base, daemon=second) as ws:
            branches = {b.name: b for b in ws.branches()}
            assert set(branches) == {"keep", "kid"}
            assert {b.backend for b in branches.values()} == {"overlay"}
            # one overlay per branch: the stale ones left with the dead FUSE mount
            # (mount ids are reused, so the count is what tells)
            now = overlay_ids_below(daemon_root)
            assert sorted(now.values()) == sorted(str(b.path) for b in branches.values())
            assert (branches["kid"].path / "data").read_text() == "precious\n"
            branches["kid"].commit()
            branches["keep"].commit()
            assert (base / "data").read_text() == "precious\n"
        second.stop()
        assert overlays_below(daemon_root) == set()  # SIGTERM detached them
    finally:
        second.stop()
        first.stop()


def test_commit_refuses_an_outside_change_to_a_kernel_copy_up(od: EmbeddedDaemon, ws: Workspace,
                                                              base: Path) -> None:
    b = ws.create("oc")
    (base / "README").write_text("changed outside\n")
    (b.path / "README").write_text("branch\n")
    (b.path / "other").write_text("new\n")
    with pytest.raises(BranchError) as err:
        b.commit()
    assert err.value.code == "conflict" and "README" in str(err.value)
    assert b.backend == "overlay"  # still the user's, served again
    (b.path / "more").write_text("after the refusal\n")
    b.commit(force=True)
    assert (base / "README").read_text() == "branch\n"
    assert (base / "more").read_text() == "after the refusal\n"


def test_unchanged_base_commits_and_the_documented_false_positive(od: EmbeddedDaemon, ws: Workspace,
                                                                  base: Path) -> None:
    b = ws.create("fp")
    (b.path / "src" / "app.py").write_text("branch\n")
    b.commit()  # the base did not change: no conflict
    b2 = ws.create("fp2")
    (base / "README").write_text("outside, before the branch looked\n")
    assert (b2.path / "README").read_text().startswith("outside")  # the branch saw it
    (b2.path / "README").write_text("branch\n")
    with pytest.raises(BranchError):  # conservative: changed after the branch began
        b2.commit()


def test_an_open_file_of_a_committed_branch_is_the_committed_file(od: EmbeddedDaemon,
                                                                  ws: Workspace,
                                                                  base: Path) -> None:
    """Unlike FUSE (ESTALE), a descriptor held across the commit keeps its inode, which
    the commit moved into the base: reads show the committed data, and writes change
    the base (docs/format.md says so; commit kills the branch's runs first)."""
    b = ws.create("held")
    (b.path / "README").write_text("branch\n")
    fd = os.open(b.path / "README", os.O_RDWR)
    try:
        b.commit()
        assert os.pread(fd, 100, 0) == b"branch\n"
        os.pwrite(fd, b"B", 0)
        assert (base / "README").read_text() == "Branch\n"
    finally:
        os.close(fd)


def test_an_open_file_of_a_discarded_branch_still_reads(ws: Workspace, base: Path) -> None:
    b = ws.create("dropped")
    (b.path / "README").write_text("dropped\n")
    with open(b.path / "README") as held:
        b.abort()
        assert held.read() == "dropped\n"  # in no directory any more (FUSE: ESTALE)
    assert (base / "README").read_text() == "hello\n"


def _nobody_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="branchd-nobody-"))
    root.chmod(0o755)
    for sub in ("d", "proj"):
        (root / sub).mkdir()
        os.chown(root / sub, NOBODY, NOBODY)
    return root


def _as_nobody(root: Path, *args: str) -> list[str]:
    d = root / "d"
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-m", "daemon.main", "--state-dir", str(d / "state"),
            "--mountpoint", str(d / "mnt"), "--socket", str(d / "sock"), *args]


def test_overlay_asked_for_where_it_cannot_work_is_one_line_exit_5() -> None:
    root = _nobody_dir()
    try:
        proc = subprocess.run(_as_nobody(root, "--backend", "overlay"), capture_output=True,
                              text=True, timeout=60, env={**os.environ, "BRANCHD_BACKEND": ""},
                              cwd="/")
        assert proc.returncode == ExitCode.UNAVAILABLE, proc.stderr
        assert proc.stderr.splitlines()[-1].startswith(
            "branchd: error: the overlay backend cannot work here")
        assert not overlays_below(root)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def test_auto_chooses_fuse_where_no_overlay_can_be_mounted() -> None:
    """The daemon's choice, made by a process that may not mount (uid 65534: this
    host's /dev/fuse is root's only, so a whole daemon as nobody cannot start)."""
    root = _nobody_dir()
    code = ("import sys; from pathlib import Path; from daemon.overlays import choose; "
            "print(*choose('auto', Path(sys.argv[1])), sep='\\n')")
    try:
        proc = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-c", code, str(root / "d")],
            capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parents[2]),
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        assert proc.returncode == 0, proc.stderr
        backend, why = proc.stdout.splitlines()
        assert backend == "fuse"
        assert why.startswith("no kernel overlay here") and "not permitted" in why
        assert os.listdir(root / "d") == []  # the probe cleaned up after itself
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def test_options_that_would_not_fit_one_mount_call_are_refused() -> None:
    assert overlay.options(3, 4, [5, 6]).endswith(",lowerdir=/proc/self/fd/5:/proc/self/fd/6")
    with pytest.raises(OSError) as err:  # mount(2) would cut them and mount read-only
        overlay.options(3, 4, list(range(100, 400)))
    assert err.value.errno == errno.E2BIG


@pytest.mark.slow
def test_a_chain_too_deep_for_one_overlay_stays_on_fuse(ws: Workspace) -> None:
    b = ws.create("lvl0")
    depth = 0
    while b.backend == "overlay":
        depth += 1
        b = b.create(f"lvl{depth}")
    assert depth > 100  # every level that fits is served by the kernel
    assert (b.path / "README").read_text() == "hello\n"
    (b.path / "deepest").write_text("fuse\n")
    b.commit()
    # the parent is as deep as fits: remounted, or on FUSE too; the commit shows either way
    assert (ws.get(f"lvl{depth - 1}").path / "deepest").read_text() == "fuse\n"
