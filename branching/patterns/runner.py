"""The candidate runner: one pattern run's branches, worker threads and scratch files.

Patterns decide *what* to run and which result wins; a ``Session`` runs each
candidate in a fresh branch on a bounded pool of threads (each blocked in
``Branch.run`` while the daemon's cgroup-limited child works), classifies how
it ended, and owns every branch it created until the pattern is over.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from branching.errors import BranchError
from branching.patterns import outcome as oc
from branching.patterns.candidate import Call, Candidate, Command, env_text, read_score
from branching.patterns.outcome import CandidateResult

if TYPE_CHECKING:
    from branching.workspace import Branch, RunResult, Workspace
    from cgroups import Limits

log = logging.getLogger(__name__)

EventHook = Callable[[str, CandidateResult], None]


class Interrupted(Exception):
    """The pattern was cancelled from outside (``arun``'s caller was cancelled)."""


@dataclass
class RunOptions:
    """What every pattern passes to every candidate run."""

    limits: Limits | None = None
    timeout: float | None = None
    max_parallel: int = 0  # 0: one per CPU
    env: dict[str, str] = field(default_factory=dict)
    on_event: EventHook | None = None
    capture: bool = True  # False: runs write to this process's stdout and stderr (one at a time)
    at_branch_path: bool = False  # True: candidates see their branch at its own path

    def workers(self) -> int:
        return self.max_parallel if self.max_parallel > 0 else (os.cpu_count() or 1)


class Session:
    """Runs candidates of one pattern run, each in its own branch.

    Invariants: every branch created here is in ``_live`` until it is committed
    or discarded; ``close()`` discards every live branch (children before their
    parents) and returns only when no worker thread is left, so after it the
    workspace holds nothing of this session but what ``commit`` put there.
    Once ``stop()`` is called no further candidate starts.
    """

    def __init__(self, ws: Workspace, options: RunOptions, kind: str,
                 cancel: Future[None] | None = None) -> None:
        self.ws = ws
        self.options = options
        self.results: list[CandidateResult] = []
        self._tag = f"{kind}-{uuid.uuid4().hex[:6]}"
        self._cancel = cancel or Future()
        self._pool = ThreadPoolExecutor(options.workers(), thread_name_prefix=self._tag)
        self._scratch = Path(tempfile.mkdtemp(prefix=f"branching-{self._tag}-"))
        self._lock = threading.Lock()
        self._stopping = False
        self._live: dict[str, Branch] = {}  # insertion order: parents before children
        self._discarded: set[str] = set()
        self._futures: list[Future[CandidateResult]] = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- running -------------------------------------------------------------------------

    def submit(self, candidate: Candidate, *, parent: CandidateResult | None = None,
               attempt: int | None = None,
               feedback: str | None = None) -> Future[CandidateResult]:
        """Queue ``candidate`` to run in a new branch of the workspace (or of ``parent``)."""
        index = len(self.results)
        result = CandidateResult(
            index=index, label=candidate.name(),
            attempt=attempt if attempt is not None else index + 1,
            depth=parent.depth + 1 if parent else 1,
            parent=parent.branch if parent else None, feedback=feedback,
        )
        self.results.append(result)
        fut = self._pool.submit(self._run_in_branch, candidate, result)
        self._futures.append(fut)
        return fut

    def wait_any(self, pending: Iterable[Future[CandidateResult]]) -> set[Future[CandidateResult]]:
        """Block until one of ``pending`` is done; raises Interrupted when cancelled."""
        waiting: set[Future[Any]] = {*pending, self._cancel}
        done, _ = wait(waiting, return_when=FIRST_COMPLETED)
        if self._cancel.done():
            raise Interrupted
        done.discard(self._cancel)
        return done

    def wait_all(self, pending: Iterable[Future[CandidateResult]]) -> list[CandidateResult]:
        futures = list(pending)
        left = set(futures)
        while left:
            left -= self.wait_any(left)
        return [f.result() for f in futures]

    def check(self) -> None:
        """Raise Interrupted if cancelled (for patterns between their own steps)."""
        if self._cancel.done():
            raise Interrupted

    def _run_in_branch(self, candidate: Candidate, result: CandidateResult) -> CandidateResult:
        with self._lock:
            if self._stopping:
                result.status = oc.CANCELLED
                return result
        scratch = self._scratch / str(result.index)
        scratch.mkdir()
        name = f"{self._tag}-{result.index}"
        try:
            parent = self._live.get(result.parent) if result.parent else None
            if result.parent and parent is None:
                raise BranchError("not-found", f"parent branch {result.parent} is gone")
            # first commit wins among candidates (the pattern ends the rest anyway);
            # branches outside the pattern carry on over its commit (rebase)
            branch = self.ws.create(name, parent=parent, on_sibling_commit="invalidate")
        except BranchError as e:
            return self._failed_to_start(result, e)
        with self._lock:
            self._live[branch.name] = branch
            stopping = self._stopping
        result.branch, result.path = branch.name, branch.path
        if stopping:
            self._discard(branch.name)
            result.status = oc.CANCELLED
            return result
        result.status = oc.RUNNING
        self._event("start", result)
        env = {**os.environ, **self.options.env,
               "BRANCHING_ATTEMPT": str(result.attempt),
               "BRANCHING_SCORE_FILE": str(scratch / "score")}
        if result.feedback:
            env["BRANCHING_FEEDBACK"] = env_text(result.feedback)
        started = time.monotonic()
        try:
            run = branch.run(candidate.command(scratch), limits=self.options.limits,
                             timeout=self.options.timeout, env=env,
                             capture=self.options.capture,
                             at_branch_path=self.options.at_branch_path)
        except BranchError as e:
            if branch.name in self._discarded:  # discarded under the run: a lost race
                result.status = oc.CANCELLED
                result.duration = time.monotonic() - started
                self._event("finish", result)
                return result
            return self._failed_to_start(result, e)
        self._classify(result, candidate, run, scratch)
        self._event("finish", result)
        return result

    def run_command(self, result: CandidateResult, command: Command,
                    env: dict[str, str]) -> str | None:
        """Run ``command`` in ``result``'s (still live) branch; its stdout, None if it failed."""
        branch = self._live.get(result.branch) if result.branch else None
        if branch is None:
            return None
        scratch = self._scratch / f"{result.index}-command"
        scratch.mkdir()
        try:
            run = branch.run(command.command(scratch), limits=self.options.limits,
                             timeout=self.options.timeout,
                             env={**os.environ, **self.options.env,
                                  **{k: env_text(v) for k, v in env.items()},
                                  "BRANCHING_SCORE_FILE": str(scratch / "score")},
                             at_branch_path=self.options.at_branch_path)
        except BranchError as e:
            log.warning("%s could not run in %s: %s", command.name(), branch.name, e)
            return None
        if not run.ok:
            log.warning("%s failed in %s (exit %s)", command.name(), branch.name, run.returncode)
            return None
        return run.stdout

    def _failed_to_start(self, result: CandidateResult, e: BranchError) -> CandidateResult:
        log.warning("candidate %d (%s) could not run: %s", result.index, result.label, e)
        result.status = oc.ERROR
        result.exception = e
        result.error = str(e)
        self._event("finish", result)
        return result

    def _classify(self, result: CandidateResult, candidate: Candidate, run: RunResult,
                  scratch: Path) -> None:
        result.exit_code, result.signal = run.exit_code, run.signal
        result.ended_by = run.ended_by
        result.duration, result.cpu_time = run.duration, run.cpu_time
        result.peak_memory = run.peak_memory
        result.stdout_path, result.stderr_path = run.stdout_path, run.stderr_path
        if run.timed_out:
            result.status = oc.TIMED_OUT
        elif run.oom_killed:
            result.status = oc.OOM
        elif run.killed or (result.branch in self._discarded and run.signal is not None):
            result.status = oc.CANCELLED
        elif run.signal:
            result.status = oc.CRASHED
        elif run.returncode != 0:
            result.status = oc.FAILED
        else:
            result.status = oc.PASSED
        if isinstance(candidate, Call):
            self._read_call_result(result, scratch / "result.pickle")
        if result.score is None:  # a callable may also score through the file
            result.score = read_score(scratch / "score")
        result.success = result.status == oc.PASSED

    def _read_call_result(self, result: CandidateResult, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                data: dict[str, Any] = pickle.load(f)
        except FileNotFoundError:
            return  # crashed, killed or exited early: the run's status says which
        except Exception as e:  # a torn or foreign file: the candidate failed
            result.status, result.error = oc.FAILED, f"unreadable result: {e}"
            return
        result.score = data["score"]
        if data["error"]:
            result.error = data["error"]
            result.exception = _exception(data["exc"], data["error"])
        if not data["ok"] and result.status == oc.PASSED:
            result.status = oc.FAILED

    def _event(self, kind: str, result: CandidateResult) -> None:
        hook = self.options.on_event
        if hook is None:
            return
        try:
            hook(kind, result)
        except Exception:  # a broken progress display must not fail the candidates
            log.exception("on_event hook failed")

    # --- ending ------------------------------------------------------------------------

    def stop(self) -> None:
        """Start nothing more: queued candidates end as cancelled."""
        with self._lock:
            self._stopping = True
        for fut in self._futures:
            fut.cancel()

    def discard(self, result: CandidateResult) -> None:
        """Discard ``result``'s branch (and its nested branches); kills what runs there."""
        if result.branch is None:
            return
        for name in reversed(list(self._live)):
            if self._descends(name, result.branch):
                self._discard(name)

    def _descends(self, name: str, ancestor: str) -> bool:
        while name is not None:
            if name == ancestor:
                return True
            branch = self._live.get(name)
            name = branch.parent if branch is not None else None  # type: ignore[assignment]
        return False

    def _discard(self, name: str) -> None:
        with self._lock:
            branch = self._live.pop(name, None)
            self._discarded.add(name)
        if branch is None:
            return
        try:
            branch.abort()
        except BranchError as e:
            if e.code not in ("not-found", "stale", "conflict"):
                log.warning("could not discard branch %s: %s", name, e)

    def commit(self, winner: CandidateResult) -> dict[str, Any]:
        """Discard every other branch, then commit ``winner`` and its ancestors in turn.

        Returns the commit result of the top-level branch (into the workspace).
        """
        assert winner.branch is not None
        chain = []
        name: str | None = winner.branch
        while name is not None:
            chain.append(name)
            name = self._live[name].parent
        self.stop()
        for live in reversed(list(self._live)):
            if live not in chain:
                self._discard(live)
        info: dict[str, Any] = {}
        for name in chain:  # leaf first: each commit lands in its parent branch
            with self._lock:
                branch = self._live.pop(name)
            info = branch.commit()
            log.info("committed branch %s", name)
        for r in self.results:
            r.committed = r.branch in chain
        self._event("commit", winner)
        return info

    def close(self) -> None:
        self.stop()
        for name in reversed(list(self._live)):
            self._discard(name)
        # a worker that creates its branch after this point sees _stopping and discards it
        self._pool.shutdown(wait=True, cancel_futures=True)
        for r in self.results:
            if r.status in (oc.QUEUED, oc.RUNNING):
                r.status = oc.CANCELLED
        shutil.rmtree(self._scratch, ignore_errors=True)


def _exception(data: bytes | None, text: str) -> BaseException:
    if data is not None:
        try:
            exc = pickle.loads(data)
            if isinstance(exc, BaseException):
                return exc
        except Exception:  # its class may not import here: keep the text
            pass
    return CandidateError(text.strip().splitlines()[-1] if text.strip() else "candidate failed")


class CandidateError(Exception):
    """A candidate's exception that could not be brought back as itself."""
