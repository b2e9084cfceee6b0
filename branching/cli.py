"""``branchctl``: the command line of branchd.

Data goes to stdout (a table, or JSON with ``--json``), logs and errors to
stderr, one line each. Exit codes are those of ``daemon.protocol.ExitCode``;
``exec`` passes its command's own status through (124 on timeout).

Every invocation is a new interpreter, so this module imports only click and the
protocol client: what one command alone needs (cgroups' limits for ``exec``, the
patterns and rich for the pattern commands) loads when that command runs, and a
``create`` costs the interpreter, click and three round trips (about 90 ms on the
2-core bench machine). ``tests/test_cli_imports.py`` holds that property.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from branching.client import Client
from branching.errors import BranchError
from branching.paths import relative_cwd
from daemon.protocol import ExitCode, ended_message

if TYPE_CHECKING:
    from cgroups import Limits

TIMEOUT_EXIT = 124  # as timeout(1)
# One instance for every directory option: each click.Path looks up its translated
# messages when made, a few hundred microseconds apiece at every start.
DIRECTORY = click.Path(file_okay=False, readable=False)


class Context:
    def __init__(self, socket: str | None = None) -> None:
        self.socket = socket
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.socket)
        return self._client


pass_ctx = click.make_pass_decorator(Context)


def _set_socket(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:  # the root's option (and BRANCHD_SOCKET) made the Context
        ctx.find_root().ensure_object(Context).socket = value


def with_socket(cmd: click.Command) -> click.Command:
    """Give *cmd* (and every command under it) ``--socket`` after its name, as the root
    has it: ``branchctl list --socket X`` as well as ``branchctl --socket X list``."""
    if not any(p.name == "socket" for p in cmd.params):
        cmd.params.append(click.Option(
            ["--socket"], metavar="PATH", expose_value=False, callback=_set_socket,
            help="The daemon's control socket [env BRANCHD_SOCKET]."))
    for sub in getattr(cmd, "commands", {}).values():
        with_socket(sub)
    return cmd


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` to a command; the command returns data, this prints it."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, **kwargs: Any) -> Any:
        data, text = fn(*args, **kwargs)
        if as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        elif text:
            click.echo(text)
        return data.get("_exit", 0) if isinstance(data, dict) else 0

    return wrapper


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


class Group(click.Group):
    """The pattern commands' module loads only when one of them runs or help lists them
    (the patterns, rich and psutil behind them only when one runs)."""

    PATTERNS = ("best-of-n", "reflexion", "run", "speculate")

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.PATTERNS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.PATTERNS:
            from branching.cli_patterns import COMMANDS

            return with_socket(next(c for c in COMMANDS if c.name == name))
        return super().get_command(ctx, name)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", envvar="BRANCHD_SOCKET", metavar="PATH",
              help="The daemon's control socket [env BRANCHD_SOCKET].")
@click.pass_context
def cli(ctx: click.Context, socket: str | None) -> None:
    """Copy-on-write workspace branches for agents."""
    ctx.obj = Context(socket)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("daemon_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def serve(obj: Context, daemon_args: tuple[str, ...]) -> None:
    """Run the daemon in the foreground (options as for branchd)."""
    args = list(daemon_args)
    if obj.socket and "--socket" not in args:
        args += ["--socket", obj.socket]
    os.execv(sys.executable, [sys.executable, "-m", "daemon.main", *args])


@cli.command()
@pass_ctx
@json_option
def status(obj: Context) -> tuple[dict[str, Any], str]:
    """The daemon's state: mount, socket, counts, cgroup layout."""
    s = obj.client.call("status")
    lines = [f"{k}: {v}" for k, v in s.items() if not isinstance(v, list)]
    lines += [f"{k}: {item}" for k, v in s.items() if isinstance(v, list) for item in v]
    return s, "\n".join(lines)


@cli.group()
def workspace() -> None:
    """Register and list workspaces."""


@workspace.command("add")
@click.argument("path", type=DIRECTORY)
@click.option("--name", help="Name under the mountpoint (default: the directory's name).")
@pass_ctx
@json_option
def workspace_add(obj: Context, path: str, name: str | None) -> tuple[dict[str, Any], str]:
    ws = obj.client.call("workspace-add", path=os.path.abspath(path), name=name)
    return ws, f"{ws['name']}\t{ws['base']}"


