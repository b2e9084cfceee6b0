"""branchd as three backends, served by embedded daemons that this module starts:

- ``branchd``: the Python API (``Workspace``/``Branch``), the daemon forced to
  ``--backend fuse``;
- ``branchd-cli``: ``branchctl`` (a new process per operation, as a shell script or an
  agent's tool call pays) against that same daemon;
- ``branchd-overlay``: the Python API against a second daemon forced to
  ``--backend overlay``, the kernel fast path (root only).

Every branch a scenario makes is checked, outside the timed region, to be served by the
backend its column names: a daemon that fell back to another one fails the row loudly
instead of measuring the wrong thing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.backends import Backend, BenchWorkspace
from branching import Branch, Client, Workspace
from branching.embedded import EmbeddedDaemon

FUSE = "fuse"
OVERLAY = "overlay"


class WrongBackend(AssertionError):
    """A branch is served by another backend than its column's."""


def _expect(name: str, served_by: str | None, wanted: str, log: Path) -> None:
    if served_by == wanted:
        return
    # the daemon says why in its log (an overlay the kernel refused, say): the row shows it
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    why = [line for line in lines if "WARNING" in line and f"/{name} " in line][-2:]
    raise WrongBackend(f"branch {name} is served by {served_by!r}, not {wanted!r}"
                       + "".join(f"; daemon: {line}" for line in why))


class ApiWorkspace(BenchWorkspace):
    """A registered workspace and the Branch handles of its live branches."""

    def __init__(self, base: Path, daemon: EmbeddedDaemon, backend: str) -> None:
        super().__init__(base)
        self.ws = Workspace(base, daemon=daemon.socket)
        self.daemon = daemon
        self.log = daemon.log_path
        self.backend = backend
        self.branches: dict[str, Branch] = {}
        self._client: Client | None = None

    def probes(self) -> dict[str, Callable[[], object]]:
        """``branchctl list`` (a process, as a user runs it) and the API's list (one
        connection); the FUSE column only: its loads are FUSE's."""
        if self.backend != FUSE:
            return {}
        exe, env = branchctl(), cli_env(self.daemon)
        argv = [exe, "list", "--json"]
        subprocess.run(argv, env=env, capture_output=True, check=True)  # bytecode cached
        self._client = client = Client(self.daemon.socket)

        def cli_list() -> None:
            subprocess.run(argv, env=env, capture_output=True, check=True)

        def python() -> None:  # no request: what the machine's load alone costs a process
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        return {"branchctl list": cli_list, "API list": lambda: client.call("list"),
                "python -c pass": python}

    def path(self, name: str) -> Path:
        return self.branches[name].path

    def _create(self, name: str) -> Path:
        b = self.ws.create(name)
        self.branches[name] = b
        return b.path

    def _commit(self, name: str) -> None:
        self.branches.pop(name).commit()

    def _discard(self, name: str) -> None:
        self.branches.pop(name).abort()

    def verify(self, name: str) -> None:
        _expect(name, self.branches[name].backend, self.backend, self.log)

    def run(self, name: str, argv: list[str]) -> int:
        return self.branches[name].run(argv).returncode

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._client is not None:
                self._client.close()
            self.ws.close()


def branchctl() -> str:
    exe = shutil.which("branchctl", path=str(Path(sys.executable).parent)) or shutil.which(
        "branchctl")
    if exe is None:
        raise FileNotFoundError("branchctl is not installed beside this Python")
    return exe


