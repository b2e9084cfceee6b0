"""``branchctl`` commands that run agent patterns: run, speculate, best-of-n, reflexion.

Each runs candidates in branches of the workspace (``--workspace``, default the
current directory) and exits 0 only when something was committed, 1 when
nothing was.  Progress (which candidates run, pass, fail) goes to stderr on a
TTY; the summary, or with ``--json`` the whole outcome, goes to stdout.
``branching/cli.py`` registers ``COMMANDS``.

A command given after ``--`` as one argument runs through ``/bin/sh -c``;
several arguments are an argv.  Scores for ``best-of-n``: the candidate writes
a number to its file descriptor 3 or to the file named by
``$BRANCHING_SCORE_FILE``; ``$BRANCHING_ATTEMPT`` tells it which attempt it is.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from branching.patterns import CandidateResult, Command, Outcome, Pattern

# The patterns, the workspace, cgroups and rich load when a command runs, not when
# ``branchctl --help`` lists these commands.


class Progress:
    """Prints one stderr line per candidate event; silent unless stderr is a terminal.

    Not on a terminal (a log file, a pipe, CI), a line is never wrapped or cut at
    rich's default 80 columns: whoever reads it later wants the whole command.
    """

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        from branching.patterns import outcome as oc

        self.console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())
        self.marks = {oc.RUNNING: "[cyan]…[/]", oc.PASSED: "[green]✔[/]",
                      oc.CANCELLED: "[dim]–[/]"}
        self.enabled = enabled
        self._lock = threading.Lock()

    def __call__(self, kind: str, r: CandidateResult) -> None:
        if not self.enabled:
            return
        from rich.markup import escape  # a command's "[...]" is text, not markup

        label = escape(r.label)
        if kind == "commit":
            line = f"[bold green]committed[/] #{r.index + 1} {label} ({r.branch})"
        else:
            mark = self.marks.get(r.status, "[red]✘[/]")
            what = "running" if kind == "start" else escape(r.describe())
            line = f"{mark} #{r.index + 1} {label}: {what}"
        with self._lock:
            self.console.print(line)


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every pattern command shares."""
    for opt in reversed([
        click.option("--workspace", "-w", "ws", type=click.Path(file_okay=False, readable=False),
                     default=".", show_default=True, help="The workspace directory."),
        click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON."),
        click.option("--memory", help="Memory limit per candidate, e.g. 512M."),
        click.option("--cpus", type=float, help="CPU quota per candidate in cores, e.g. 1.5."),
        click.option("--pids", type=int, help="Most processes per candidate."),
        click.option("--timeout", type=float, help="Wall-clock seconds per candidate."),
        click.option("--max-parallel", "-j", type=click.IntRange(1), default=None,
                     help="Candidates running at once (default: one per CPU)."),
        click.option("--progress/--no-progress", default=None,
                     help="Show candidates as they run (default: when stderr is a terminal)."),
        click.option("--at-branch-path", is_flag=True,
                     help="Candidates see their branch at its own path, not the workspace's."),
    ]):
        fn = opt(fn)
    return fn


def _argv(argv: tuple[str, ...]) -> Command:
    if not argv:
        raise click.UsageError("give the command after --")
    return _command(argv[0] if len(argv) == 1 else list(argv))


def _command(argv: str | list[str]) -> Command:
    """A candidate's command; its label is the whole command line when stderr is not a
    terminal (else the patterns' 60-column short form), so that logs name it whole."""
    from branching.patterns import Command

    if sys.stderr.isatty():
        return Command(argv)
    return Command(argv, label=argv if isinstance(argv, str) else " ".join(argv))


def _execute(ctx: click.Context, make: Callable[..., Pattern], *, ws: str, as_json: bool,
             memory: str | None, cpus: float | None, pids: int | None, timeout: float | None,
             max_parallel: int | None, progress: bool | None, at_branch_path: bool,
             live: bool = False) -> int:
    from branching.workspace import Workspace
    from cgroups import Limits, parse_size

    try:
        limits = Limits(memory=parse_size(memory) if memory else None, cpus=cpus, pids=pids)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    show = sys.stderr.isatty() if progress is None else progress
    pattern = make(resource_limits=limits, timeout=timeout, max_parallel=max_parallel,
                   on_event=Progress(show), at_branch_path=at_branch_path)
    pattern.options.capture = not live or as_json
    socket = getattr(ctx.find_root().obj, "socket", None)
    with Workspace(ws, daemon=socket) as workspace:
        outcome = pattern(workspace)
    if as_json:
        click.echo(json.dumps(outcome.to_dict(), indent=2, sort_keys=True))
    else:  # with live output, stdout is the command's: the summary is a log line then
        click.echo(summary(outcome), err=live)
    return 0 if outcome.committed else refused(outcome)


