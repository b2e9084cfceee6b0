"""Mount tier, model-based: random operation sequences applied through the
mount to a fresh branch and to a plain copy of the workspace must give the same
results and leave identical trees; then the branch is committed (the base must
equal the copy) or discarded (the base must be unchanged)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from test_mount import full_tree

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.timeout(240)]

PATHS = st.sampled_from(["a", "b", "d/f", "d/g", "d/e", "d/e/h", "empty/i", "c", "d", "empty"])
SETTINGS = settings(max_examples=12, stateful_step_count=15, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def outcome(fn: Any) -> Any:
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, exc.errno)


def break_hard_links(root: Path) -> None:
    """Give every multiply-linked file of *root* its own copy (earlier commits
    may have brought hard links made in a branch into the base)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:  # a symlink to a dir is in dirnames
            p = Path(dirpath) / n
            if (p.is_symlink() or not p.is_dir()) and p.lstat().st_nlink > 1:
                tmp = p.with_name(n + ".unlink-tmp")
                if p.is_symlink():
                    tmp.symlink_to(os.readlink(p))
                else:
                    shutil.copy2(p, tmp)
                    for x in os.listxattr(p):
                        os.setxattr(tmp, x, os.getxattr(p, x))
                os.replace(tmp, p)


def machine(mount: Any, tmp: Path, finish: str) -> type[RuleBasedStateMachine]:
    counter = [0]

    class Model(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            counter[0] += 1
            self.name = f"{finish}{counter[0]}"
            break_hard_links(mount.base)  # copy-up breaks base hard links (docs/format.md)
            mount.cmd("create", name=self.name)
            self.roots = [mount.path(self.name), tmp / self.name]
            subprocess.run(["cp", "-a", str(mount.base), str(self.roots[1])], check=True)
            self.before = full_tree(mount.base)

        def both(self, fn: Any) -> None:
            got = [outcome(lambda r=r: fn(r)) for r in self.roots]
            assert got[0] == got[1]

        @invariant()
        def same_trees(self) -> None:
            assert full_tree(self.roots[0]) == full_tree(self.roots[1])

        @rule(p=PATHS, data=st.binary(max_size=20), append=st.booleans())
        def write(self, p: str, data: bytes, append: bool) -> None:
            def op(r: Path) -> None:
                with open(r / p, "ab" if append else "wb") as f:
                    f.write(data)
            self.both(op)

        @rule(p=PATHS, size=st.integers(0, 30))
        def truncate(self, p: str, size: int) -> None:
            self.both(lambda r: os.truncate(r / p, size))

        @rule(p=PATHS)
        def mkdir(self, p: str) -> None:
            self.both(lambda r: os.mkdir(r / p))

        @rule(p=PATHS)
        def rmdir(self, p: str) -> None:
            self.both(lambda r: os.rmdir(r / p))

        @rule(p=PATHS)
        def unlink(self, p: str) -> None:
            self.both(lambda r: os.unlink(r / p))

        @rule(src=PATHS, dst=PATHS)
        def rename(self, src: str, dst: str) -> None:
            self.both(lambda r: os.rename(r / src, r / dst))

        @rule(src=PATHS, dst=PATHS)
        def link(self, src: str, dst: str) -> None:
            self.both(lambda r: os.link(r / src, r / dst, follow_symlinks=False))

        @rule(p=PATHS, dest=st.sampled_from(["a", "d/f", "d", "nowhere"]))  # stays inside
        def symlink(self, p: str, dest: str) -> None:
            self.both(lambda r: os.symlink(dest, r / p))

        @rule(p=PATHS, mode=st.sampled_from([0o600, 0o644, 0o755, 0o700]))
        def chmod(self, p: str, mode: int) -> None:
            self.both(lambda r: os.chmod(r / p, mode, follow_symlinks=False)
                      if not (r / p).is_symlink() else None)

        @rule(p=PATHS, value=st.sampled_from([b"", b"1", b"22"]))
        def setxattr(self, p: str, value: bytes) -> None:
            self.both(lambda r: os.setxattr(r / p, "user.t", value, follow_symlinks=False)
                      if not (r / p).is_symlink() else None)

        def teardown(self) -> None:
            assert full_tree(self.roots[0]) == full_tree(self.roots[1])
            if finish == "commit":
                mount.cmd("commit", name=self.name)
                assert full_tree(mount.base) == full_tree(self.roots[1])
            else:
                mount.cmd("discard", name=self.name)
                assert full_tree(mount.base) == self.before

    return Model


@pytest.mark.parametrize("finish", ["commit", "discard"])
def test_branch_behaves_like_a_plain_directory(mount: Any, tmp_path: Path, finish: str) -> None:
    run_state_machine_as_test(machine(mount, tmp_path, finish), settings=SETTINGS)
