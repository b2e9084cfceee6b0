"""One candidate run (its process tree and cgroup) and the result it ends with."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from .cgroup import Cgroup
from .errors import CgroupError
from .limits import Limits
from .spawn import Child

log = logging.getLogger(__name__)


# Why a run ended (RunResult.ended_by): on its own, or which of our kills stopped it. A
# caller of Run.kill / Manager.kill_group may name its own reason (the daemon says
# "commit", "discard", ...): any short word other than these.
EXIT = "exit"  # the main process exited with a status
SIGNAL = "signal"  # it died of a signal that none of our kills sent
TIMEOUT = "timeout"  # the Manager's timer killed the tree
OOM = "oom"  # the kernel's OOM killer killed (part of) it at the memory limit
KILL = "kill"  # kill() / kill_group() without a reason of their own
SHUTDOWN = "shutdown"  # Manager.close()


@dataclass
class RunResult:
    """How a run ended. Exactly one of exit_code / signal is set; ``ended_by`` says why
    (EXIT, SIGNAL, TIMEOUT, OOM, or the reason a kill was given), the first cause only."""

    exit_code: int | None
    signal: int | None
    oom_killed: bool
    timed_out: bool
    killed: bool  # ended by kill() / kill_group() / Manager.close()
    peak_memory: int | None  # bytes; None where the host does not account memory
    cpu_time: float | None  # seconds, user + system, the whole tree
    duration: float  # seconds of wall clock from spawn to the main process's exit
    ended_by: str = EXIT

    @property
    def returncode(self) -> int:
        """exit_code, or 128 + signal as a shell reports it."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["returncode"] = self.returncode
        return d


