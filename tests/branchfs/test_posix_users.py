"""POSIX as another user, against the kernel: each test runs the same script
natively, on a plain directory, and in a FUSE branch, as uid 65534 (a real
process whose uid was switched, so without capabilities) and compares what
both gave. The mount is served by root, as the daemon is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # the scripts are stdlib only; the venv's is root's

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root (to play another uid) and a system python uid 65534 may run")]
OTHER = 1000  # owner of the files that are not nobody's

# What a script gets: ROOT (the directory it works in), ok(fn, *args) -> its
# result or the errno's name, mode(path) -> its permission bits in octal.
PRELUDE = """
import errno, json, os, stat, sys
ROOT = sys.argv[1]
def ok(fn, *args):
    try:
        r = fn(*args)
        return "ok" if r is None else r
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
def mode(p):
    return oct(stat.S_IMODE(os.lstat(os.path.join(ROOT, p)).st_mode))
def p(*names):
    return os.path.join(ROOT, *names)
"""


def as_user(root: Path, script: str, *, uid: int = NOBODY, groups: tuple[int, ...] = (),
            umask: int = 0o022) -> Any:
    """Run *script* as *uid* (gid *uid*, supplementary *groups*) with *root* as
    ROOT; what it prints as JSON."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", PRELUDE + script, str(root)], user=uid, group=uid,
        extra_groups=list(groups), umask=umask, cwd="/", capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def fuse_and_plain(public_tmp: Path, mount_factory: Any) -> Iterator[tuple[Path, Path, Path]]:
    """(base, branch, plain): a workspace served in a FUSE branch whose daemon
    has the common umask 022, and a plain directory to be made alike. Both are
    writable by everybody, so uid 65534 can make and move entries in them."""
    base = public_tmp / "base"
    base.mkdir()
    base.chmod(0o777)
    plain = public_tmp / "plain"
    plain.mkdir()
    plain.chmod(0o777)
    old = os.umask(0o022)
    try:
        mount = mount_factory(base, ["b1"], where=public_tmp)
    finally:
        os.umask(old)
    yield base, mount.path("b1"), plain


def both(base: Path, plain: Path, make: Any) -> None:
    """Make the same entries in the base (seen in the branch from below) and in
    the plain directory."""
    for root in (base, plain):
        make(root)


LONG = "n" * 255
CREATE_SCRIPT = f"LONG = {LONG[:-6]!r}\n" + """
deep = ROOT
for i in range(5):
    deep = os.path.join(deep, f"d{i}" + "x" * 200)
    os.mkdir(deep)
assert len(os.fsencode(deep)) > 1000
out = {}
for label, f in (("short", p("short")), ("255", p(LONG)), ("deep", os.path.join(deep, "f"))):
    fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o620)
    os.close(fd)
    out[label] = mode(f)
    fd = os.open(f + "s", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o4755)
    os.close(fd)
    out[label + " setuid"] = mode(f + "s")
    os.mkdir(f + ".d", 0o777)
    out[label + " dir"] = mode(f + ".d")
    os.mkfifo(f + ".fifo", 0o666)
    out[label + " fifo"] = mode(f + ".fifo")
print(json.dumps(out))
"""  # LONG leaves room for the suffixes: names of 249 to 255 bytes


@pytest.mark.parametrize("umask", [0, 0o027, 0o077], ids=lambda m: f"umask{m:03o}")
@pytest.mark.parametrize("uid", [NOBODY, 0], ids=["nobody", "root"])
def test_new_entries_get_the_mode_the_kernel_gives(fuse_and_plain: tuple[Path, Path, Path],
                                                   umask: int, uid: int) -> None:
    """open(O_CREAT, 0620), mkdir and mkfifo: the mode asked for less the
    caller's umask, whatever the daemon's own umask (it took 0620 to 0600);
    short names, 249 to 255-byte names, paths of over 1000 bytes."""
    _, branch, plain = fuse_and_plain
    assert as_user(branch, CREATE_SCRIPT, uid=uid, umask=umask) == as_user(
        plain, CREATE_SCRIPT, uid=uid, umask=umask)


SETID_MODES = [0o4666, 0o6666, 0o2666, 0o6766, 0o2676, 0o2766, 0o4777, 0o6777]
WRITES = {
    "write": "fd = os.open(f, os.O_WRONLY); os.write(fd, b'y'); os.close(fd)",
    "append": "fd = os.open(f, os.O_WRONLY | os.O_APPEND); os.write(fd, b'y'); os.close(fd)",
    "trunc-open": "os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))",
    "truncate": "os.truncate(f, 1)",
    "ftruncate": "fd = os.open(f, os.O_RDWR); os.ftruncate(fd, 1); os.close(fd)",
}