@workspace.command("list")
@pass_ctx
@json_option
def workspace_list(obj: Context) -> tuple[dict[str, Any], str]:
    wss = obj.client.call("workspace-list")["workspaces"]
    return {"workspaces": wss}, _table([[w["name"], w["base"]] for w in wss], ["NAME", "BASE"])


@workspace.command("remove")
@click.argument("workspace")
@click.option("--force", is_flag=True, help="Discard its live branches first.")
@pass_ctx
@json_option
def workspace_remove(obj: Context, workspace: str, force: bool) -> tuple[dict[str, Any], str]:
    """Forget a workspace (by name or path); its directory is not touched."""
    if "/" in workspace or os.path.isdir(workspace):
        workspace = os.path.abspath(workspace)
    out = obj.client.call("workspace-remove", workspace=workspace, force=force)
    gone = f" (discarded {', '.join(out['discarded'])})" if out["discarded"] else ""
    return out, f"removed workspace {out['workspace']}{gone}"


@cli.command()
@click.argument("name")
@click.option("--workspace", "-w", "ws", type=DIRECTORY,
              help="The workspace directory (default: the current directory).")
@click.option("--from", "parent", help="Branch from this branch instead of the workspace.")
@click.option("--on-sibling-commit", "policy", type=click.Choice(["rebase", "invalidate"]),
              default="rebase", show_default=True,
              help="When a sibling commits: carry on over it (merging where both changed "
                   "a file), or end as invalidated (first commit wins).")
@pass_ctx
@json_option
def create(obj: Context, name: str, ws: str | None, parent: str | None,
           policy: str) -> tuple[dict, str]:
    """Create a branch and print its path."""
    if parent is None:
        ws_name = obj.client.call("workspace-add", path=os.path.abspath(ws or "."))["name"]
    else:
        ws_name = _workspace_name(ws)
    try:
        b = obj.client.call("create", name=name, workspace=ws_name, parent=parent,
                            on_sibling_commit=policy)
    except BranchError as e:  # the parent's name is in several workspaces: the one here?
        here = None if parent is None or ws else _workspace_here(obj.client, parent, e)
        if here is None:
            raise
        b = obj.client.call("create", name=name, workspace=here, parent=parent,
                            on_sibling_commit=policy)
    return b, b["path"]


def _workspace_name(ws: str | None) -> str | None:
    """Resolve ``--workspace`` (a path) for commands that name an existing branch."""
    return None if ws is None else os.path.abspath(ws)


def _call_named(obj: Context, op: str, name: str, ws: str | None, fds: list[int] | None = None,
                **args: Any) -> dict[str, Any]:
    """``op`` on the branch *name*; when no ``--workspace`` was given and the name exists in
    several workspaces, the one the caller stands in (``_workspace_here``) is meant."""
    try:
        return obj.client.call(op, fds, name=name, workspace=_workspace_name(ws), **args)
    except BranchError as e:
        here = None if ws is not None else _workspace_here(obj.client, name, e)
        if here is None:
            raise
        return obj.client.call(op, fds, name=name, workspace=here, **args)


def _workspace_here(client: Client, name: str, error: BranchError) -> str | None:
    """After *error* says branch *name* is ambiguous: the workspace among those holding it
    whose directory, or whose branch *name*'s own path, this process stands in (the
    daemon, which does not know the caller's directory, answers "ambiguous" only)."""
    if error.code != "conflict" or "ambiguous" not in str(error):
        return None
    cwd = os.getcwd()
    here = {b["workspace"] for b in client.call("list")["branches"] if b["name"] == name
            and any(cwd == root or cwd.startswith(root.rstrip("/") + "/")
                    for root in (b["base"], b["path"]))}
    return here.pop() if len(here) == 1 else None


def _named(fn: Callable[..., Any]) -> Callable[..., Any]:
    """NAME and ``--workspace`` for commands about one existing branch."""
    fn = click.option("--workspace", "-w", "ws", type=DIRECTORY,
                      help="Only needed when NAME exists in several workspaces.")(fn)
    return click.argument("name")(fn)


