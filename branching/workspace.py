"""``Workspace`` and ``Branch``: what agent code holds.

A Workspace is a directory registered with a daemon (a running branchd, or an
embedded one started on demand). Branches are handles by name: every property
that can change (status, metadata) is asked of the daemon, never cached.

Every call that asks the daemon has an async twin named with an ``a`` in front
(``acreate``, ``abranch``, ``arun``, ``acommit``, ...) for asyncio and trio: it
speaks the same protocol through ``branching.aclient``, waiting on the event
loop, so concurrent ``arun``s are concurrent runs, not threads. Both build their
requests with the same helpers here, so they send the same thing.
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from branching.aclient import AsyncClient
from branching.client import Client
from branching.embedded import EmbeddedDaemon
from branching.errors import BranchError
from branching.paths import relative_cwd
from cgroups import Limits
from daemon.protocol import ended_by as ended_by_of

ACTIONS = ("commit", "abort", "keep")


@dataclass(frozen=True)
class RunResult:
    """How a run in a branch ended, as the daemon's cgroup accounting saw it.

    ``ended_by`` says why (``daemon.protocol.ENDED_BY``): "exit" or "signal" when it
    ended by itself, else "timeout", "oom", "commit", "discard", "invalidated",
    "kill", "detached" or "shutdown". For an unprivileged daemon's run at the workspace's
    path, ``served_by`` says what served the branch there: "overlay" (the run's own kernel
    overlay) or "fuse" (the bind of the FUSE mount; ``served_why`` says why); None for
    other runs (a root daemon's bind shows what serves the branch: ``Branch.backend``)."""

    run: str
    exit_code: int | None
    signal: int | None
    oom_killed: bool
    timed_out: bool
    killed: bool
    peak_memory: int | None
    cpu_time: float | None
    duration: float
    stdout_path: Path | None = None
    stderr_path: Path | None = None
    ended_by: str = "exit"
    served_by: str | None = None
    served_why: str = ""

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> RunResult:
        r = reply["result"]
        return cls(
            run=reply["run"], exit_code=r.get("exit_code"), signal=r.get("signal"),
            oom_killed=bool(r.get("oom_killed")), timed_out=bool(r.get("timed_out")),
            killed=bool(r.get("killed")), peak_memory=r.get("peak_memory"),
            cpu_time=r.get("cpu_time"), duration=float(r.get("duration", 0.0)),
            stdout_path=Path(reply["stdout_path"]) if reply.get("stdout_path") else None,
            stderr_path=Path(reply["stderr_path"]) if reply.get("stderr_path") else None,
            ended_by=ended_by_of(r), served_by=reply.get("served_by"),
            served_why=reply.get("served_why", ""),
        )

    @property
    def returncode(self) -> int:
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not (self.timed_out or self.oom_killed or self.killed)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def to_dict(self) -> dict[str, Any]:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()}
        out["returncode"] = self.returncode
        out["ok"] = self.ok
        return out


@dataclass(frozen=True)
class BranchRef:
    """A branch as plain data: JSON, msgpack or pickle carry it to another graph step or
    process, where ``Workspace.open(ref)`` (or ``ref.open()``) gives the ``Branch`` back.

    ``socket`` is the daemon's (an embedded daemon's too, while its owner lives);
    ``id`` tells a branch from a later one of the same name."""

    workspace: str  # the workspace's directory
    name: str
    id: str
    socket: str

    def to_dict(self) -> dict[str, str]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BranchRef:
        return cls(str(data["workspace"]), str(data["name"]), str(data["id"]),
                   str(data["socket"]))

    def open(self) -> Branch:
        """The branch, through a Workspace shared by every ref to the same daemon and
        directory in this process (kept open until the process ends)."""
        key = (self.socket, self.workspace)
        with _shared_lock:
            ws = _shared.get(key)
            if ws is None:
                ws = _shared[key] = Workspace(self.workspace, daemon=self.socket)
        return ws.open(self)

    async def aopen(self) -> Branch:
        """``open``, awaited (the shared Workspace is made, once, in a worker thread)."""
        key = (self.socket, self.workspace)
        with _shared_lock:
            ws = _shared.get(key)
        if ws is None:
            made = await anyio.to_thread.run_sync(
                lambda: Workspace(self.workspace, daemon=self.socket))
            with _shared_lock:
                ws = _shared.setdefault(key, made)
            if ws is not made:  # another task made it meanwhile
                made.close()
        return await ws.aopen(self)


