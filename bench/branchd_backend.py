"""branchd as two backends, both served by one embedded daemon that this module starts:
``branchd`` through the Python API (``Workspace``/``Branch``) and ``branchd-cli`` through
``branchctl`` (a new process per operation, as a shell script or an agent's tool call pays)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.backends import Backend, BenchWorkspace
from branching import Branch, Workspace
from branching.embedded import EmbeddedDaemon


class ApiWorkspace(BenchWorkspace):
    """A registered workspace and the Branch handles of its live branches."""

    def __init__(self, base: Path, socket: Path) -> None:
        super().__init__(base)
        self.ws = Workspace(base, daemon=socket)
        self.branches: dict[str, Branch] = {}

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

    def run(self, name: str, argv: list[str]) -> int:
        return self.branches[name].run(argv).returncode

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.ws.close()


def branchctl() -> str:
    exe = shutil.which("branchctl", path=str(Path(sys.executable).parent)) or shutil.which(
        "branchctl")
    if exe is None:
        raise FileNotFoundError("branchctl is not installed beside this Python")
    return exe


class CliWorkspace(BenchWorkspace):
    """The same operations, each one a ``branchctl ... --json`` process."""

    def __init__(self, base: Path, socket: Path) -> None:
        super().__init__(base)
        self.exe = branchctl()
        self.env = dict(os.environ, BRANCHD_SOCKET=str(socket))
        self.paths: dict[str, Path] = {}
        self._cli("workspace", "add", str(base))

    def _cli(self, *args: str) -> Any:
        out = subprocess.run([self.exe, *args, "--json"], env=self.env, capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"branchctl {' '.join(args)} exited {out.returncode}: "
                               f"{out.stderr.strip()[-300:]}")
        return json.loads(out.stdout)

    def path(self, name: str) -> Path:
        return self.paths[name]

    def _create(self, name: str) -> Path:
        self.paths[name] = Path(self._cli("create", name, "-w", str(self.base))["path"])
        return self.paths[name]

    def _commit(self, name: str) -> None:
        self._cli("commit", name, "-w", str(self.base))
        del self.paths[name]

    def _discard(self, name: str) -> None:
        self._cli("discard", name, "-w", str(self.base))
        del self.paths[name]

    def run(self, name: str, argv: list[str]) -> int:
        return subprocess.run([self.exe, "exec", name, "-w", str(self.base), "--", *argv],
                              env=self.env, check=False).returncode


class BranchdBackend(Backend):
    """One column; both columns share the daemon and either one's close stops it."""

    def __init__(self, daemon: EmbeddedDaemon, cli: bool) -> None:
        self.daemon = daemon
        self.cli = cli
        self.name = "branchd-cli" if cli else "branchd"
        # The filesystem is the same whichever way a branch was made: the CLI column only
        # has the rows where the CLI does the work.
        self.scenarios = frozenset({"create", "commit", "run"}) if cli else None

    @property
    def group(self) -> str:
        return "branchd"

    def workspace(self, base: Path) -> BenchWorkspace:
        cls = CliWorkspace if self.cli else ApiWorkspace
        return cls(base, self.daemon.socket)

    def profiled_pid(self) -> int | None:
        return self.daemon.proc.pid if self.daemon.proc else None

    def close(self) -> None:
        self.daemon.stop()


def start_branchd(root: Path, *, api: bool, cli: bool, notes: list[str]) -> list[Backend]:
    """Start the daemon the branchd columns share; none (and a note) when it cannot start."""
    root.mkdir(parents=True)
    try:
        daemon = EmbeddedDaemon(root).start()
    except Exception as e:  # any reason it cannot start is reported, the baselines still run
        notes.append(f"branchd skipped: the daemon did not start ({e})")
        return []
    backends: list[Backend] = []
    if api:
        backends.append(BranchdBackend(daemon, cli=False))
    if cli:
        backends.append(BranchdBackend(daemon, cli=True))
    return backends