@cli.command("list")
@click.option("--workspace", "-w", "ws", type=DIRECTORY)
@click.option("--all", "show_all", is_flag=True, help="Include committed and discarded ones.")
@pass_ctx
@json_option
def list_(obj: Context, ws: str | None, show_all: bool) -> tuple[dict[str, Any], str]:
    """List branches."""
    bs = obj.client.call("list", workspace=_workspace_name(ws), all=show_all)["branches"]
    rows = [[b["name"], b["workspace"], b["parent"] or "-", _status(b), b["path"]] for b in bs]
    header = ["NAME", "WORKSPACE", "PARENT", "STATUS", "PATH"]
    if any(b.get("backend") for b in bs):  # a daemon that serves branches more than one way
        header.insert(4, "BACKEND")
        for row, b in zip(rows, bs, strict=True):
            row.insert(4, b.get("backend") or "-")
    return {"branches": bs}, _table(rows, header)


def _status(b: dict[str, Any]) -> str:
    """A branch's status in words: active ones may be conflicted, or fork a replaced base."""
    text = b["status"]
    if b.get("conflicts"):
        text = f"conflicted ({len(b['conflicts'])})"
    return text + (" (base replaced)" if b.get("base_replaced") else "")


@cli.command()
@_named
@pass_ctx
@json_option
def info(obj: Context, name: str, ws: str | None) -> tuple[dict[str, Any], str]:
    """One branch in detail."""
    b = _call_named(obj, "info", name, ws)
    lines = [f"{k}: {v}" for k, v in b.items() if k not in ("runs", "meta")]
    lines += [f"run {r['run']}: {r.get('result', 'running')}" for r in b["runs"]]
    return b, "\n".join(lines)


@cli.command()
@_named
@click.argument("paths", nargs=-1)
@click.option("--patch", "-p", is_flag=True, help="Show a unified diff of text files.")
@click.option("--stat", "stat_only", is_flag=True, help="Only count the changes by kind.")
@pass_ctx
@json_option
def diff(obj: Context, name: str, ws: str | None, paths: tuple[str, ...], patch: bool,
         stat_only: bool) -> tuple[dict[str, Any], str]:
    """What the branch changed relative to its parent (at or below PATHS, relative to
    the workspace root, if given). Fetched page by page: any number of changes."""
    args: dict[str, Any] = {"paths": list(paths) or None, "patch": patch or None}
    if stat_only:
        d = _call_named(obj, "diff", name, ws, stat=True, **args)
        text = "  ".join(f"{k} {v}" for k, v in d["stat"].items()) + f"  total {d['total']}"
        return d, text
    d = {"changes": [], "patch": ""}
    offset: int | None = 0
    while offset is not None:
        page = _call_named(obj, "diff", name, ws, offset=offset, **args)
        d["stat"], d["total"] = page["stat"], page["total"]
        d["changes"] += page["changes"]
        d["patch"] += page.get("patch", "")
        offset = page["next"]
    if not patch:
        del d["patch"]
    marks = {"added": "A", "modified": "M", "deleted": "D", "renamed": "R"}
    lines = [f"{marks.get(c['kind'], '?')}  {c['old_path'] + ' -> ' if c.get('old_path') else ''}"
             f"{c['path']}" for c in d["changes"]]
    if patch:
        lines.append(d["patch"].rstrip("\n"))
    return d, "\n".join(lines)


@cli.command()
@_named
@click.option("--force", is_flag=True,
              help="Overwrite paths that changed in the parent outside the branch.")
@pass_ctx
@json_option
def commit(obj: Context, name: str, ws: str | None, force: bool) -> tuple[dict[str, Any], str]:
    """Apply the branch to its parent atomically; siblings carry on over it (or end,
    those made with --on-sibling-commit invalidate)."""
    r = _call_named(obj, "commit", name, ws, force=force or None)
    into = r["into"] or "the workspace"
    text = f"committed {r['branch']} into {into}: {r['changes']} changes in {r['seconds']:.3f}s"
    if r["invalidated"]:
        text += f"\ninvalidated: {', '.join(r['invalidated'])}"
    if r.get("conflicted"):
        text += (f"\nconflicts left in: {', '.join(r['conflicted'])} "
                 "(branchctl info NAME lists the paths)")
    return r, text


