"""Verified completions: n candidates, each applied and tested in a branch of its own.

    from branching.kv.verified import engine_generate, verify
    from branching.kv.verifiers import load_verifiers

    verifier = load_verifiers("/etc/branchd/verifiers.toml")["fix-bug"]
    root = snapshot(llm, prefix_ids)
    result = verify(engine_generate(llm, root, sampling), verifier, n=4, commit=True)
    result.candidates[0].passed, result.committed, result.message

One request with ``n=`` makes the candidates (the prefix computed once); the
workspace is forked into n branches through the verifier's daemon, tied to this
process (a session: if it dies, the daemon discards them); each candidate is
applied in its branch and the verifier's test command runs there under its
limits, all at once; candidates are ranked passing first, then by cumulative
logprob; with ``commit`` the best passing one is committed and every other
branch discarded. Nothing of the request decides what runs: only the verifier.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branching.errors import BranchError
from branching.kv.verifiers import Verifier
from branching.workspace import Branch, RunResult, Session, Workspace

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

    from branching.kv.handle import PrefixHandle

log = logging.getLogger(__name__)

LOG_LIMIT = 4096  # bytes kept of each of a run's stdout and stderr (their tails)


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled candidate: its tokens, cumulative logprob and (if detokenized) text."""

    token_ids: tuple[int, ...]
    logprob: float
    text: str | None = None


Generate = Callable[[int], Sequence[Completion]]


class VerifierUnavailable(Exception):
    """The verifier cannot serve now (its daemon, workspace or file, or a model without
    the text it applies): the operator's to fix. The message is one line."""


@dataclasses.dataclass
class Checked:
    """One candidate after its run: where it ended ("apply" or "test") and how."""

    index: int
    completion: Completion
    branch: str | None = None
    stage: str = "apply"
    passed: bool = False
    exit_code: int | None = None
    signal: int | None = None
    ended_by: str | None = None
    duration: float = 0.0
    log: str = ""
    log_truncated: bool = False
    committed: bool = False

    @property
    def score(self) -> float:
        """What ranks candidates that pass alike: the cumulative logprob."""
        return self.completion.logprob

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "passed": self.passed, "stage": self.stage,
            "exit_code": self.exit_code, "signal": self.signal, "ended_by": self.ended_by,
            "score": self.score, "logprob": self.completion.logprob,
            "token_ids": list(self.completion.token_ids), "text": self.completion.text,
            "duration": round(self.duration, 3), "log": self.log,
            "log_truncated": self.log_truncated, "branch": self.branch,
            "committed": self.committed,
        }


@dataclasses.dataclass
class Verified:
    """Every candidate, ranked (passing first, then by score), and what was committed."""

    id: str
    verifier: str
    candidates: list[Checked]
    committed: int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "verifier": self.verifier, "committed": self.committed,
                "message": self.message,
                "candidates": [c.to_json() for c in self.candidates]}


def engine_generate(engine: LLM, handle: PrefixHandle, sampling: SamplingParams,
                    new_tokens: Sequence[int] = ()) -> Generate:
    """A `Generate` from an in-process engine: `fork.candidates`, one request with
    ``n=`` on the snapshot's prefix (token ids only: no text)."""
    from branching.kv.fork import candidates

    def generate(n: int) -> list[Completion]:
        return [Completion(tuple(c.token_ids), c.score)
                for c in candidates(engine, handle, n, sampling, new_tokens)]
    return generate


def verify(generate: Generate, verifier: Verifier, n: int, *,
           commit: bool = False) -> Verified:
    """Generate `n` candidates, test each in its own branch, rank them, and with
    `commit` commit the best passing one; every other branch is discarded.

    Raises ValueError for an `n` the verifier does not allow, VerifierUnavailable
    when the verifier cannot run (nothing is left behind then either)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= verifier.max_n:
        raise ValueError(f"n must be a whole number from 1 to {verifier.max_n} "
                         f"(verifier {verifier.name}), not {n!r}")
    completions = list(generate(n))
    if verifier.content == "text" and any(c.text is None for c in completions):
        raise VerifierUnavailable(f"verifier {verifier.name} applies text, and the model "
                                  "gave token ids only (no tokenizer): use content = "
                                  "\"token_ids\"")
    checked = [Checked(i, c) for i, c in enumerate(completions)]
    rid = uuid.uuid4().hex[:12]
    with _lock_of(verifier):
        ranked, committed, message = _verify(verifier, rid, checked, commit)
    log.info("verified %s (%s): %s", rid, verifier.name, message)
    return Verified(rid, verifier.name, ranked, committed, message)


def _lock_of(verifier: Verifier) -> threading.Lock:
    """One request at a time per workspace (and daemon) in this process: a commit
    ends every other candidate branch of the workspace (first commit wins), so a
    request running beside another's commit would see its candidates killed."""
    key = (verifier.socket, os.path.realpath(verifier.workspace))
    with _locks_lock:
        return _locks.setdefault(key, threading.Lock())


