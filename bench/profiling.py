"""py-spy sampling of the branchd daemon while a scenario runs, and the top functions.

py-spy runs with ``--nonblocking`` (it reads the daemon's memory without stopping it), so the
rows measured while sampling stay close to the unsampled ones; samples of idle threads are left
out by py-spy, so the profile shows where the daemon spends its busy time.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.backends import Backend

log = logging.getLogger(__name__)

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LINENO = re.compile(r":\d+\)$")
TOP = 12
# Leaf frames that mean "waiting for work": py-spy --nonblocking cannot always tell a thread
# blocked in a syscall from a running one, so these are counted apart from the busy samples.
IDLE = frozenset({
    "EpollIOManager.get_events (trio/_core/_io_epoll.py)",
    "Condition.wait (threading.py)",
    "WorkerThread._work (trio/_core/_thread_cache.py)",
})
# The project's own code: the inclusive list shows only these frames (the interpreter's and
# trio's outer frames are on every stack and say nothing).
PROJECT = ("branchfs/", "daemon/", "branching/", "cgroups/")


def py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


class Profiler:
    """Collapsed-stack profiles, one file per (backend, scenario), in ``out``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self.missing = py_spy() is None

    @contextmanager
    def sampling(self, backend: Backend, scenario: str) -> Iterator[None]:
        pid = backend.profiled_pid()
        exe = py_spy()
        if pid is None or exe is None:
            yield
            return
        path = self.out / f"{backend.name}-{scenario}.txt"
        proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
             "--format", "raw", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if path.exists():
                self.files.append(path)
                (self.out / f"{path.stem}.top.txt").write_text(top_functions(path))
            else:
                log.warning("py-spy wrote no profile for %s: %s", path.stem,
                            err.decode(errors="replace").strip()[-300:])

    def summary(self) -> str:
        if self.missing:
            return "profiles: py-spy is not installed (pip install py-spy)"
        parts = [f"profiles in {self.out}"]
        for path in self.files:
            parts.append(f"\n== {path.stem}\n{top_functions(path)}")
        return "\n".join(parts)


def _function(frame: str) -> str:
    """A frame without its line number: 'fn (file.py)'."""
    return _LINENO.sub(")", frame)


def top_functions(path: Path, top: int = TOP) -> str:
    """The functions with the most samples on top of the stack (self) and anywhere on it
    (inclusive), from py-spy's collapsed format: 'frame;frame;... count' per line."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = idle = 0
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        count = int(m["count"])
        frames = [_function(f) for f in m["stack"].split(";")]
        if frames[-1] in IDLE:
            idle += count
            continue
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            if any(f"({p}" in f for p in PROJECT) and "(daemon/main.py)" not in f:
                total[f] += count
    if not samples:
        return f"no busy samples ({idle} idle)"
    out = [f"{samples} busy samples (and {idle} idle, left out); self:"]
    out += [f"  {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    out.append("inclusive, the project's functions:")
    out += [f"  {n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(out)
