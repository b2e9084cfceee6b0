"""Commit never changes a file it did not mean to, whatever a user swaps in during it.

The attacks of the attack-proof issue, for real: a root daemon with
``--allow-uid 65534``; the workspace is that user's; the attacker is a process
of that user (``user_python`` under setpriv) that watches the workspace with
inotify and swaps names during the commit. The victim is a root-owned
executable; after every attempt its mode must be what it was (no setuid).

- a directory's metadata step: the branch made ``d`` mode 4777; once the commit
  has moved files into ``d`` and opens it again for the step that gives it its
  mode, the attacker exchanges ``d`` with a symlink to the victim
  (RENAME_EXCHANGE);
- a commit across filesystems (base on a tmpfs, state elsewhere) of files made
  4777: the attacker renames a symlink to the victim over every file that
  appears in the base before it has its final name.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon

from .conftest import forget_workspaces, passable_dir

pytestmark = [pytest.mark.mount, pytest.mark.timeout(240),
              pytest.mark.root("a root daemon attacked by uid 65534 (setpriv), on its tmpfs")]

NOBODY = 65534
FILES = 40

# the attacker: a stdlib-only script, run as uid 65534
SWAPPER = textwrap.dedent("""
    import ctypes, os, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    mode, watch, victim, ready = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    IN_MOVED_TO, IN_CREATE, IN_CLOSE_WRITE, IN_OPEN = 0x80, 0x100, 0x8, 0x20
    fd = libc.inotify_init1(0)
    mask = (IN_MOVED_TO | IN_OPEN if mode == "exchange"
            else IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO)
    moved = False
    assert libc.inotify_add_watch(fd, watch.encode(), mask) >= 0
    open(ready, "w").close()
    swaps = 0
    while True:
        buf = os.read(fd, 65536)
        off = 0
        while off < len(buf):
            wd, m, cookie, size = struct.unpack_from("iIII", buf, off)
            name = buf[off + 16: off + 16 + size].split(b"\\0", 1)[0].decode()
            off += 16 + size
            if mode == "exchange":
                # the commit moved files into d, then opens d for its metadata step:
                # now d <-> l, so that "d" is the symlink to the victim
                moved = moved or bool(m & IN_MOVED_TO)
                if moved and m & IN_OPEN and not name:
                    if libc.renameat2(-100, b"d", -100, b"l", 2) == 0:
                        print("swapped", flush=True)
                        sys.exit(0)
            elif name.startswith(".branchfs"):
                tmp = os.path.join(watch, ".evil")
                try:
                    os.symlink(victim, tmp)
                    os.rename(tmp, os.path.join(watch, name))
                    swaps += 1
                    print("swapped", name, flush=True)
                except OSError:
                    pass
    """)


@pytest.fixture(scope="module")
def top() -> Iterator[Path]:
    with passable_dir("branchd-race-") as root:
        (root / "flags").mkdir(mode=0o777)
        (root / "flags").chmod(0o777)  # where the attacker says it is ready
        yield root


@pytest.fixture(scope="module")
def shared(top: Path) -> Iterator[EmbeddedDaemon]:
    (top / "daemon").mkdir(mode=0o755)
    d = EmbeddedDaemon(top / "daemon", args=["--allow-uid", str(NOBODY), "--socket-mode",
                                              "0666"]).start()
    try:
        yield d
    finally:
        d.stop()


def victim(top: Path) -> Path:
    v = top / "victim"
    shutil.copy("/usr/bin/id", v)
    os.chmod(v, 0o755)
    return v


def nobody(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], capture_output=True, text=True,
                          timeout=60, **kw)  # type: ignore[call-overload]


def cli(python: str, socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return nobody("env", f"BRANCHD_SOCKET={socket}", python, "-I", "-m", "branching.cli",
                  *args, cwd="/")


def start_swapper(python: str, mode: str, watch: Path, target: Path,
                  ready: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", python, "-I", "-c", SWAPPER, mode, str(watch),
                          str(target), str(ready)], cwd=str(watch.parent if mode ==
                                                             "exchange" else watch),
                         stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert p.poll() is None and time.monotonic() < deadline, "the swapper did not start"
        time.sleep(0.01)
    return p


def stop(p: subprocess.Popen[str]) -> str:
    if p.poll() is None:
        p.kill()
    out, _ = p.communicate()
    return out


def test_a_directory_swapped_for_a_symlink_during_commit_is_not_chmodded(
        shared: EmbeddedDaemon, top: Path, user_python: str) -> None:
    v = victim(top)
    swapped = 0
    for attempt in range(8):
        ws = top / f"ws{attempt}"
        (ws / "d").mkdir(parents=True)
        for i in range(FILES):
            (ws / "d" / f"f{i}").write_text("old\n")
        os.symlink(v, ws / "l")
        subprocess.run(["chown", "-R", "-h", f"{NOBODY}:{NOBODY}", str(ws)], check=True)
        made = cli(user_python, shared.socket, "create", "b", "-w", str(ws))
        assert made.returncode == 0, made.stderr
        branch = Path(made.stdout.strip())
        wrote = nobody("sh", "-c", f"for i in $(seq 0 {FILES - 1}); do echo new > "
                       f"{branch}/d/f$i; done; chmod 4777 {branch}/d")
        assert wrote.returncode == 0, wrote.stderr
        ready = top / "flags" / f"ready{attempt}"
        p = start_swapper(user_python, "exchange", ws / "d", v, ready)
        try:
            cli(user_python, shared.socket, "commit", "b", "-w", str(ws))
            p.wait(5) if p.poll() is None else None
        except subprocess.TimeoutExpired:
            pass
        finally:
            out = stop(p)
        swapped += "swapped" in out
        assert stat.S_IMODE(v.stat().st_mode) == 0o755, f"attempt {attempt}: victim chmodded"
        assert v.stat().st_uid == 0
    assert swapped, "the attacker never got to swap: the test did not test anything"


@pytest.fixture
def tmpfs_base(shared: EmbeddedDaemon, top: Path) -> Iterator[Path]:
    """A tmpfs for workspaces; the shared daemon forgets those on it before it goes (a
    workspace whose directory is gone is what fsck reports when the daemon stops)."""
    base = top / "tmpfs"
    base.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "race", str(base)],
                   check=True)
    try:
        yield base
    finally:
        forget_workspaces(shared, base)
        subprocess.run(["umount", "-l", str(base)], check=False)


def test_a_cross_filesystem_commit_gives_no_setuid_through_a_swapped_temp_name(
        shared: EmbeddedDaemon, top: Path, tmpfs_base: Path, user_python: str) -> None:
    v = victim(top)
    ws = tmpfs_base / "ws"
    ws.mkdir()
    os.chown(ws, NOBODY, NOBODY)
    assert os.stat(ws).st_dev != os.stat(shared.state_dir).st_dev
    made = cli(user_python, shared.socket, "create", "x", "-w", str(ws))
    assert made.returncode == 0, made.stderr
    branch = Path(made.stdout.strip())
    wrote = nobody("sh", "-c", f"for i in $(seq 0 {FILES - 1}); do echo new > {branch}/f$i; "
                   f"chmod 4777 {branch}/f$i; done")
    assert wrote.returncode == 0, wrote.stderr
    p = start_swapper(user_python, "temps", ws, v, top / "flags" / "ready-x")
    try:
        done = cli(user_python, shared.socket, "commit", "x", "-w", str(ws))
    finally:
        out = stop(p)
    assert stat.S_IMODE(v.stat().st_mode) == 0o755 and v.stat().st_uid == 0, out
    print(done.returncode, done.stderr, out.count("swapped"), file=sys.stderr)