def _setid_script(names: list[str]) -> str:
    """For each file ``<mode>-<write>``: its mode, what the write gave, its mode after."""
    return f"NAMES = {names!r}\nWRITES = {WRITES!r}\n" + """
out = {}
for n in NAMES:
    code = WRITES[n.split("-", 1)[1]]
    out[n] = [mode(n), ok(exec, code, {"os": os, "f": p(n)}), mode(n)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("groups", [(), (OTHER,)], ids=["outside-the-group", "in-the-group"])
def test_a_write_by_another_user_clears_set_id_bits_as_the_kernel_does(
        fuse_and_plain: tuple[Path, Path, Path], groups: tuple[int, ...]) -> None:
    """A non-owner without CAP_FSETID who may write a set-id file: the write
    succeeds and clears S_ISUID, and S_ISGID when the file is group-executable
    or the writer is not in its group. Files from below (copied up by the
    write) and files made in the branch."""
    base, branch, plain = fuse_and_plain
    names = [f"{m:o}-{op}" for m in SETID_MODES for op in WRITES]

    def make(root: Path, names: list[str] = names) -> None:
        for n in names:
            f = root / n
            f.write_text("x\n")
            os.chown(f, OTHER, OTHER)
            f.chmod(int(n.split("-")[0], 8))

    both(base, plain, make)
    (branch / "up").mkdir()
    (plain / "up").mkdir()
    make(branch / "up")
    make(plain / "up")
    script = _setid_script(names)
    for sub in ("", "up"):
        native = as_user(plain / sub, script, groups=groups)
        fuse = as_user(branch / sub, script, groups=groups)
        assert fuse == native, sub or "from below"
        # the modes seen afterwards by someone else, past any cache of the kernel's
        assert {n: oct(os.stat(branch / sub / n).st_mode) for n in names} == {
            n: oct(os.stat(plain / sub / n).st_mode) for n in names}


def test_a_write_by_the_owner_or_root_clears_what_the_kernel_clears(
        fuse_and_plain: tuple[Path, Path, Path]) -> None:
    """The owner without CAP_FSETID loses S_ISUID too (a truncating open
    kept it); root keeps every bit."""
    _, branch, plain = fuse_and_plain
    names = [f"{m:o}-{op}" for m in SETID_MODES for op in WRITES]

    def make(root: Path, owner: int) -> None:
        for n in names:
            f = root / n
            f.write_text("x\n")
            os.chown(f, owner, owner)
            f.chmod(int(n.split("-")[0], 8))

    script = _setid_script(names)
    for who in (NOBODY, 0):
        for root in (branch, plain):
            (root / str(who)).mkdir()
            make(root / str(who), who)
        assert as_user(branch / str(who), script, uid=who) == as_user(
            plain / str(who), script, uid=who)


RENAME_SCRIPT = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def renameat2(a, b, flags):
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
out = []
out.append(ok(os.rename, p("top", "src"), p("top", "dst", "src")))  # new parent: '..' changes
out.append(ok(os.rename, p("top", "src"), p("top", "dst", "empty")))  # over an empty dir
out.append(ok(renameat2, p("top", "src"), p("top", "dst", "new"), 1))  # RENAME_NOREPLACE
out.append(ok(renameat2, p("top", "src"), p("top", "dst", "empty"), 2))  # RENAME_EXCHANGE
out.append(ok(renameat2, p("top", "dst", "sub"), p("top", "dst", "empty"), 2))
out.append(ok(os.rename, p("top", "src"), p("top", "src2")))  # same parent: allowed
out.append(ok(os.rename, p("top", "src2"), p("top", "src")))
out.append(ok(os.rename, p("top", "dst", "sub"), p("top", "sub")))  # a dir of its own
out.append(ok(os.rename, p("top", "sub"), p("top", "dst", "sub")))
out.append([sorted(os.listdir(p(*d))) for d in (("top",), ("top", "dst"), ("top", "src"))])
out.append(ok(os.rmdir, p("top", "dst", "src")))
out.append(ok(os.unlink, p("top", "src", "f")))  # not its own directory
out.append(ok(os.rmdir, p("top", "src")))  # not empty
out.append([sorted(os.listdir(p(*d))) for d in (("top",), ("top", "dst"), ("top", "src"))])
print(json.dumps(out))
"""


