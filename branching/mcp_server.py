"""``branchctl mcp``: branchd as an MCP server, for every agent that speaks MCP.

Built on the official SDK (``mcp``, the ``MCPServer`` API) over the same Python
API agents import: each tool is a thin function over ``Workspace`` and
``Branch``, with the arguments' JSON schema taken from its signature. A tool
reaches only the workspaces the server was started for (``--workspace``,
repeatable); a file path is resolved inside the branch one component at a time
with O_NOFOLLOW, so neither ``..`` nor a symlink leads out. Every failure is a
tool error (``is_error``) with one line for the model: the daemon's error code
and message.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from branching.embedded import EmbeddedDaemon
from branching.errors import BranchError
from branching.workspace import Branch, Workspace
from cgroups import Limits, parse_size

OUTPUT_LIMIT = 16 * 1024  # characters of a run's stdout and of its stderr in a reply (the tail)
PATCH_LIMIT = 64 * 1024  # characters of a diff's patch in a reply
READ_LIMIT = 256 * 1024  # bytes a file_read returns at most

F = TypeVar("F", bound=Callable[..., Any])


class Tools:
    """The server's workspaces and the tools over them."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], socket: str | None) -> None:
        if not paths:
            raise BranchError("bad-request", "give at least one --workspace")
        socket = socket or os.environ.get("BRANCHD_SOCKET") or None
        self._embedded = None if socket else EmbeddedDaemon().start()  # as Workspace() does
        daemon: str | EmbeddedDaemon = socket or self._embedded  # type: ignore[assignment]
        self.workspaces: dict[str, Workspace] = {}
        try:
            for p in paths:
                ws = Workspace(p, daemon=daemon)
                self.workspaces[ws.name] = ws
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ws in self.workspaces.values():
            ws.close()
        if self._embedded is not None:
            self._embedded.stop()

    def workspace(self, name: str | None) -> Workspace:
        """One of the server's workspaces, by name or directory; the only one by default."""
        if name is None:
            if len(self.workspaces) == 1:
                return next(iter(self.workspaces.values()))
            raise BranchError("bad-request", "several workspaces: say which "
                              f"({', '.join(sorted(self.workspaces))})")
        for ws in self.workspaces.values():
            if name in (ws.name, str(ws.base)):
                return ws
        raise BranchError("permission", f"workspace {name!r} is not one this server was "
                          f"started for ({', '.join(sorted(self.workspaces))})")

    def branch(self, name: str, workspace: str | None) -> Branch:
        return self.workspace(workspace).get(name)


