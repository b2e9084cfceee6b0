"""Suite-wide fixtures, and guards.

- A test run must leave no FUSE or overlay mount behind. Every fixture unmounts
  what it mounted; the guard checks it once at the end of the session, detaches
  any leftover (so the machine stays usable) and fails the run.
- A test fails when a daemon it used logged an ERROR or CRITICAL line or a
  Python traceback (as s3ql's suite fails on unexpected log lines), and when
  ``fsck`` finds something wrong with a daemon as it is stopped. Every
  EmbeddedDaemon made in this process is tracked; the session daemon's lines are
  the test's that ran while they were written. A test that provokes such a line
  or finding on purpose says so with ``@pytest.mark.daemon_log_allows(regex,
  ...)``: an entry (a log line with its continuation lines) or an fsck finding
  line that any regex matches (``re.search``) is allowed. WARNING lines never
  fail a test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from branching import EmbeddedDaemon
from branching.client import Client
from branching.errors import BranchError
from cgroups import mounted

# --- every daemon's log, and an fsck of each daemon as it stops -------------------------

_logs: list[Path] = []  # the log of every EmbeddedDaemon made, in order, once each
_kept: dict[Path, bytes] = {}  # logs as their daemon stopped, read before the file (gone?)
_fsck_found: list[str] = []  # open fsck findings of daemons as they stopped
_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")
_BAD_LEVELS = ("ERROR", "CRITICAL")
_init = EmbeddedDaemon.__init__
_stop = EmbeddedDaemon.stop


def _tracked_init(self: EmbeddedDaemon, *args: object, **kwargs: object) -> None:
    _init(self, *args, **kwargs)  # type: ignore[arg-type]
    if self.log_path not in _logs:
        _logs.append(self.log_path)


def _checked_stop(self: EmbeddedDaemon, timeout: float = 30.0) -> None:
    """fsck the daemon (still running) before it stops; keep the log of a daemon whose
    temporary directory stop() removes."""
    if self.proc is not None and self.proc.poll() is None:
        try:
            with Client(self.socket, timeout=30) as c:
                found = c.call("fsck")["findings"]
            _fsck_found.extend(f"{self.root}: fsck: {f['level']}: {f['kind']}: {f['message']}"
                               for f in found if f["level"] != "info")
        except BranchError as exc:
            if exc.code != "unavailable":  # a daemon stopping already
                _fsck_found.append(f"{self.root}: fsck could not run: {exc}")
    own, self._own_root = self._own_root, False  # removed below, after its log is read
    try:
        _stop(self, timeout)
    finally:
        self._own_root = own
        try:  # read now: a fixture may remove the daemon's directory right after
            _kept[self.log_path] = self.log_path.read_bytes()
        except OSError:
            pass
        if own and self.proc is None and not mounted(str(self.mountpoint)):
            shutil.rmtree(self.root, ignore_errors=True)


EmbeddedDaemon.__init__ = _tracked_init  # type: ignore[method-assign]
EmbeddedDaemon.stop = _checked_stop  # type: ignore[method-assign]


def _read_from(path: Path, offset: int) -> bytes:
    """The log from *offset*: the file while it is there (a restarted daemon appends to
    it), else what it held when its daemon stopped."""
    kept = _kept.pop(path, b"")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return kept[offset:]


def _entries(text: str) -> list[str]:
    """Log entries: a line with a timestamp and level, with the lines that follow it
    (a traceback); lines before the first such line are an entry of their own."""
    out: list[list[str]] = []
    for line in text.splitlines():
        if _ENTRY.match(line) or not out:
            out.append([line])
        else:
            out[-1].append(line)
    return ["\n".join(e) for e in out]


def _bad(entry: str) -> bool:
    m = _ENTRY.match(entry)
    return bool(m and m.group(1) in _BAD_LEVELS) or "Traceback (most recent call last)" in entry


_seen: dict[Path, int] = {}  # how much of each log was checked already
_between: list[str] = []  # what was logged, or found, outside any test (fixture teardowns)


def _unchecked(allowed: list[re.Pattern[str]]) -> list[str]:
    """The bad entries appended to every log since the last look, and the fsck findings
    not yet looked at, that no regex of *allowed* matches."""
    bad = []
    for path in list(_logs):
        data = _read_from(path, _seen.get(path, 0))
        data = data[:data.rfind(b"\n") + 1]  # a line being written: the next look's
        _seen[path] = _seen.get(path, 0) + len(data)
        text = data.decode(errors="replace")
        bad += [f"{path}: {e}" for e in _entries(text) if _bad(e)
                and not any(r.search(e) for r in allowed)]
    bad += [f for f in _fsck_found if not any(r.search(f) for r in allowed)]
    _fsck_found.clear()
    return bad


@pytest.fixture(autouse=True)
def _daemon_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test when a daemon logged an unexpected error while it ran, or fsck
    found something wrong with a daemon it stopped (see the module's docstring)."""
    _between.extend(f"(before {request.node.nodeid}) {b}" for b in _unchecked([]))
    yield
    allowed = [re.compile(r) for m in request.node.iter_markers("daemon_log_allows")
               for r in m.args]
    bad = _unchecked(allowed)
    if bad:
        pytest.fail("a daemon logged unexpected errors, or fsck found damage (mark the test "
                    "with @pytest.mark.daemon_log_allows if they are expected):\n"
                    + "\n".join(bad), pytrace=False)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedDaemon]:
    """One real daemon (real FUSE mount) shared by the tests that need no daemon of their
    own; each test uses its own workspace directory. Stopped even when tests fail."""
    d = EmbeddedDaemon(tmp_path_factory.mktemp("branchd"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def branch_mounts() -> set[str]:
    """FUSE mounts, and the kernel overlays the daemon mounts on branch directories."""
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f
                if line.split()[2].startswith("fuse") or line.split()[2] == "overlay"}


_before: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(branch_mounts())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # only this run's mounts: they live under its temporary directory
    base = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    left = {m for m in branch_mounts() - _before if m.startswith(base + "/")}
    _between.extend(f"(after the last test) {b}" for b in _unchecked([]))
    if _between:
        print("\nFAILED: daemons logged errors, or fsck found damage, outside any test:\n"
              + "\n".join(_between))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if not left:
        return
    for mnt in sorted(left, key=len, reverse=True):  # overlays before the FUSE below them
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False, capture_output=True)
    print(f"\nFAILED: the tests left mounts behind: {', '.join(sorted(left))}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``root(why)`` are skipped, saying why, when pytest runs as a user."""
    if os.geteuid() == 0:
        return
    for item in items:
        if (marker := item.get_closest_marker("root")) is not None:
            item.add_marker(pytest.mark.skip(reason=f"root only: {marker.args[0]}"))


USER_PYTHON_ENV = "BRANCHD_USER_PYTHON"


@pytest.fixture(scope="session")
def user_python() -> str:
    """An interpreter an ordinary user can run, with branchd installed in it.

    The suite's own venv lives where uid 65534 cannot reach (its interpreter is
    under /root here); tests/run.sh builds this one from Debian's /usr/bin/python3
    at a world-readable path, with the project installed (not editable), and names
    it in $BRANCHD_USER_PYTHON."""
    path = os.environ.get(USER_PYTHON_ENV)
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"${USER_PYTHON_ENV} names no interpreter: run tests/run.sh, which builds it")
    return path