_shared: dict[tuple[str, str], Workspace] = {}
_shared_lock = threading.Lock()


class Workspace:
    """A directory whose branches this process creates, runs in, commits and discards."""

    def __init__(self, path: str | os.PathLike[str], *,
                 daemon: str | os.PathLike[str] | EmbeddedDaemon | None = None) -> None:
        self._embedded: EmbeddedDaemon | None = None
        if daemon is None:
            daemon = os.environ.get("BRANCHD_SOCKET") or None
        if daemon is None:
            self._embedded = EmbeddedDaemon().start()
            daemon = self._embedded
        socket_path = daemon.socket if isinstance(daemon, EmbeddedDaemon) else daemon
        self.client = Client(socket_path)
        self.aclient = AsyncClient(socket_path)  # opens nothing until used
        try:
            info = self.client.call("workspace-add", path=str(Path(path).expanduser().absolute()))
            status = self.client.call("status")
        except BaseException:
            self.close()
            raise
        self.name: str = info["name"]
        self.base = Path(info["base"])
        self.mountpoint = Path(status["mountpoint"])

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Workspace({str(self.base)!r}, name={self.name!r})"

    def close(self) -> None:
        self.client.close()
        self.aclient.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def create(self, name: str | None = None, *, parent: Branch | str | None = None,
               meta: dict[str, Any] | None = None,
               on_sibling_commit: str = "rebase") -> Branch:
        """A new branch of the workspace (or of ``parent``), created in O(1). When a
        sibling commits, it carries on over the sibling's changes (``"rebase"``,
        merging where both changed a file; ``Branch.conflicts`` lists what did not
        merge) or ends (``"invalidate"``: first commit wins)."""
        return Branch(self, self.client.call(
            "create", **self._create_args(name, parent, meta, on_sibling_commit)))

    async def acreate(self, name: str | None = None, *, parent: Branch | str | None = None,
                      meta: dict[str, Any] | None = None,
                      on_sibling_commit: str = "rebase") -> Branch:
        """``create``, awaited."""
        return Branch(self, await self.aclient.call(
            "create", **self._create_args(name, parent, meta, on_sibling_commit)))

    def _create_args(self, name: str | None, parent: Branch | str | None,
                     meta: dict[str, Any] | None, on_sibling_commit: str) -> dict[str, Any]:
        return {"workspace": self.name, "name": name or f"b-{uuid.uuid4().hex[:10]}",
                "parent": parent.name if isinstance(parent, Branch) else parent,
                "meta": meta, "on_sibling_commit": on_sibling_commit}

    def branch(self, name: str | None = None, *, parent: Branch | str | None = None,
               on_success: str = "commit", on_error: str = "abort",
               meta: dict[str, Any] | None = None) -> AbstractContextManager[Branch]:
        """A branch for the ``with`` block: committed on success, discarded on error."""
        return _block(functools.partial(self.create, name, parent=parent, meta=meta),
                      on_success, on_error)

    def abranch(self, name: str | None = None, *, parent: Branch | str | None = None,
                on_success: str = "commit", on_error: str = "abort",
                meta: dict[str, Any] | None = None) -> AbstractAsyncContextManager[Branch]:
        """``branch`` for ``async with``: committed on success, discarded on error (and
        when the block is cancelled: the discard is shielded from the cancellation)."""
        return _ablock(functools.partial(self.acreate, name, parent=parent, meta=meta),
                       on_success, on_error)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Branches for the ``with`` block that do not outlive it unless it succeeds:
        those created through the session (``s.create``, ``s.branch``, and their
        ``b.create``) are discarded when the block raises, and by the daemon itself
        when this process dies holding them (they are tied to one connection, which
        the session holds open). ``keep=True`` makes a branch that outlives both.
        After a block that succeeds, what it left uncommitted is the caller's."""
        s = Session(self)
        try:
            yield s
        except BaseException:
            s._end(discard=True)
            raise
        s._end(discard=False)

    @asynccontextmanager
    async def asession(self) -> AsyncIterator[AsyncSession]:
        """``session`` for ``async with`` (``await s.acreate()``, ``s.abranch()``)."""
        s = AsyncSession(self)
        try:
            yield s
        except BaseException:
            with anyio.CancelScope(shield=True):
                await s._aend(discard=True)
            raise
        await s._aend(discard=False)

    def branches(self) -> list[Branch]:
        reply = self.client.call("list", workspace=self.name)
        return [Branch(self, info) for info in reply["branches"]]

    async def abranches(self) -> list[Branch]:
        reply = await self.aclient.call("list", workspace=self.name)
        return [Branch(self, info) for info in reply["branches"]]

    def get(self, name: str) -> Branch:
        return Branch(self, self.client.call("info", workspace=self.name, name=name))

    async def aget(self, name: str) -> Branch:
        return Branch(self, await self.aclient.call("info", workspace=self.name, name=name))

    def open(self, ref: BranchRef | dict[str, Any]) -> Branch:
        """The branch a ``BranchRef`` (or its dict) names; it must be this workspace's and
        still the same branch (a later branch of the same name is another one)."""
        ref = self._own(ref)
        return self._same(ref, self.get(ref.name))

    async def aopen(self, ref: BranchRef | dict[str, Any]) -> Branch:
        """``open``, awaited."""
        ref = self._own(ref)
        return self._same(ref, await self.aget(ref.name))

    def _own(self, ref: BranchRef | dict[str, Any]) -> BranchRef:
        if isinstance(ref, dict):
            ref = BranchRef.from_dict(ref)
        if Path(ref.workspace) != self.base:
            raise BranchError("bad-request", f"branch {ref.name} is of workspace "
                              f"{ref.workspace}, not {self.base}")
        return ref

    def _same(self, ref: BranchRef, b: Branch) -> Branch:
        if b.id != ref.id:
            raise BranchError("not-found", f"branch {ref.name} of {self.base} is another "
                              "branch now: the one referred to has ended")
        return b


