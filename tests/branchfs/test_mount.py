"""Mount tier: a real FUSE mount served by a subprocess (conftest.Mount). POSIX
behaviour is checked against the same operations on a plain directory; then
commit/discard through the mount, cache invalidation, ESTALE, and real programs."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bfs_helpers import tree

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, exc.errno))


def full_tree(root: Path) -> dict[str, object]:
    """tree() plus link counts, sizes and xattrs."""
    out = dict(tree(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            p = Path(dirpath) / n
            st = p.lstat()
            rel = str(p.relative_to(root))
            x = sorted(os.listxattr(p, follow_symlinks=False)) if not p.is_symlink() else []
            extra = (st.st_nlink if not stat.S_ISDIR(st.st_mode) else None, st.st_size
                     if stat.S_ISREG(st.st_mode) else None, x)
            out[rel] = (out[rel], extra)
    return out


def posix_ops(root: Path) -> list[Any]:
    """A run of ordinary POSIX operations; returns what each one gave."""
    res: list[Any] = []
    add = res.append
    add(outcome(lambda: (root / "new.txt").write_text("one\n")))
    with open(root / "new.txt", "a") as f:
        f.write("two\n")
    add(outcome(lambda: (root / "new.txt").read_text()))
    with open(root / "a", "r+b") as f:
        f.seek(2)
        f.write(b"XY")
        f.truncate(5)
        os.ftruncate(f.fileno(), 4)
    add(outcome(lambda: (root / "a").read_bytes()))
    os.truncate(root / "d" / "f", 2)
    add(outcome(lambda: (root / "d" / "f").read_bytes()))
    with open(root / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"tail")
    add(outcome(lambda: os.stat(root / "sparse").st_size))
    with open(root / "sparse", "rb") as f:
        f.seek((5 << 20) - 2)
        add(f.read())
    add(outcome(lambda: os.mkdir(root / "nd")))
    add(outcome(lambda: os.mkdir(root / "nd")))
    add(outcome(lambda: os.rename(root / "new.txt", root / "a")))  # over an existing file
    add(outcome(lambda: os.rename(root / "d", root / "nd" / "d")))  # dir across dirs
    add(outcome(lambda: os.rmdir(root / "nd")))
    add(outcome(lambda: os.rmdir(root / "nd" / "d" / "f")))
    add(outcome(lambda: os.unlink(root / "nd" / "d")))
    add(outcome(lambda: os.rename(root / "a", root / "empty")))
    add(outcome(lambda: os.rename(root / "empty", root / "a")))
    add(outcome(lambda: os.symlink("a", root / "sl")))
    add(outcome(lambda: os.readlink(root / "sl")))
    add(outcome(lambda: (root / "sl").read_text()))
    add(outcome(lambda: os.symlink("/nonexistent/x", root / "dangling")))
    add(outcome(lambda: os.link(root / "a", root / "nd" / "hl")))
    add(outcome(lambda: os.stat(root / "a").st_nlink))
    add(outcome(lambda: os.rename(root / "nd" / "hl", root / "a")))  # links of one file: no-op
    add(outcome(lambda: sorted(os.listdir(root / "nd"))))
    add(outcome(lambda: os.link(root / "nd" / "hl", root / "hl2")))
    add(outcome(lambda: os.stat(root / "a").st_nlink))
    add(outcome(lambda: os.unlink(root / "hl2")))
    add(outcome(lambda: os.stat(root / "a").st_nlink))
    add(outcome(lambda: os.mkfifo(root / "fifo", 0o640)))
    sock = socket.socket(socket.AF_UNIX)
    add(outcome(lambda: sock.bind(str(root / "sock"))))
    sock.close()
    add(outcome(lambda: os.chmod(root / "a", 0o600)))
    add(outcome(lambda: stat.S_IMODE(os.stat(root / "a").st_mode)))
    add(outcome(lambda: os.chmod(root / "nd", 0o711)))
    add(outcome(lambda: os.utime(root / "a", ns=(1_000_000_000, 3_000_000_000))))
    add(outcome(lambda: os.stat(root / "a").st_mtime_ns))
    add(outcome(lambda: os.setxattr(root / "a", "user.color", b"blue")))
    add(outcome(lambda: os.getxattr(root / "a", "user.color")))
    add(outcome(lambda: os.getxattr(root / "a", "user.none")))
    add(outcome(lambda: os.removexattr(root / "a", "user.color")))
    add(outcome(lambda: os.setxattr(root / "empty", "user.dir", b"1")))
    add(outcome(lambda: os.unlink(root / "a")))
    add(outcome(lambda: (root / "a").write_text("recreated")))  # deleted name recreated
    add(outcome(lambda: os.unlink(root / "missing")))
    add(outcome(lambda: open(root / "empty", "w")))  # noqa: SIM115
    add(outcome(lambda: os.listdir(root / "a")))
    add(outcome(lambda: sorted(os.listdir(root))))
    add(outcome(lambda: sorted(os.listdir(root / "nd"))))
    return res


def test_posix_ops_match_a_plain_directory(mount: Any, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(mount.base, plain, symlinks=True)
    branch = mount.path("b1")
    assert posix_ops(branch) == posix_ops(plain)
    assert full_tree(branch) == full_tree(plain)
    assert sorted(os.listdir(mount.path("b2"))) == ["a", "d", "empty"]  # siblings isolated
    assert tree(mount.base) == tree(mount.path("b2"))


@pytest.mark.parametrize("flags", [1, 2], ids=["noreplace", "exchange"])
def test_renameat2_flags(mount: Any, tmp_path: Path, flags: int) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(mount.base, plain, symlinks=True)
    results = []
    for root in (mount.path("b1"), plain):
        results.append([
            outcome(lambda root=root: renameat2(root / "a", root / "d" / "f", flags)),
            outcome(lambda root=root: renameat2(root / "a", root / "fresh", flags)),
            outcome(lambda root=root: renameat2(root / "d", root / "empty", flags)),
        ])
    assert results[0] == results[1]
    assert full_tree(mount.path("b1")) == full_tree(plain)


def test_inode_numbers_stable(mount: Any) -> None:
    b = mount.path("b1")
    ino = os.stat(b / "a").st_ino
    with open(b / "a", "a") as f:
        f.write("x")
    assert os.stat(b / "a").st_ino == ino
    os.rename(b / "a", b / "d" / "a2")
    assert os.stat(b / "d" / "a2").st_ino == ino
    os.rename(b / "d", b / "dd")
    assert os.stat(b / "dd" / "a2").st_ino == ino
    assert os.stat(mount.path("b2") / "a").st_ino != ino


def test_unlinked_while_open(mount: Any) -> None:
    b = mount.path("b1")
    with open(b / "a", "r+b") as f:
        os.unlink(b / "a")
        assert not (b / "a").exists()
        f.seek(0, os.SEEK_END)
        f.write(b"more")
        f.flush()
        f.seek(0)
        assert f.read() == b"hello\nmore"
        assert os.fstat(f.fileno()).st_size == 10
        (b / "a").write_text("new file")
        assert (b / "a").read_text() == "new file"
        f.seek(0)
        assert f.read() == b"hello\nmore"


def test_fsync_locks_mmap(mount: Any) -> None:
    b = mount.path("b1")
    fd = os.open(b / "a", os.O_RDWR)
    fd2 = os.open(b / "a", os.O_RDWR)
    try:
        os.write(fd, b"HELLO")
        os.fsync(fd)
        os.fdatasync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        code = ("import fcntl,os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\n"
                "try:\n fcntl.lockf(fd,fcntl.LOCK_EX|fcntl.LOCK_NB,1,0)\n"
                "except OSError: sys.exit(3)\n")
        assert subprocess.run([sys.executable, "-c", code, str(b / "a")]).returncode == 3
        m = mmap.mmap(fd, 6)
        m[0:5] = b"mmapd"
        m.flush()
        m.close()
        assert os.pread(fd2, 6, 0) == b"mmapd\n"
    finally:
        os.close(fd)
        os.close(fd2)
    assert (mount.base / "a").read_text() == "hello\n"


def test_permissions_enforced(public_tmp: Path, mount_factory: Any, base: Path) -> None:
    mount = mount_factory(base, ["b1"], where=public_tmp)
    b = mount.path("b1")
    os.chmod(b / "a", 0o600)
    os.chmod(b / "empty", 0o777)
    nobody = 65534

    def as_nobody(script: str) -> int:
        return subprocess.run(["sh", "-c", script], user=nobody, group=nobody, cwd="/",
                              capture_output=True).returncode

    assert as_nobody(f"cat {b / 'a'}") != 0
    assert as_nobody(f"echo x > {b / 'd' / 'x'}") != 0
    assert as_nobody(f"echo x > {b / 'empty' / 'mine'}") == 0
    st = os.stat(b / "empty" / "mine")
    assert (st.st_uid, st.st_gid) == (nobody, nobody)
    assert as_nobody(f"chmod 666 {b / 'a'}") != 0
    assert as_nobody(f"cat {b / 'd' / 'f'}") == 0


def test_statfs(mount: Any) -> None:
    sv = os.statvfs(mount.path("b1"))
    assert sv.f_blocks > 0 and sv.f_bsize > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a device's read-ahead")
def test_read_ahead_raised(mount: Any) -> None:
    from branchfs.mount import READ_AHEAD_KB
    dev = os.stat(mount.mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert int(f.read()) == READ_AHEAD_KB
    data = os.urandom(3 * READ_AHEAD_KB * 1024 + 5)  # read through several windows
    (mount.path("b1") / "big").write_bytes(data)
    assert (mount.path("b1") / "big").read_bytes() == data


# -- commit, discard and the kernel's caches -------------------------------------

def test_no_stale_view_after_nested_commit(mount: Any) -> None:
    mount.cmd("create", name="p")
    mount.cmd("create", name="c", parent="p")
    p, c = mount.path("p"), mount.path("c")
    assert (p / "a").read_text() == "hello\n"  # cache p's view of a
    st_before = os.stat(p / "a")
    (c / "a").write_text("changed by c, longer\n")
    (c / "newdir").mkdir()
    (c / "newdir" / "f").write_text("f")
    os.unlink(c / "d" / "f")
    assert (p / "a").read_text() == "hello\n"
    assert not (p / "newdir").exists()
    assert (p / "d" / "f").exists()
    res = mount.cmd("commit", name="c")
    assert res["into"] == "p"
    assert (p / "a").read_text() == "changed by c, longer\n"
    assert os.stat(p / "a").st_size == len("changed by c, longer\n") != st_before.st_size
    assert (p / "newdir" / "f").read_text() == "f"
    assert not (p / "d" / "f").exists()
    assert "c" not in os.listdir(mount.mnt / "ws")
    assert not c.exists()


def test_writes_in_parent_show_in_child_at_once(mount: Any) -> None:
    mount.cmd("create", name="p")
    mount.cmd("create", name="c", parent="p")
    p, c = mount.path("p"), mount.path("c")
    assert (c / "a").read_text() == "hello\n"
    assert not (c / "late").exists()
    with open(p / "a", "a") as f:
        f.write("appended in p\n")
    (p / "late").write_text("late")
    assert (c / "a").read_text() == "hello\nappended in p\n"
    assert (c / "late").read_text() == "late"


def test_missing_names_appear_after_a_commit_into_the_branch(mount: Any) -> None:
    mount.cmd("create", name="p")
    mount.cmd("create", name="c", parent="p")
    p, c = mount.path("p"), mount.path("c")
    assert not (p / "new").exists() and not (p / "d" / "new2").exists()  # negative entries
    (c / "new").write_text("from c")
    (c / "d" / "new2").write_text("2")
    mount.cmd("commit", name="c")
    assert (p / "new").read_text() == "from c"
    assert (p / "d" / "new2").read_text() == "2"
    assert not (p / "mine").exists()
    (p / "mine").write_text("m")  # the kernel replaces its own negative entry
    assert os.listdir(p).count("mine") == 1 and (p / "mine").read_text() == "m"


def test_commit_into_base_and_invalidated_siblings_get_estale(mount: Any) -> None:
    for name in ("b1", "b2"):  # first commit wins among these
        mount.cmd("discard", name=name)
        mount.cmd("create", name=name, on_sibling_commit="invalidate")
    b1, b2 = mount.path("b1"), mount.path("b2")
    (b1 / "a").write_text("winner\n")
    held = open(b2 / "a", "rb")  # noqa: SIM115
    held_dir = os.open(b2 / "d", os.O_RDONLY)
    try:
        assert held.read() == b"hello\n"
        res = mount.cmd("commit", name="b1")
        assert res["invalidated"] == ["b2"]
        assert (mount.base / "a").read_text() == "winner\n"
        held.seek(0)
        with pytest.raises(OSError) as ei:
            held.read()
        assert ei.value.errno == errno.ESTALE
        with pytest.raises(OSError) as ei:
            os.listdir(held_dir)
        assert ei.value.errno == errno.ESTALE
        assert sorted(os.listdir(mount.mnt / "ws")) == []
    finally:
        held.close()
        os.close(held_dir)
    mount.cmd("discard", name="b2")
    mount.cmd("create", name="b1")
    assert (mount.path("b1") / "a").read_text() == "winner\n"


def test_discard_reaches_what_is_held_and_drops_the_rest(mount: Any) -> None:
    """Discard invalidates the branch's name and only the inodes still held:
    open files and directories answer ESTALE, names looked up before are gone."""
    b = mount.path("b1")
    for i in range(50):
        (b / "d" / f"n{i}").write_text(str(i))
    assert all((b / "d" / f"n{i}").stat().st_size for i in range(50))  # in the kernel's cache
    held = open(b / "d" / "n1", "rb")  # noqa: SIM115
    held_dir = os.open(b / "d", os.O_RDONLY)
    try:
        assert held.read() == b"1"  # its page is cached now
        mount.cmd("discard", name="b1")
        held.seek(0)
        with pytest.raises(OSError) as ei:
            held.read()
        assert ei.value.errno == errno.ESTALE
        with pytest.raises(OSError) as ei:
            os.stat("n2", dir_fd=held_dir)
        assert ei.value.errno == errno.ESTALE
        assert not (b / "d" / "n3").exists()
    finally:
        held.close()
        os.close(held_dir)


def test_prefix_names_do_not_interfere(mount: Any) -> None:
    mount.cmd("create", name="x1")
    mount.cmd("create", name="x10")
    f = open(mount.path("x10") / "a", "rb")  # noqa: SIM115
    try:
        mount.cmd("discard", name="x1")
        assert f.read() == b"hello\n"
        assert (mount.path("x10") / "d" / "f").read_text() == "in d\n"
    finally:
        f.close()


def test_discard_and_create_visible_at_once(mount: Any) -> None:
    ws = mount.mnt / "ws"
    assert not (ws / "later").exists()  # a negative lookup the kernel may cache
    mount.cmd("create", name="later")
    assert (ws / "later" / "a").read_text() == "hello\n"
    (ws / "later" / "a").write_text("gone soon")
    mount.cmd("discard", name="later")
    assert not (ws / "later").exists()
    mount.cmd("create", name="later")
    assert (ws / "later" / "a").read_text() == "hello\n"


# -- real programs ---------------------------------------------------------------

def run(args: list[str], cwd: Path, **kw: Any) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", HOME=str(cwd), PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert p.returncode == 0, (args, p.stdout[-3000:], p.stderr[-3000:])
    return p.stdout


@pytest.mark.slow
def test_git_in_a_branch(mount_factory: Any, tmp_path: Path) -> None:
    base = tmp_path / "repo"
    base.mkdir()
    (base / "README").write_text("v1\n")
    run(["git", "init", "-q", "-b", "main"], base)
    run(["git", "add", "README"], base)
    run(["git", "commit", "-q", "-m", "one"], base)
    m = mount_factory(base, ["g"])
    b = m.path("g")
    assert run(["git", "status", "--porcelain"], b) == ""
    (b / "README").write_text("v2\n")
    (b / "new.py").write_text("print(1)\n")
    assert sorted(run(["git", "status", "--porcelain"], b).split("\n")) == [
        "", " M README", "?? new.py"]
    run(["git", "add", "-A"], b)
    run(["git", "commit", "-q", "-m", "two"], b)
    assert run(["git", "status", "--porcelain"], b) == ""
    assert run(["git", "log", "--format=%s"], base) == "one\n"
    m.cmd("commit", name="g")
    assert run(["git", "log", "--format=%s"], base) == "two\none\n"
    assert run(["git", "status", "--porcelain"], base) == ""
    run(["git", "fsck", "--no-progress"], base)


@pytest.mark.slow
def test_python_tools_in_a_branch(mount: Any, tmp_path: Path) -> None:
    b = mount.path("b1")
    pkg = b / "tinypkg"
    (pkg / "tinypkg").mkdir(parents=True)
    (pkg / "tinypkg" / "__init__.py").write_text("VALUE = 42\n")
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tinypkg"\nversion = "1.0"\n')
    run([sys.executable, "-m", "venv", "--without-pip", "venv"], b)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-index",
         "--no-deps", "-w", "wheels", str(pkg)], b, timeout=120)
    wheel = next((b / "wheels").glob("tinypkg-1.0-*.whl"))
    run([sys.executable, "-m", "pip", "--python", str(b / "venv" / "bin" / "python"), "install",
         "-q", "--no-index", str(wheel)], b, timeout=120)
    assert run([str(b / "venv" / "bin" / "python"), "-c",
                "import tinypkg; print(tinypkg.VALUE)"], b) == "42\n"
    run([sys.executable, "-m", "compileall", "-q", str(pkg)], b)
    assert list((pkg / "tinypkg" / "__pycache__").glob("__init__.*.pyc"))
    assert not (mount.base / "venv").exists()


def test_editor_save_by_rename_and_tar(mount: Any, tmp_path: Path) -> None:
    b = mount.path("b1")
    ino = os.stat(b / "a").st_ino
    tmp = b / ".a.swp"
    with open(tmp, "w") as f:
        f.write("edited\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.rename(tmp, b / "a")
    assert (b / "a").read_text() == "edited\n" and os.stat(b / "a").st_ino != ino
    if shutil.which("vim"):  # a real editor's save (writebackup, rename)
        run(["vim", "-Es", "-u", "NONE", "-c", "set backupcopy=no writebackup",
             "-c", "%s/in d/vim/", "-c", "wq", str(b / "d" / "f")], b, timeout=30)
        assert (b / "d" / "f").read_text() == "vim\n"
    src = tmp_path / "src"
    (src / "x" / "y").mkdir(parents=True)
    (src / "x" / "y" / "z").write_text("z")
    os.symlink("y/z", src / "x" / "link")
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as t:
        t.add(src, arcname="src")
    run(["tar", "-xf", str(archive)], b)
    assert tree(b / "src") == tree(src)


def test_remount_after_the_server_was_killed(mount_factory: Any, base: Path) -> None:
    m = mount_factory(base, ["k1"])
    (m.path("k1") / "a").write_text("kept\n")
    m.proc.kill()  # SIGKILL: no unmount, a dead mount stays behind
    m.proc.wait()
    with pytest.raises(OSError) as ei:
        os.listdir(m.path("k1"))  # (a stat could still come from the kernel's cache)
    assert ei.value.errno == errno.ENOTCONN
    m2 = mount_factory(base, [])  # the same state dir and mountpoint
    assert (m2.path("k1") / "a").read_text() == "kept\n"
    assert "detaching the dead mount" in m2.log()