@cli.command()
@_named
@pass_ctx
@json_option
def rebase(obj: Context, name: str, ws: str | None) -> tuple[dict[str, Any], str]:
    """Bring the branch onto its parent's current state (also after changes made to
    the workspace outside branchd), merging where both changed a file; exits 4 when
    conflicts are left."""
    r = _call_named(obj, "rebase", name, ws)
    lines = [f"merged {p}" for p in r["merged"]] + [f"conflict {p}" for p in r["conflicts"]]
    if r["conflicts"]:
        r["_exit"] = ExitCode.CONFLICT
    return r, "\n".join(lines) or f"{name} is up to date with its parent"


@cli.command()
@_named
@click.argument("path")
@click.option("--ours", "how", flag_value="ours",
              help="Keep the branch's file as it is now (also after you edited it).")
@click.option("--theirs", "how", flag_value="theirs", help="Take the parent's version.")
@click.option("--markers", "how", flag_value="markers",
              help="Write conflict markers into the branch's file; resolve --ours after "
                   "editing it.")
@click.option("--file", "source", type=click.Path(exists=True, dir_okay=False),
              help="Put this file's content in the branch, and keep it.")
@pass_ctx
@json_option
def resolve(obj: Context, name: str, ws: str | None, path: str, how: str | None,
            source: str | None) -> tuple[dict[str, Any], str]:
    """Settle a conflict of the branch at PATH (relative to the workspace root)."""
    if (how is None) == (source is None):
        raise click.UsageError("give one of --ours, --theirs, --markers or --file F")
    if source is not None:  # written as the caller, through the branch's own path
        import shutil  # (with its compression modules) for this option only

        b = _call_named(obj, "info", name, ws)
        with open(source, "rb") as f, open(os.path.join(b["path"], path), "wb") as out:
            shutil.copyfileobj(f, out)
        how = "ours"
    r = _call_named(obj, "resolve", name, ws, path=path, how=how)
    left = r["conflicts"]
    return r, (f"conflicts left: {', '.join(left)}" if left else f"{name} has no conflicts")


@cli.command()
@_named
@pass_ctx
@json_option
def discard(obj: Context, name: str, ws: str | None) -> tuple[dict[str, Any], str]:
    """Drop the branch and every branch made from it."""
    r = _call_named(obj, "discard", name, ws)
    return r, f"discarded {', '.join(r['discarded'])}"


def limit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--memory --cpus --pids --io-weight --timeout, shared by every command that runs things."""
    for opt in reversed([
        click.option("--memory", help="Memory limit, e.g. 512M (swap off)."),
        click.option("--cpus", type=float, help="CPU quota in cores, e.g. 1.5."),
        click.option("--pids", type=int, help="Most processes at once."),
        click.option("--io-weight", type=click.IntRange(1, 10000), help="I/O weight."),
        click.option("--timeout", type=float, help="Wall-clock seconds before the tree is killed."),
    ]):
        fn = opt(fn)
    return fn


def limits_from(memory: str | None, cpus: float | None, pids: int | None,
                io_weight: int | None, timeout: float | None) -> Limits:
    from cgroups import Limits, parse_size  # cgroups' package loads logging and subprocess

    try:
        return Limits(memory=parse_size(memory) if memory else None, cpus=cpus, pids=pids,
                      io_weight=io_weight, timeout=timeout)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@_named
@limit_options
@click.option("--at-branch-path", is_flag=True,
              help="Run at the branch's own path, not at the workspace's (absolute paths "
              "into the workspace then reach the base).")
@click.option("--capture", is_flag=True, help="Write output to the run record, not here.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_ctx
@json_option
def exec_(obj: Context, name: str, ws: str | None, argv: tuple[str, ...],
          at_branch_path: bool, capture: bool, **limit_args: Any) -> tuple[dict, str]:
    """Run a command in the branch, in its own cgroup; exits with the command's status."""
    return _run(obj, name, ws, list(argv), limits_from(**limit_args), at_branch_path, capture)