_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_lock = threading.Lock()


def _verify(verifier: Verifier, rid: str, checked: list[Checked],
            commit: bool) -> tuple[list[Checked], int | None, str]:
    try:
        ws = Workspace(verifier.workspace, daemon=verifier.socket)
    except BranchError as e:
        raise VerifierUnavailable(f"verifier {verifier.name}: {e}") from None
    try:
        with ws, tempfile.TemporaryDirectory(prefix="branchd-verified-") as scratch, \
                ws.session() as session:
            branches = _check_all(session, verifier, rid, checked, Path(scratch))
            ranked = sorted(checked, key=lambda c: (not c.passed, -c.score, c.index))
            committed, message = _settle(ranked, branches, commit)
    except BranchError as e:
        # the daemon refused or went away: the session's branches are discarded
        raise VerifierUnavailable(f"verifier {verifier.name}: {e}") from None
    except OSError as e:
        raise VerifierUnavailable(f"verifier {verifier.name}: cannot apply a candidate: "
                                  f"{e}") from None
    return ranked, committed, message


def _check_all(session: Session, verifier: Verifier, rid: str, checked: list[Checked],
               scratch: Path) -> dict[int, Branch]:
    """Fork a branch per candidate and check them all at once; the branches, by index."""
    branches: dict[int, Branch] = {}

    def check(c: Checked) -> None:
        # first commit wins among the candidates; branches outside them carry on over it
        b = branches[c.index] = session.create(f"verified-{rid}-{c.index}",
                                               on_sibling_commit="invalidate")
        c.branch = b.name
        _check(b, verifier, c, scratch)

    with ThreadPoolExecutor(verifier.parallel or len(checked),
                            thread_name_prefix=f"verified-{rid}") as pool:
        futures = [pool.submit(check, c) for c in checked]
    for f in futures:
        f.result()  # the first error, after every run ended
    return branches


def _check(branch: Branch, verifier: Verifier, c: Checked, scratch: Path) -> None:
    run_args: dict[str, Any] = {"limits": verifier.run_limits(), "env": dict(verifier.env),
                                "cwd": "."}  # "." is the workspace's root
    if verifier.apply == "git-apply":
        diff = scratch / f"{c.index}.diff"
        diff.write_text(c.completion.text or "")
        run = branch.run(["git", "apply", "--", str(diff)], **run_args)
        if not run.ok:
            _record(c, "apply", run)
            return
    else:
        _write(branch, verifier, c.completion)
    run_args["cwd"] = verifier.cwd or "."
    _record(c, "test", branch.run(list(verifier.test), **run_args))


def _write(branch: Branch, verifier: Verifier, completion: Completion) -> None:
    """The candidate into the verifier's file in the branch (never outside it)."""
    assert verifier.file is not None
    target = branch.path / verifier.file
    target.parent.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(branch.path)
    if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:
        raise OSError(f"{verifier.file}: its directory leads out of the workspace")
    if verifier.content == "token_ids":
        text = "".join(f"{t}\n" for t in completion.token_ids)
    else:
        text = completion.text or ""
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)


def _record(c: Checked, stage: str, run: RunResult) -> None:
    c.stage, c.passed = stage, stage == "test" and run.ok
    c.exit_code, c.signal, c.ended_by = run.exit_code, run.signal, run.ended_by
    c.duration = run.duration
    out, cut_out = _tail(run.stdout_path)
    err, cut_err = _tail(run.stderr_path)
    c.log, c.log_truncated = out + err, cut_out or cut_err


def _tail(path: Path | None) -> tuple[str, bool]:
    """The last LOG_LIMIT bytes of a run's output file, and whether more came before."""
    if path is None:
        return "", False
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - LOG_LIMIT))
        return f.read().decode(errors="replace"), size > LOG_LIMIT


def _settle(ranked: list[Checked], branches: dict[int, Branch],
            commit: bool) -> tuple[int | None, str]:
    """Commit the best passing candidate if asked; discard every other branch."""
    best = next((c for c in ranked if c.passed), None)
    keep = best if commit and best is not None else None
    for c in ranked:
        if c is not keep:
            _discard(branches[c.index])
    if best is None:
        return None, f"none of {len(ranked)} candidates passed: nothing committed"
    if keep is None:
        return None, (f"candidate {best.index} passed first; commit not asked: "
                      "nothing committed")
    try:
        branches[keep.index].commit()
    except BranchError as e:
        _discard(branches[keep.index])
        return None, f"candidate {keep.index} passed, and its commit was refused: {e}"
    keep.committed = True
    return keep.index, f"committed candidate {keep.index}"


def _discard(branch: Branch) -> None:
    try:
        branch.abort()
    except BranchError as e:
        if e.code != "not-found":
            raise