def _check_actions(on_success: str, on_error: str) -> None:
    if on_success not in ACTIONS or on_error not in ACTIONS:
        raise ValueError(f"on_success and on_error must be one of {ACTIONS}")


@contextmanager
def _block(create: Callable[[], Branch], on_success: str, on_error: str) -> Iterator[Branch]:
    """The branch *create* makes, for a ``with`` block: *on_success* when the block
    ends, *on_error* when it raises (``branch`` of a workspace or a session)."""
    _check_actions(on_success, on_error)
    b = create()
    try:
        yield b
    except BaseException:
        b._finish(on_error)
        raise
    b._finish(on_success)


@asynccontextmanager
async def _ablock(create: Callable[[], Awaitable[Branch]], on_success: str,
                  on_error: str) -> AsyncIterator[Branch]:
    """``_block`` for ``async with``; *on_error* is shielded from a cancellation."""
    _check_actions(on_success, on_error)
    b = await create()
    try:
        yield b
    except BaseException:
        with anyio.CancelScope(shield=True):
            await b._afinish(on_error)
        raise
    await b._afinish(on_success)


class Session:
    """Branches tied to one daemon connection (``Workspace.session()``): while it is
    open the daemon holds them for this process; when it closes without the session
    ended (the process died) the daemon discards them. Thread-safe."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self._held = workspace.client.held()
        self._lock = threading.Lock()
        self.branches: list[Branch] = []  # created through it, keep=True ones excepted

    def create(self, name: str | None = None, *, parent: Branch | str | None = None,
               meta: dict[str, Any] | None = None, on_sibling_commit: str = "rebase",
               keep: bool = False) -> Branch:
        """``Workspace.create`` in the session; ``keep`` opts out of it (the branch
        outlives the session and this process)."""
        ws = self.workspace
        args = ws._create_args(name, parent, meta, on_sibling_commit)
        if keep:
            return Branch(ws, ws.client.call("create", **args))
        b = Branch(ws, self._held.call("create", session=True, **args), session=self)
        with self._lock:
            self.branches.append(b)
        return b

    def branch(self, name: str | None = None, *, parent: Branch | str | None = None,
               on_success: str = "commit", on_error: str = "abort",
               meta: dict[str, Any] | None = None,
               keep: bool = False) -> AbstractContextManager[Branch]:
        """``Workspace.branch`` in the session."""
        return _block(functools.partial(self.create, name, parent=parent, meta=meta,
                                        keep=keep), on_success, on_error)

    def _end(self, discard: bool) -> None:
        if not self._held.opened:
            return  # nothing was made through it
        try:
            self._held.call("session-end", discard=discard or None)
        except BranchError:
            self._held.release(broken=True)
            if not discard:
                raise
            return  # the connection is lost: the daemon discards them as it sees it close
        self._held.release()


class AsyncSession:
    """``Session`` for async code (``Workspace.asession()``); one event loop's."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self._held = workspace.aclient.held()
        self.branches: list[Branch] = []

    async def acreate(self, name: str | None = None, *, parent: Branch | str | None = None,
                      meta: dict[str, Any] | None = None, on_sibling_commit: str = "rebase",
                      keep: bool = False) -> Branch:
        ws = self.workspace
        args = ws._create_args(name, parent, meta, on_sibling_commit)
        if keep:
            return Branch(ws, await ws.aclient.call("create", **args))
        b = Branch(ws, await self._held.call("create", session=True, **args), session=self)
        self.branches.append(b)
        return b

    def abranch(self, name: str | None = None, *, parent: Branch | str | None = None,
                on_success: str = "commit", on_error: str = "abort",
                meta: dict[str, Any] | None = None,
                keep: bool = False) -> AbstractAsyncContextManager[Branch]:
        return _ablock(functools.partial(self.acreate, name, parent=parent, meta=meta,
                                         keep=keep), on_success, on_error)

    async def _aend(self, discard: bool) -> None:
        if not self._held.opened:
            return
        try:
            await self._held.call("session-end", discard=discard or None)
        except BranchError:
            self._held.release(broken=True)
            if not discard:
                raise
            return
        self._held.release()