@cli.command()
@_named
@click.option("--at-branch-path", is_flag=True,
              help="Stand at the branch's own path, not at the workspace's.")
@pass_ctx
@json_option
def shell(obj: Context, name: str, ws: str | None, at_branch_path: bool) -> tuple[dict, str]:
    """An interactive shell ($SHELL, else /bin/sh) in the branch, at the workspace's path."""
    from cgroups import Limits

    argv = [os.environ.get("SHELL") or "/bin/sh", "-i"]
    return _run(obj, name, ws, argv, Limits(), at_branch_path, capture=False)


def _run(obj: Context, name: str, ws: str | None, argv: list[str], limits: Limits,
         at_branch_path: bool, capture: bool) -> tuple[dict, str]:
    fds = None if capture else [0, 1, 2]
    client = obj.client
    b = _call_named(obj, "info", name, ws)
    cwd = relative_cwd(None, b["base"], b["path"]) or None  # where this shell stands in it
    with client.connection() as c:  # the run belongs to this connection
        started = c.call("exec", fds, name=name, workspace=b["workspace"], argv=argv,
                         limits=limits.to_dict(), env=dict(os.environ),
                         at_branch_path=at_branch_path or None, cwd=cwd)
        try:
            done = c.call("wait", run=started["run"])
        except KeyboardInterrupt:
            client.call("kill", run=started["run"])
            raise
    r = done["result"]
    code = TIMEOUT_EXIT if r["timed_out"] else (
        r["exit_code"] if r["exit_code"] is not None else 128 + (r["signal"] or 0))
    # never silent: a run that did not end by itself says who ended it (protocol.ENDED_BY)
    if why := ended_message(done["run"], r, limits.timeout):
        click.echo(why, err=True)
    done["_exit"] = code
    text = ""
    if capture:
        text = f"run {done['run']}: exit {code}; output in {Path(done['stdout_path']).parent}"
    return done, text


@cli.command()
@click.option("--repair", is_flag=True,
              help="Put right what can be without losing data (orphan deltas to the trash, "
              "overlays mounted again, empty leftover cgroups and journals of done commits "
              "removed).")
@pass_ctx
@json_option
def fsck(obj: Context, repair: bool) -> tuple[dict[str, Any], str]:
    """Check the daemon's state against the disk and the kernel; one finding a line.
    Exits 1 while an error or warning remains (info findings do not count)."""
    r = obj.client.call("fsck", repair=repair or None)
    lines = []
    for f in r["findings"]:
        done = f" [repaired: {f['repaired']}]" if f.get("repaired") else ""
        lines.append(f"{f['level']}: {f['kind']}: {f['message']}{done}")
    r["_exit"] = ExitCode.FAILED if r["open"] else ExitCode.OK
    return r, "\n".join(lines) if lines else "clean"


@cli.command()
@click.option("--workspace", "-w", "workspaces", multiple=True, required=True,
              type=click.Path(exists=True, file_okay=False),
              help="A workspace the tools may reach (repeatable); nothing else is reachable.")
@click.option("--http", metavar="[HOST:]PORT",
              help="Serve streamable HTTP on this address instead of stdio.")
@click.pass_obj
def mcp(obj: Context, workspaces: tuple[str, ...], http: str | None) -> None:
    """An MCP server (stdio) with tools for the whole life of a branch and the patterns."""
    from branching import mcp_server  # the MCP SDK loads only for this command

    mcp_server.main(workspaces, obj.socket, http)


for _command in cli.commands.values():
    with_socket(_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line on stderr and a documented exit code for every failure."""
    try:
        rv = cli.main(args=argv, prog_name="branchctl", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        e.show()
        return ExitCode.USAGE
    except click.Abort:
        click.echo("branchctl: interrupted", err=True)
        return 130
    except BranchError as e:
        click.echo(f"branchctl: error: {e}", err=True)
        return e.exit_code
    except BrokenPipeError:
        return ExitCode.FAILED
    return rv if isinstance(rv, int) else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
