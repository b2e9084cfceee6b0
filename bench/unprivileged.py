"""The ``branchd-unpriv`` column: the agent workload inside a run of an unprivileged daemon.

The daemon runs as uid 65534 (``setpriv``, from a cgroup of that user's own in each
hierarchy, as systemd delegates one to a logged-in user), with the interpreter named in
``$BRANCHD_USER_PYTHON`` (one that user may run, with branchd installed: tests/run.sh
builds it). The workload runs as a run in a branch (``Branch.run``), so it sees the branch
at the workspace's own path through its user namespace: a kernel overlay of the delta
where the kernel takes one, else the FUSE bind (the run's ``served_by`` says which, and
the row's checks record it). Only the workload's own steps are timed, inside the run, as
the other columns time them; the run's start is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import cgroups.delegated
from bench.backends import Backend, BenchWorkspace
from bench.branchd_backend import FUSE, ApiWorkspace
from branching import Client

NOBODY = 65534
USER_PYTHON = "BRANCHD_USER_PYTHON"
REPO = Path(__file__).resolve().parents[1]
# the client, run as the daemon's user (a run's records are its caller's: a root client of
# an unprivileged daemon could not be given them)
CLIENT = """
import sys
from branching import Workspace
sock, base, name, repo, *argv = sys.argv[1:]
env = {"PATH": "/usr/bin:/bin", "HOME": argv[-1], "PYTHONPATH": repo,
       "PYTHONDONTWRITEBYTECODE": "1"}
with Workspace(base, daemon=sock) as ws:
    r = ws.get(name).run(argv, env=env, cwd=base)
sys.stderr.write(r.stderr)
sys.stdout.write(r.stdout)
sys.exit(r.returncode)
"""
INSIDE = """
import json, sys
from pathlib import Path
from bench import agent
base, tarball, modules, edits, home = sys.argv[1:]
times = agent.run(Path(base), Path(tarball), int(modules), int(edits), Path(home))
with open("/proc/self/mountinfo") as f:
    fstype = next(line.split(" - ")[1].split()[0] for line in f if line.split()[4] == base)
print(json.dumps({"times": times, "served_by": fstype}))
"""


class UnprivilegedDaemon:
    """An embedded-style daemon of uid 65534's in ``root`` (made its), stopped by ``stop``."""

    def __init__(self, root: Path, python: str) -> None:
        root.mkdir()
        os.chown(root, NOBODY, NOBODY)
        self.root = root
        self.socket = root / "sock"
        self.log_path = root / "daemon.log"
        self.cgroups = cgroups.delegated.delegate(NOBODY, f"branchd-bench-user.{os.getpid()}")
        enter = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in self.cgroups)
        daemon = [python, "-m", "daemon.main", "--state-dir", str(root / "state"),
                  "--mountpoint", str(root / "mnt"), "--socket", str(self.socket)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", f'{enter}; exec "$@"', "sh", "setpriv", f"--reuid={NOBODY}",
                 f"--regid={NOBODY}", "--clear-groups", *daemon],
                env={"PATH": os.defpath, "HOME": str(root)}, cwd=str(root), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        for _ in range(300):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the unprivileged daemon exited {self.proc.returncode}: "
                                   + self.log_path.read_text(errors="replace")[-500:])
            if self.socket.exists():
                with contextlib.suppress(OSError), Client(self.socket) as c:
                    c.call("status")
                    return
            time.sleep(0.1)
        raise RuntimeError("the unprivileged daemon did not answer within 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        cgroups.delegated.remove(self.cgroups)


class UnprivilegedWorkspace(ApiWorkspace):
    """A workspace of the unprivileged daemon: its base the user's, the workload in a run."""

    def __init__(self, base: Path, daemon: UnprivilegedDaemon, python: str) -> None:
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(base)], check=True)
        super().__init__(base, daemon, FUSE)  # type: ignore[arg-type]  (duck: socket, log_path)
        self.python = python
        self.socket = daemon.socket

    def agent(self, name: str, tarball: Path, modules: int, edits: int,
              home: Path) -> dict[str, float]:
        own = self.base.parent / f"{self.base.name}.inputs"  # what the user may read
        if not own.exists():
            own.mkdir()
            subprocess.run(["cp", str(tarball), str(own / "agent.tar")], check=True)
            (own / "home").mkdir()
            subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(own)], check=True)
        r = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             self.python, "-c", CLIENT, str(self.socket), str(self.base), name, str(REPO),
             self.python, "-c", INSIDE, str(self.base), str(own / "agent.tar"), str(modules),
             str(edits), str(own / "home")],
            capture_output=True, text=True, check=False, cwd="/", env={"PATH": os.defpath})
        if r.returncode != 0:
            raise RuntimeError(f"the workload's run failed: {r.stderr.strip()[-500:]}")
        out = json.loads(r.stdout.splitlines()[-1])
        seen = f"the run saw the workspace path served by {out['served_by']}"
        if seen not in self.checks:
            self.checks.append(seen)
        return {k: float(v) for k, v in out["times"].items()}


class UnprivilegedBackend(Backend):
    name = "branchd-unpriv"
    scenarios = frozenset({"agent"})

    def __init__(self, daemon: UnprivilegedDaemon, python: str) -> None:
        self.daemon = daemon
        self.python = python

    def workspace(self, base: Path) -> BenchWorkspace:
        return UnprivilegedWorkspace(base, self.daemon, self.python)

    def profiled_pid(self) -> int | None:
        return self.daemon.proc.pid

    def close(self) -> None:
        self.daemon.stop()


def start_unprivileged(work: Path, notes: list[str]) -> list[Backend]:
    """The column, its daemon in ``work`` (the run's own directory, made passable for the
    user: its trees are the workspaces); a note instead where it cannot run."""
    python = os.environ.get(USER_PYTHON, "")
    why = None
    closed = [d for d in work.parents if d.stat().st_mode & 0o001 == 0]
    if os.geteuid() != 0:
        why = "it needs root (to become uid 65534 and delegate it a cgroup)"
    elif not python or not os.access(python, os.X_OK):
        why = f"${USER_PYTHON} names no interpreter uid 65534 may run (tests/run.sh builds one)"
    elif closed:
        why = f"uid 65534 may not pass through {closed[0]} to the bench directory"
    if why is None:
        try:
            work.chmod(0o755)
            return [UnprivilegedBackend(UnprivilegedDaemon(work / "branchd-unpriv", python),
                                        python)]
        except Exception as e:  # any reason it cannot start is reported; the rest still run
            why = f"the daemon did not start ({e})"
    notes.append(f"branchd-unpriv skipped: {why}")
    return []