def server(tools: Tools) -> MCPServer:
    app = MCPServer("branchd", instructions=(
        "Copy-on-write branches of a workspace: create a branch, change files and run "
        "commands in it (they see the branch at the workspace's own path), look at its "
        "diff, then commit it into its parent or discard it. speculate and best_of_n run "
        "several commands in branches of their own and commit the winner."))

    def tool(fn: F) -> F:
        """Register ``fn`` (its schema from its signature); every BranchError or OSError
        becomes a tool error: one line for the model."""
        def tool_error(e: Exception) -> ToolError:
            if isinstance(e, BranchError):
                return ToolError(f"{e.code}: {e}")
            assert isinstance(e, OSError)
            return ToolError(f"{errno.errorcode.get(e.errno or 0, 'error')}: {e.strerror}")

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (BranchError, OSError) as e:
                raise tool_error(e) from None

        @functools.wraps(fn)
        async def acall(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except (BranchError, OSError) as e:
                raise tool_error(e) from None

        # the SDK runs a sync tool in a worker thread, an async one on its event loop
        app.add_tool(acall if inspect.iscoroutinefunction(fn) else call)
        return fn

    @tool
    def create_branch(name: str | None = None, parent: str | None = None,
                      workspace: str | None = None) -> dict[str, Any]:
        """Create a branch of the workspace (or of the branch ``parent``) in O(1).
        Returns its name and path."""
        ws = tools.workspace(workspace)
        return _describe(ws.create(name, parent=parent))

    @tool
    def list_branches(workspace: str | None = None) -> list[dict[str, Any]]:
        """The workspace's active branches."""
        return [_describe(b) for b in tools.workspace(workspace).branches()]

    @tool
    def branch_info(branch: str, workspace: str | None = None) -> dict[str, Any]:
        """A branch's status, parent, path, backend and runs."""
        return tools.branch(branch, workspace).info

    @tool
    def read_file(branch: str, path: str, workspace: str | None = None) -> str:
        """A text file of the branch (``path`` relative to the workspace's root), at most
        256 KiB; binary content is replaced where it is not UTF-8."""
        b = tools.branch(branch, workspace)
        with _inside(b.path, path, os.O_RDONLY) as fd:
            data = os.pread(fd, READ_LIMIT + 1, 0)
        more = "" if len(data) <= READ_LIMIT else f"\n[cut at {READ_LIMIT} bytes]"
        return data[:READ_LIMIT].decode(errors="replace") + more

    @tool
    def write_file(branch: str, path: str, content: str,
                   workspace: str | None = None) -> dict[str, Any]:
        """Write ``content`` to a file of the branch (``path`` relative to the workspace's
        root; missing directories are made). The workspace itself is untouched."""
        b = tools.branch(branch, workspace)
        data = content.encode()
        with _inside(b.path, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, make_dirs=True) as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        return {"path": path, "bytes": len(data)}

    @tool
    async def exec_command(branch: str, command: str,
                           timeout: float = 600,  # noqa: ASYNC109 (the run's, as Branch.arun's)
                           memory: str | None = None, cpus: float | None = None,
                           pids: int | None = None,
                           workspace: str | None = None) -> dict[str, Any]:
        """Run a shell command in the branch (it sees the branch at the workspace's path)
        in its own cgroup, with a timeout in seconds and optional limits (memory like
        "1G", cpus, pids). Returns the exit code and the tail of stdout and stderr, with
        the paths of the whole logs."""
        # awaited on the server's loop, no thread held: a cancelled call kills its run
        b = await tools.workspace(workspace).aget(branch)
        limits = Limits(memory=parse_size(memory) if memory else None, cpus=cpus, pids=pids)
        r = await b.arun(command, limits=limits, timeout=timeout, cwd="")
        stdout, stderr = await anyio.to_thread.run_sync(lambda: (r.stdout, r.stderr))
        return {
            "exit_code": r.returncode, "ok": r.ok, "timed_out": r.timed_out,
            "oom_killed": r.oom_killed, "ended_by": r.ended_by,
            "duration": round(r.duration, 3),
            "stdout": _tail(stdout), "stderr": _tail(stderr),
            "stdout_path": str(r.stdout_path), "stderr_path": str(r.stderr_path),
        }

    @tool
    def diff(branch: str, patch: bool = False, paths: list[str] | None = None,
             offset: int = 0, workspace: str | None = None) -> dict[str, Any]:
        """What the branch changed against its parent: counts by kind (``stat``), then
        one page of the paths added, modified and deleted from ``offset`` (``next``: the
        offset of the next page, null after the last), only at or below ``paths`` if
        given; with ``patch`` a unified diff of that page's text files (cut at 64 KiB)."""
        ws = tools.workspace(workspace)
        reply = ws.client.call("diff", workspace=ws.name, name=branch, patch=patch or None,
                               paths=paths, offset=offset)
        out: dict[str, Any] = {"stat": reply["stat"], "total": reply["total"],
                               "changes": reply["changes"], "next": reply["next"]}
        if patch:
            text = reply.get("patch", "")
            out["patch"] = text[:PATCH_LIMIT]
            if len(text) > PATCH_LIMIT:
                out["patch_cut"] = f"{len(text) - PATCH_LIMIT} more characters not shown"
        return out

    @tool
    def commit(branch: str, force: bool = False, workspace: str | None = None) -> dict[str, Any]:
        """Apply the branch to its parent (the workspace, for a top-level branch)
        atomically; the branch ends."""
        return tools.branch(branch, workspace).commit(force=force)

    @tool
    def rebase(branch: str, workspace: str | None = None) -> dict[str, Any]:
        """Bring the branch onto its parent's current state (after a sibling's commit,
        or changes made to the workspace outside branchd): text files both changed are
        merged; ``conflicts`` lists what did not merge (its commit is refused until each
        is resolved)."""
        return tools.branch(branch, workspace).rebase()

    @tool
    def resolve(branch: str, path: str, how: str = "ours",
                workspace: str | None = None) -> dict[str, Any]:
        """Settle a conflict of the branch at ``path``: ``how`` is "ours" (keep the
        branch's file as it is now, e.g. after write_file), "theirs" (take the parent's)
        or "markers" (write conflict markers into the branch's file, to edit, then
        resolve "ours"). Returns the conflicts left."""
        return {"conflicts": tools.branch(branch, workspace).resolve(path, how)}

    @tool
    def discard(branch: str, workspace: str | None = None) -> dict[str, Any]:
        """Drop the branch and its children, killing their processes."""
        tools.branch(branch, workspace).abort()
        return {"discarded": branch}

    @tool
    def speculate(commands: list[str], in_order: bool = False, timeout: float = 600,
                  workspace: str | None = None) -> dict[str, Any]:
        """Run each shell command at once in a branch of its own; the first to succeed
        (with ``in_order``: the first in the list that succeeds) is committed, the rest
        discarded."""
        from branching.patterns import Speculate

        ws = tools.workspace(workspace)
        return _outcome(Speculate(commands, first_wins=not in_order, timeout=timeout)(ws))

    @tool
    def best_of_n(command: str, n: int = 3, timeout: float = 600,
                  workspace: str | None = None) -> dict[str, Any]:
        """Run the shell command ``n`` times, each in a branch of its own
        ($BRANCHING_ATTEMPT is 1..n; a score goes to fd 3); the best-scoring success is
        committed."""
        from branching.patterns import BestOfN

        ws = tools.workspace(workspace)
        return _outcome(BestOfN(command, n=n, timeout=timeout)(ws))

    return app


def _describe(b: Branch) -> dict[str, Any]:
    return {"name": b.name, "parent": b.parent, "path": str(b.path)}


def _outcome(outcome: Any) -> dict[str, Any]:
    return {
        "committed": outcome.committed,
        "winner": outcome.winner.label if outcome.winner else None,
        "candidates": [{"label": c.label, "success": c.success, "exit_code": c.exit_code,
                        "score": c.score, "error": c.error, "output": c.output_tail(2000)}
                       for c in outcome.candidates],
    }


def _tail(text: str) -> str:
    if len(text) <= OUTPUT_LIMIT:
        return text
    return f"[{len(text) - OUTPUT_LIMIT} characters cut]\n" + text[-OUTPUT_LIMIT:]


@contextmanager
def _inside(root: Path, path: str, flags: int, make_dirs: bool = False) -> Iterator[int]:
    """An fd of ``path`` below ``root``, walked one component at a time without following
    a symlink: nothing outside the branch is reachable."""
    parts = [p for p in path.split("/") if p]
    if path.startswith("/") or not parts or any(p in (".", "..") for p in parts):
        raise BranchError("bad-request", f"path {path!r} must be relative to the workspace's "
                          "root, without '.' or '..'")
    dflags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, dflags)
    try:
        for name in parts[:-1]:
            try:
                nfd = os.open(name, dflags, dir_fd=fd)
            except FileNotFoundError:
                if not make_dirs:
                    raise
                os.mkdir(name, 0o777, dir_fd=fd)
                nfd = os.open(name, dflags, dir_fd=fd)
            os.close(fd)
            fd = nfd
        try:
            out = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BranchError("permission", f"{path} is a symlink: not followed") from None
            raise
    finally:
        os.close(fd)
    try:
        yield out
    finally:
        os.close(out)


def main(paths: Sequence[str], socket: str | None, http: str | None) -> None:
    """Serve until the client closes stdin (or, with ``http``, until interrupted)."""
    tools = Tools(paths, socket)
    try:
        app = server(tools)
        if http is None:
            app.run("stdio")
        else:
            host, _, port = http.rpartition(":")
            app.run("streamable-http", host=host or "127.0.0.1", port=int(port))
    finally:
        tools.close()