def cli_env(daemon: EmbeddedDaemon) -> dict[str, str]:
    """branchctl's environment: the daemon's socket, bytecode cached (see CliWorkspace)."""
    env = dict(os.environ, BRANCHD_SOCKET=str(daemon.socket),
               PYTHONPYCACHEPREFIX=str(daemon.root / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class CliWorkspace(BenchWorkspace):
    """The same operations, each one a ``branchctl ... --json`` process.

    It runs as an installed branchctl does, with its modules' bytecode cached: where the
    environment forbids writing bytecode (PYTHONDONTWRITEBYTECODE), every run would compile
    the modules again, a cost no installed copy pays. The cache goes to ``pycache`` (under
    the bench dir), not into the source tree; the untimed ``workspace add`` fills it."""

    def __init__(self, base: Path, daemon: EmbeddedDaemon, backend: str) -> None:
        super().__init__(base)
        self.exe = branchctl()
        self.env = cli_env(daemon)
        self.log = daemon.log_path
        self.backend = backend
        self.replies: dict[str, dict[str, Any]] = {}
        self._cli("workspace", "add", str(base))

    def _cli(self, *args: str) -> Any:
        out = subprocess.run([self.exe, *args, "--json"], env=self.env, capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"branchctl {' '.join(args)} exited {out.returncode}: "
                               f"{out.stderr.strip()[-300:]}")
        return json.loads(out.stdout)

    def path(self, name: str) -> Path:
        return Path(self.replies[name]["path"])

    def _create(self, name: str) -> Path:
        self.replies[name] = self._cli("create", name, "-w", str(self.base))
        return self.path(name)

    def _commit(self, name: str) -> None:
        self._cli("commit", name, "-w", str(self.base))
        del self.replies[name]

    def _discard(self, name: str) -> None:
        self._cli("discard", name, "-w", str(self.base))
        del self.replies[name]

    def verify(self, name: str) -> None:
        _expect(name, self.replies[name].get("backend"), self.backend, self.log)

    def run(self, name: str, argv: list[str]) -> int:
        return subprocess.run([self.exe, "exec", name, "-w", str(self.base), "--", *argv],
                              env=self.env, check=False).returncode


class BranchdBackend(Backend):
    """One column. Columns of one daemon share it; the first one closed stops it."""

    def __init__(self, daemon: EmbeddedDaemon, name: str, served_by: str, cli: bool) -> None:
        self.daemon = daemon
        self.name = name
        self.served_by = served_by
        self.cli = cli
        # The filesystem is the same whichever way a branch was made: the CLI column only
        # has the rows where the CLI does the work.
        self.scenarios = frozenset({"create", "commit", "run"}) if cli else None

    @property
    def group(self) -> str:
        return "branchd-" + self.served_by  # one daemon per backend

    def workspace(self, base: Path) -> BenchWorkspace:
        cls = CliWorkspace if self.cli else ApiWorkspace
        return cls(base, self.daemon, self.served_by)

    def profiled_pid(self) -> int | None:
        return self.daemon.proc.pid if self.daemon.proc else None

    def close(self) -> None:
        self.daemon.stop()


def _start(root: Path, backend: str) -> EmbeddedDaemon:
    """A daemon forced to ``backend``; it must say so itself."""
    root.mkdir(parents=True)
    daemon = EmbeddedDaemon(root, args=["--backend", backend]).start()
    with Client(daemon.socket) as client:
        served_by = client.call("status").get("backend")
    if served_by != backend:
        daemon.stop()
        raise WrongBackend(f"the daemon started with --backend {backend} reports {served_by!r}")
    return daemon


def start_branchd(root: Path, *, api: bool, cli: bool, overlay: bool,
                  notes: list[str]) -> list[Backend]:
    """Start the daemons the wanted branchd columns need; a note for each that cannot run."""
    backends: list[Backend] = []
    if api or cli:
        try:
            daemon = _start(root / FUSE, FUSE)
        except Exception as e:  # any reason it cannot start is reported; the rest still run
            notes.append(f"branchd skipped: the daemon did not start ({e})")
        else:
            if api:
                backends.append(BranchdBackend(daemon, "branchd", FUSE, cli=False))
            if cli:
                backends.append(BranchdBackend(daemon, "branchd-cli", FUSE, cli=True))
    if overlay:
        if os.geteuid() != 0:
            notes.append("branchd-overlay skipped: the overlay backend needs root")
        else:
            try:
                daemon = _start(root / OVERLAY, OVERLAY)
            except Exception as e:  # as above
                notes.append(f"branchd-overlay skipped: the daemon did not start ({e})")
            else:
                backends.append(BranchdBackend(daemon, "branchd-overlay", OVERLAY, cli=False))
    return backends