def refused(outcome: Outcome) -> int:
    """The exit code of an outcome that committed nothing: 1, or where the daemon refused
    every candidate for one reason (a run this daemon may not start for the caller),
    that error's own code."""
    from branching.errors import BranchError

    errors = [r.exception for r in outcome.candidates]
    codes = {e.exit_code for e in errors if isinstance(e, BranchError)}
    return codes.pop() if errors and len(codes) == 1 and all(
        isinstance(e, BranchError) for e in errors) else 1


def summary(outcome: Outcome) -> str:
    """The outcome as text: one line per candidate, then what was committed."""
    lines = []
    for r in outcome.candidates:
        mark = "*" if r.committed else " "
        lines.append(f"{mark} #{r.index + 1:<3} {r.describe():<40} {r.label}")
    if outcome.winner:
        changes = (outcome.commit or {}).get("changes", "?")
        lines.append(f"committed #{outcome.winner.index + 1} ({outcome.winner.branch}): "
                     f"{changes} change{'' if changes == 1 else 's'}")
    else:
        lines.append("nothing committed")
    return "\n".join(lines)


@click.command("run", context_settings={"ignore_unknown_options": True})
@_options
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run_cmd(ctx: click.Context, argv: tuple[str, ...], **opts: Any) -> int:
    """Run CMD in a new branch; commit it if CMD exits 0, discard it otherwise."""
    from branching.patterns import Speculate

    command = _argv(argv)

    def make(**kw: Any) -> Pattern:
        pattern = Speculate([command], **kw)
        pattern.kind = "run"  # its branches are run-..., not speculate-...
        return pattern

    return _execute(ctx, make, live=True, **opts)


@click.command("speculate")
@_options
@click.option("--candidate", "-c", "candidates", multiple=True, required=True,
              help="A shell command; give -c once per candidate.")
@click.option("--in-order", is_flag=True,
              help="Prefer earlier candidates: wait for them instead of taking the first success.")
@click.pass_context
def speculate_cmd(ctx: click.Context, candidates: tuple[str, ...], in_order: bool,
                  **opts: Any) -> int:
    """Run every candidate at once in its own branch; the first to succeed is committed."""
    from branching.patterns import Speculate

    commands = [_command(c) for c in candidates]
    return _execute(ctx, lambda **kw: Speculate(commands, first_wins=not in_order, **kw),
                    **opts)


@click.command("best-of-n", context_settings={"ignore_unknown_options": True})
@_options
@click.option("-n", "n", type=click.IntRange(1), default=3, show_default=True,
              help="How many attempts.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def best_of_n_cmd(ctx: click.Context, n: int, argv: tuple[str, ...], **opts: Any) -> int:
    """Run CMD n times; commit the success with the highest score.

    CMD sees $BRANCHING_ATTEMPT (1..n) and writes its score, a number, to fd 3
    or to the file $BRANCHING_SCORE_FILE.
    """
    from branching.patterns import BestOfN

    command = _argv(argv)
    return _execute(ctx, lambda **kw: BestOfN(command, n=n, **kw), **opts)


@click.command("reflexion", context_settings={"ignore_unknown_options": True})
@_options
@click.option("--retries", type=click.IntRange(0), default=3, show_default=True,
              help="Attempts after the first.")
@click.option("--critique", help="A shell command run in the failed branch; its stdout is "
              "the feedback (the failure report is in $BRANCHING_FAILURE).")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def reflexion_cmd(ctx: click.Context, retries: int, critique: str | None,
                  argv: tuple[str, ...], **opts: Any) -> int:
    """Run CMD; on failure run it again in a fresh branch with feedback, up to --retries times.

    Each attempt finds the previous one's critique in $BRANCHING_FEEDBACK.
    """
    from branching.patterns import Reflexion

    command = _argv(argv)
    critic = _command(critique) if critique else None
    return _execute(ctx, lambda **kw: Reflexion(command, max_retries=retries, critique=critic,
                                                **kw), **opts)


COMMANDS = [run_cmd, speculate_cmd, best_of_n_cmd, reflexion_cmd]

__all__ = ["COMMANDS", "summary"]
