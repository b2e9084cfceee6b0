"""Deterministic inputs: base trees of N files, and the synthetic Python project of the agent
workload as a tarball (with its git repository), made once per run and shared by all backends."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

FILES_PER_DIR = 100
EDIT_MARKER = "# edited by agent"


def base_file(i: int) -> tuple[str, bytes]:
    """The relative path and content of file ``i`` of every base tree (64 B to 4 KiB)."""
    size = 64 << (i % 7)
    seed = hashlib.sha256(b"base-%d" % i).hexdigest().encode()
    return f"d{i // FILES_PER_DIR:04d}/f{i:06d}.txt", (seed * (size // len(seed) + 1))[:size]


def make_base(root: Path, n_files: int) -> Path:
    """A tree of ``n_files`` files, ``FILES_PER_DIR`` to a directory, and a README."""
    root.mkdir(parents=True)
    (root / "README").write_text(f"benchmark base tree of {n_files} files\n")
    for i in range(n_files):
        rel, data = base_file(i)
        path = root / rel
        if i % FILES_PER_DIR == 0:
            path.parent.mkdir()
        path.write_bytes(data)
    return root


def changed_content(i: int, rep: int) -> bytes:
    """What the commit rows write into base file ``i`` on run ``rep``."""
    return b"changed %d in run %d\n" % (i, rep) * 8


def module_path(i: int) -> str:
    return f"agentpkg/sub{i // 20:02d}/mod{i:04d}.py"


def module_source(i: int) -> str:
    """A plausible module: imports, constants, a class and functions, about 60 lines."""
    lines = [
        f'"""Synthetic module {i} of the agent workload."""',
        "",
        "from __future__ import annotations",
        "",
        "import math",
        "from dataclasses import dataclass",
        "",
        "VALUE = 0",
        f"NAME = 'module-{i}'",
        "",
        "",
        "@dataclass",
        f"class Record{i}:",
        "    key: str",
        "    weight: float = 1.0",
        "",
        "    def score(self, x: float) -> float:",
        "        return math.sqrt(abs(x)) * self.weight + VALUE",
        "",
    ]
    for j in range(8):
        lines += [
            "",
            f"def helper_{j}(items: list[int]) -> int:",
            f'    """Sum of the items above {j}."""',
            "    total = 0",
            "    for item in items:",
            f"        if item > {j}:",
            "            total += item",
            "    return total",
        ]
    return "\n".join(lines) + "\n"


def make_agent_tarball(work: Path, modules: int) -> Path:
    """A tarball of the synthetic project as a git checkout; byte-identical across runs."""
    src = work / "agent-src"
    for i in range(modules):
        path = src / module_path(i)
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
            (path.parent / "__init__.py").write_text("")
        path.write_text(module_source(i))
    (src / "agentpkg" / "__init__.py").write_text('"""The agent workload\'s package."""\n')
    (src / "README.md").write_text("# agentpkg\n\nA synthetic project for the benchmark.\n")
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@example.invalid",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@example.invalid",
        GIT_AUTHOR_DATE="2000-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2000-01-01T00:00:00Z",
        GIT_CONFIG_NOSYSTEM="1",
        HOME=str(work),
    )
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "synthetic project"]):
        subprocess.run(argv, cwd=src, env=env, check=True)
    tarball = work / "agent-src.tar"
    subprocess.run(
        ["tar", "--sort=name", "--mtime=@946684800", "--owner=0", "--group=0",
         "--numeric-owner", "-cf", str(tarball), "-C", str(src), "."],
        check=True,
    )
    return tarball


JOB_SCRIPT = '''\
"""A parallel-branch job: write files, read them back, count what the tree holds."""
import hashlib
import os
import sys

n, size = int(sys.argv[1]), int(sys.argv[2])
os.mkdir("job")
blobs = [hashlib.sha256(b"%d" % i).digest() * (size // 32) for i in range(n)]
for i, blob in enumerate(blobs):
    with open("job/f%d" % i, "wb") as f:
        f.write(blob)
for i, blob in enumerate(blobs):
    with open("job/f%d" % i, "rb") as f:
        if f.read() != blob:
            sys.exit("job/f%d reads back wrong" % i)
print(sum(len(files) for _, _, files in os.walk(".")))
'''


def make_job_script(work: Path) -> Path:
    path = work / "job.py"
    path.write_text(JOB_SCRIPT)
    return path