class Branch:
    """A handle on one branch of a workspace (and of a session, if made in one: the
    branches it creates are the session's too)."""

    def __init__(self, workspace: Workspace, info: dict[str, Any], *,
                 session: Session | AsyncSession | None = None) -> None:
        self.workspace = workspace
        self.session = session
        self.name: str = info["name"]
        self.parent: str | None = info.get("parent")
        self.path = Path(info["path"])
        self.id: str = info["id"]

    def __repr__(self) -> str:
        return f"Branch({self.name!r}, path={str(self.path)!r})"

    def ref(self) -> BranchRef:
        """This branch as plain data (see BranchRef)."""
        return BranchRef(str(self.workspace.base), self.name, self.id,
                         str(self.workspace.client.socket_path))

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled as its reference: unpickling opens it again (BranchRef.open)
        return (BranchRef.open, (self.ref(),))

    def _call(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        return self.workspace.client.call(op, fds, workspace=self.workspace.name,
                                          name=self.name, **args)

    async def _acall(self, op: str, fds: list[int] | None = None, **args: Any) -> dict[str, Any]:
        return await self.workspace.aclient.call(op, fds, workspace=self.workspace.name,
                                                 name=self.name, **args)

    @property
    def info(self) -> dict[str, Any]:
        return self._call("info")

    async def ainfo(self) -> dict[str, Any]:
        """``info``, awaited (a method: a property cannot be awaited)."""
        return await self._acall("info")

    @property
    def status(self) -> str:
        return str(self.info["status"])

    @property
    def backend(self) -> str | None:
        """What serves the branch now: "overlay" (a kernel overlay mount at ``path``)
        or "fuse" (the daemon's FUSE mount), None once it has ended or was invalidated
        (nothing serves it); asked of the daemon at each use."""
        backend = self.info.get("backend", "fuse")
        return None if backend is None else str(backend)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.info.get("meta") or {})

    def set_meta(self, key: str, value: Any) -> None:
        self._call("set-meta", meta={key: value})

    async def aset_meta(self, key: str, value: Any) -> None:
        await self._acall("set-meta", meta={key: value})

    def create(self, name: str | None = None, **kw: Any) -> Branch:
        if isinstance(self.session, Session):
            return self.session.create(name, parent=self, **kw)
        return self.workspace.create(name, parent=self, **kw)

    async def acreate(self, name: str | None = None, **kw: Any) -> Branch:
        if isinstance(self.session, AsyncSession):
            return await self.session.acreate(name, parent=self, **kw)
        return await self.workspace.acreate(name, parent=self, **kw)

    def branch(self, name: str | None = None, **kw: Any) -> Any:
        if isinstance(self.session, Session):
            return self.session.branch(name, parent=self, **kw)
        return self.workspace.branch(name, parent=self, **kw)

    def abranch(self, name: str | None = None, **kw: Any) -> Any:
        if isinstance(self.session, AsyncSession):
            return self.session.abranch(name, parent=self, **kw)
        return self.workspace.abranch(name, parent=self, **kw)

    def run(self, argv: list[str] | str, *, limits: Limits | None = None,
            timeout: float | None = None, env: dict[str, str] | None = None,
            stdin: int | None = None, capture: bool = True,
            at_branch_path: bool = False, cwd: str | os.PathLike[str] | None = None) -> RunResult:
        """Run a command in the branch, in its own cgroup; blocks until it ends.

        The command sees the branch at the workspace's own path (a private mount
        namespace), so absolute paths (a venv, an editable install) resolve into
        the branch; ``at_branch_path`` runs it at the branch's path instead. It
        starts in ``cwd`` (a path in the workspace or the branch, or relative to
        the workspace's root), by default the caller's own directory where that
        is inside the workspace or the branch, else the workspace's root."""
        args, fds = self._exec_args(argv, limits, timeout, env, stdin, capture,
                                    at_branch_path, cwd)
        # one connection for the run's start and its end: the daemon kills a run whose
        # connection goes away (a client that died)
        with self.workspace.client.connection() as c:
            reply = c.call("exec", fds, **args)
            return RunResult.from_reply(c.call("wait", run=reply["run"]))

    async def arun(self, argv: list[str] | str, *, limits: Limits | None = None,
                   # the run's limit, as run's: the daemon kills it and says timed_out
                   timeout: float | None = None,  # noqa: ASYNC109
                   env: dict[str, str] | None = None,
                   stdin: int | None = None, capture: bool = True,
                   at_branch_path: bool = False,
                   cwd: str | os.PathLike[str] | None = None) -> RunResult:
        """``run``, awaited: the run is the daemon's, the wait for it the event loop's.
        Cancelling the awaiting task closes the run's connection, and the daemon kills
        the run."""
        args, fds = self._exec_args(argv, limits, timeout, env, stdin, capture,
                                    at_branch_path, cwd)
        async with self.workspace.aclient.connection() as c:
            reply = await c.call("exec", fds, **args)
            return RunResult.from_reply(await c.call("wait", run=reply["run"]))

    def _exec_args(self, argv: list[str] | str, limits: Limits | None, timeout: float | None,
                   env: dict[str, str] | None, stdin: int | None, capture: bool,
                   at_branch_path: bool, cwd: str | os.PathLike[str] | None,
                   ) -> tuple[dict[str, Any], list[int] | None]:
        """The ``exec`` request of ``run`` and ``arun``: its arguments, the fds passed."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        limits = limits or Limits()
        if timeout is not None:
            limits = Limits.from_dict({**limits.to_dict(), "timeout": timeout})
        fds = None
        if not capture:
            fds = [stdin if stdin is not None else 0, 1, 2]
        args = dict(
            workspace=self.workspace.name, name=self.name, argv=list(argv),
            limits=limits.to_dict(), env=dict(os.environ if env is None else env),
            at_branch_path=at_branch_path or None,
            cwd=relative_cwd(cwd, self.workspace.base, self.path) or None,
        )
        return args, fds

    def commit(self, *, force: bool = False) -> dict[str, Any]:
        """Apply the branch to its parent; refused (code "conflict") if a path it would
        replace changed in the parent since, unless ``force``."""
        return self._call("commit", force=force or None)

    async def acommit(self, *, force: bool = False) -> dict[str, Any]:
        """``commit``, awaited."""
        return await self._acall("commit", force=force or None)

    def abort(self) -> None:
        self._call("discard")

    async def aabort(self) -> None:
        """``abort``, awaited."""
        await self._acall("discard")

    adiscard = aabort  # the daemon's (and the MCP tools') word for it

    @property
    def conflicts(self) -> list[str]:
        """Paths where this branch's changes and its parent's did not merge."""
        return list(self.info.get("conflicts", []))

    def rebase(self) -> dict[str, Any]:
        """Onto the parent's current state: ``{"merged": [...], "conflicts": [...]}``."""
        return self._call("rebase")

    def resolve(self, path: str, how: str = "ours") -> list[str]:
        """Settle the conflict at *path* (``"ours"``, ``"theirs"`` or ``"markers"``);
        returns the conflicts left."""
        return list(self._call("resolve", path=path, how=how)["conflicts"])

    def diff(self, paths: list[str] | None = None) -> list[dict[str, Any]]:
        """Every change against the parent (at or below *paths*), fetched in pages."""
        return [c for page in self._diff_pages(paths, False) for c in page["changes"]]

    def patch(self, paths: list[str] | None = None) -> str:
        """A unified diff of the changed text files (each reply's part is size-bounded:
        a line says which files did not fit; ask for fewer *paths* then)."""
        return "".join(page.get("patch", "") for page in self._diff_pages(paths, True))

    def diff_stat(self, paths: list[str] | None = None) -> dict[str, int]:
        """How many paths were added, modified and deleted."""
        return dict(self._call("diff", stat=True, paths=paths)["stat"])

    def _diff_pages(self, paths: list[str] | None, patch: bool) -> Iterator[dict[str, Any]]:
        offset: int | None = 0
        while offset is not None:
            page = self._call("diff", offset=offset, paths=paths, patch=patch or None)
            yield page
            offset = page["next"]

    async def adiff(self, patch: bool = False) -> list[dict[str, Any]]:
        return list((await self._acall("diff", patch=patch or None))["changes"])

    def _finish(self, action: str) -> None:
        if action == "commit":
            self.commit()
        elif action == "abort":
            try:
                self.abort()
            except BranchError as e:
                if e.code != "not-found":  # already gone is what abort wants
                    raise

    async def _afinish(self, action: str) -> None:
        if action == "commit":
            await self.acommit()
        elif action == "abort":
            try:
                await self.aabort()
            except BranchError as e:
                if e.code != "not-found":
                    raise
