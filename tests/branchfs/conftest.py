"""Fixtures of the branchfs tests: a Store on a temp dir, and a real FUSE mount
served by a subprocess (tests/branchfs/mountee.py), always unmounted after."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from branchfs import Store

HERE = Path(__file__).parent
REPO = HERE.parent.parent
READY_TIMEOUT = 30.0


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A small workspace: a file, a directory with a file, an empty dir."""
    b = tmp_path / "base"
    (b / "d").mkdir(parents=True)
    (b / "empty").mkdir()
    (b / "a").write_text("hello\n")
    (b / "d" / "f").write_text("in d\n")
    return b


@pytest.fixture
def store(tmp_path: Path, base: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state", mountpoint=str(tmp_path / "mnt"))
    s.add_workspace(str(base), name="ws")
    yield s
    s.close()


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == real for line in f)


class Mount:
    """A running mountee: ``path(branch)``, ``cmd(op, name=...)``, ``stop()``."""

    def __init__(self, tmp: Path, base: Path, branches: list[str]) -> None:
        self.state = tmp / "state"
        self.mnt = tmp / "mnt"
        self.base = base
        self.mnt.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.errlog = open(tmp / "mountee.log", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "mountee.py"), str(self.state), str(self.mnt),
             str(base), *branches],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errlog, env=env)
        line = self._readline(READY_TIMEOUT)
        if line != "ready":
            self.stop()
            raise RuntimeError(f"mount did not come up: {line!r} {self.log()}")

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return "<timeout>"
        return self.proc.stdout.readline().decode().strip()

    def log(self) -> str:
        self.errlog.seek(0)
        return self.errlog.read().decode(errors="replace")

    def path(self, branch: str) -> Path:
        return self.mnt / "ws" / branch

    def cmd(self, op: str, **kw: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._readline(60)
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"{reply['code']}: {reply['message']}")
        return reply["result"]

    def stop(self) -> None:
        assert self.proc.stdin is not None
        if self.proc.poll() is None:
            self.proc.stdin.close()  # mountee unmounts and exits on EOF
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        self.proc.stdin.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.errlog.close()


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Any]:
    mounts: list[Mount] = []

    def start(base: Path, branches: list[str], where: Path | None = None) -> Mount:
        m = Mount(where or tmp_path, base, branches)
        mounts.append(m)
        return m

    yield start
    for m in reversed(mounts):
        m.stop()


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temp dir other users can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="branchfs-test-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mount(mount_factory: Any, base: Path) -> Mount:
    return mount_factory(base, ["b1", "b2"])  # type: ignore[no-any-return]