def test_moving_a_directory_needs_write_permission_on_it(
        fuse_and_plain: tuple[Path, Path, Path]) -> None:
    """Linux refuses (EACCES) to move a directory to another parent unless the
    caller may write the directory itself (its '..' is rewritten); after
    that, both trees hold the same names: the names the kernel refused to
    move are still there to remove, the new ones are not. Directories from
    below and made in the branch. (Matched the kernel before this test too.)"""
    base, branch, plain = fuse_and_plain

    def make(root: Path) -> None:
        (root / "top" / "src").mkdir(parents=True)
        (root / "top" / "dst" / "sub").mkdir(parents=True)
        (root / "top" / "dst" / "empty").mkdir()
        (root / "top" / "src" / "f").write_text("f\n")
        (root / "top").chmod(0o777)
        (root / "top" / "dst").chmod(0o777)
        (root / "top" / "src").chmod(0o755)  # root's, not writable by nobody
        os.chown(root / "top" / "dst" / "sub", NOBODY, NOBODY)

    both(base, plain, make)
    from_below = as_user(branch, RENAME_SCRIPT)
    native = as_user(plain, RENAME_SCRIPT)
    assert from_below == native
    assert native[:4] == ["EACCES"] * 4
    shutil.rmtree(plain / "top")
    for root in (branch / "made", plain):
        root.mkdir(exist_ok=True)
        root.chmod(0o777)
        make(root)
    assert as_user(branch / "made", RENAME_SCRIPT) == as_user(plain, RENAME_SCRIPT)


PERMISSION_SCRIPT = """
def st(*names):
    s = os.lstat(p(*names))
    return [oct(s.st_mode), s.st_uid, s.st_gid]
out = {}
for f in ("r600", "r644", "r666", "o644", "n600"):
    out[f + " read"] = ok(lambda: os.close(os.open(p("perm", f), os.O_RDONLY)))
    out[f + " write"] = ok(lambda: os.close(os.open(p("perm", f), os.O_WRONLY)))
    out[f + " chmod"] = ok(os.chmod, p("perm", f), 0o640)
    out[f + " chown to self"] = ok(os.chown, p("perm", f), os.getuid(), os.getgid())
    out[f + " touch now"] = ok(os.utime, p("perm", f), None)
    out[f + " set times"] = ok(os.utime, p("perm", f), (1, 2))
    out[f + " xattr"] = ok(os.setxattr, p("perm", f), "user.x", b"1")
    out[f + " after"] = st("perm", f)
for d in ("d700", "d711", "d755", "d777", "sticky", "sgid"):
    out[d + " list"] = ok(lambda: sorted(os.listdir(p("perm", d))))
    out[d + " stat inside"] = ok(lambda: st("perm", d, "f"))
    out[d + " create"] = ok(lambda: os.close(os.open(p("perm", d, "new"), os.O_CREAT, 0o666)))
    out[d + " mkdir"] = ok(os.mkdir, p("perm", d, "newdir"), 0o777)
    out[d + " unlink others'"] = ok(os.unlink, p("perm", d, "f"))
    for n in ("new", "newdir"):
        out[d + " " + n] = ok(lambda: st("perm", d, n))
print(json.dumps(out))
"""


def test_permission_checks_match_the_kernel(fuse_and_plain: tuple[Path, Path, Path]) -> None:
    """default_permissions: the kernel checks modes and owners; the entries
    uid 65534 makes get its owner, its umask, and a setgid directory's group."""
    base, branch, plain = fuse_and_plain

    def make(root: Path) -> None:
        d = root / "perm"
        d.mkdir()
        d.chmod(0o755)
        for name, owner, mode in (("r600", 0, 0o600), ("r644", 0, 0o644), ("r666", 0, 0o666),
                                  ("o644", OTHER, 0o644), ("n600", NOBODY, 0o600)):
            (d / name).write_text("x\n")
            os.chown(d / name, owner, owner)
            (d / name).chmod(mode)
        for name, mode in (("d700", 0o700), ("d711", 0o711), ("d755", 0o755), ("d777", 0o777),
                           ("sticky", 0o1777), ("sgid", 0o2777)):
            (d / name).mkdir()
            (d / name / "f").write_text("x\n")
            os.chown(d / name, 0, OTHER)
            (d / name).chmod(mode)

    both(base, plain, make)
    for where, umask in (("from below", 0o022), ("made in the branch", 0o002)):
        if where == "made in the branch":
            for root in (branch, plain):
                shutil.rmtree(root / "perm")
                make(root)
        got = as_user(branch, PERMISSION_SCRIPT, umask=umask)
        assert got == as_user(plain, PERMISSION_SCRIPT, umask=umask), where
