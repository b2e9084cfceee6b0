"""Python-callable candidates for the pattern tests (top-level, so they pickle by name).

Each runs in the daemon's child process with the branch's path as argument.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def write(name: str, text: str, path: Path) -> None:
    (path / name).write_text(text)


def score(value: float, path: Path) -> float:
    (path / f"score-{value:g}.txt").write_text(f"{value}\n")
    return value


def raises(message: str, path: Path) -> None:
    (path / "partial.txt").write_text("half done\n")
    raise ValueError(message)


def returns_false(path: Path) -> bool:
    return False


def crash(path: Path) -> None:
    (path / "crashed.txt").write_text("about to crash\n")
    os.kill(os.getpid(), signal.SIGSEGV)


def hog_memory(path: Path) -> None:
    """Touch 1 GiB: far above the tests' 64M limit, so the kernel kills it."""
    chunks = []
    for _ in range(1024):
        chunks.append(b"x" * (1 << 20))


def hang(pid_dir: str, path: Path) -> None:
    Path(pid_dir, str(os.getpid())).write_text(str(os.getpid()))
    (path / "hanging.txt").write_text("still here\n")
    time.sleep(3600)


def needs_feedback(word: str, path: Path) -> bool:
    """Fails, saying what it needs, until BRANCHING_FEEDBACK mentions ``word``."""
    if word not in os.environ.get("BRANCHING_FEEDBACK", ""):
        print(f"missing: {word}", flush=True)
        return False
    (path / "value.txt").write_text(f"fixed with {word}\n")
    return True


def attempt_score(path: Path) -> float:
    """Scores its attempt number: the last attempt is the best."""
    attempt = int(os.environ["BRANCHING_ATTEMPT"])
    (path / "value.txt").write_text(f"{attempt}\n")
    return float(attempt)