def _session(sid: int) -> list[int]:
    """Processes of session `sid` other than its leader."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(OSError):
            if p.pid != sid and os.getsid(p.pid) == sid:
                found.append(p.pid)
    return found


def _kill_session(sid: int) -> set[int]:
    """SIGKILL every process of session `sid` (the fallback without a cgroup to kill)."""
    killed: set[int] = set()
    for _ in range(20):
        victims = _session(sid)
        if not victims:
            break
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(victims)
        time.sleep(0.01)
    return killed


class Run:
    """A candidate: its main process (a child of ours) and its cgroup.

    Invariants: `_result` is set once, by `_finish`, after the rest of the tree
    is killed, the main process reaped, the stats read and the cgroup removed,
    and published (`_done`) once the Manager no longer lists the run;
    `_reason` is the first of TIMEOUT or a kill's reason that stopped the tree; the
    main pid stays reserved (a zombie at worst) until `_finish` reaps it, so
    signalling it by pid never hits a stranger.
    """

    def __init__(
        self,
        id: str,
        group: str,
        limits: Limits,
        cgroup: Cgroup | None,
        proc: Child,
        started: float,
        on_done: Callable[[Run, Cgroup | None], None],
        kill_later: Callable[[Run, str], None],
    ) -> None:
        self.id = id
        self.group = group
        # why the kernel refused the overlay asked for (Bind.overlay), if it did
        self.overlay_refused: str | None = None
        self.limits = limits
        self.cgroup = cgroup
        self._proc = proc
        self._started = started
        self._on_done = on_done
        self._kill_later = kill_later
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._reason: str | None = None
        self._result: RunResult | None = None
        self._callbacks: list[Callable[[RunResult], None]] = []

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __repr__(self) -> str:
        return f"<Run {self.id} pid={self.pid} group={self.group!r}>"

    def poll(self) -> RunResult | None:
        return self._result if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """Block until the run has ended (None if `timeout` seconds pass first)."""
        self._done.wait(timeout)
        return self.poll()

    def add_done_callback(self, fn: Callable[[RunResult], None]) -> None:
        """Call ``fn(result)`` once the run has ended: from the Manager's monitor thread,
        or at once (in this thread) if it has ended already. ``fn`` must not block long:
        it holds up the reaping of other runs."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        assert self._result is not None
        fn(self._result)

    def kill(self, reason: str = KILL) -> None:
        """SIGKILL the whole tree of this run; `wait()` tells when it has ended, and its
        result's ``ended_by`` is *reason* (unless something else stopped it first).

        Never blocks on the processes' exit: an exiting process may need our
        own FUSE session to answer (FLUSH on close), and the caller may be the
        thread that serves it.
        """
        self._request_stop(reason)

    def freeze(self) -> None:
        """Stop every process of the run (cgroup freezer); `thaw` resumes them."""
        self._freezer(True)

    def thaw(self) -> None:
        self._freezer(False)

    def _freezer(self, frozen: bool) -> None:
        if self.cgroup is None:
            raise CgroupError(f"run {self.id} has no cgroup to freeze")
        with self._lock:
            if self._result is None:
                self.cgroup.freeze(frozen)

    def _request_stop(self, reason: str) -> int:
        """Kill the tree without waiting for it, remembering why; how many processes it had."""
        with self._lock:
            if self._result is not None:
                return 0
            if self._reason is None:
                self._reason = reason
            if self.cgroup is not None and self.cgroup.kill_method == "cgroup.kill":
                return self.cgroup.kill(wait=False)
            # the v1 freezer and the session fallback wait while they kill: the
            # Manager's monitor thread does it
            if self.cgroup is not None:
                count = len(self.cgroup.procs())
            else:
                count = 1 + len(_session(self.pid))
        self._kill_later(self, reason)  # _stop keeps the first reason
        return count

    def _stop(self, reason: str) -> int:
        """Kill the tree and wait until it is gone, remembering why; how many were killed."""
        with self._lock:
            if self._result is not None:
                return 0
            if self._reason is None:
                self._reason = reason
            return self._kill_tree(main=True)

    def _kill_tree(self, main: bool) -> int:
        if self.cgroup is not None and self.cgroup.kill_method is not None:
            return self.cgroup.kill()
        # no cgroup to kill: the main process first (so that it cannot react to
        # its children's deaths), then what stayed in its session
        n = 0
        if main:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
                n += 1
        return n + len(_kill_session(self.pid))

    def _finish(self) -> None:
        """The main process has exited: kill what it left behind, reap, measure, clean up."""
        ended = time.monotonic()
        leftover: Cgroup | None = None
        with self._lock:
            if self._result is not None:
                return
            try:
                # a daemon the candidate started must not outlive it (nor its branch)
                left = self._kill_tree(main=False)
                if left:
                    log.info("run %s: killed %d process(es) left behind", self.id, left)
            except CgroupError as exc:
                log.error("run %s: %s", self.id, exc)
            rc = self._proc.wait()
            peak = cpu = oom = failcnt = None
            if self.cgroup is not None:
                try:
                    peak = self.cgroup.peak_memory()
                    cpu = self.cgroup.cpu_time()
                    oom = self.cgroup.oom_kills()
                    failcnt = self.cgroup.memory_failcnt()
                except OSError as exc:
                    log.error("run %s: cannot read its cgroup's statistics: %s", self.id, exc)
                try:
                    self.cgroup.remove()
                except CgroupError as exc:
                    log.error("run %s: %s", self.id, exc)
                    leftover = self.cgroup
            sig = -rc if rc < 0 else None
            if oom is not None:
                oom_killed = oom > 0
            else:
                # old v1 kernels do not count OOM kills: a SIGKILL we did not send
                # after the limit was hit is the OOM killer's
                oom_killed = bool(failcnt) and sig == signal.SIGKILL and self._reason is None
            # what we did first, else what the kernel did, else the process's own doing
            ended_by = self._reason or (OOM if oom_killed else SIGNAL if sig else EXIT)
            self._result = RunResult(
                exit_code=rc if rc >= 0 else None,
                signal=sig,
                oom_killed=oom_killed,
                timed_out=self._reason == TIMEOUT,
                killed=self._reason not in (None, TIMEOUT),
                peak_memory=peak,
                cpu_time=cpu,
                duration=ended - self._started,
                ended_by=ended_by,
            )
        # the Manager forgets the run before anyone sees it ended: runs() never lists an ended run
        self._on_done(self, leftover)
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self._result)
            except Exception:
                log.exception("run %s: a done callback failed", self.id)
