"""An embedded branchd: a private daemon process for tests, examples and notebooks.

It runs the same program as the service (``python -m daemon.main``), with its
state, mountpoint and socket in a temporary directory, and tells us it is ready
through the sd_notify protocol on a socket we listen on, exactly as systemd
would hear it. Stopping it unmounts and removes everything it made.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from branching.errors import BranchError
from cgroups import detach, mounted

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0


SUN_PATH_MAX = 108


class EmbeddedDaemon:
    """A branchd child process owned by this Python process."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 log_level: str = "info", args: Sequence[str] = ()) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="branchd-"))
        self.state_dir = self.root / "state"
        self.mountpoint = self.root / "mnt"
        # A unix socket's path must fit in sun_path (108 bytes with its NUL): under
        # a deep root the sockets go to a short private directory of their own.
        self._socket_dir: Path | None = None
        sockets = self.root
        if len(os.fsencode(self.root / "branchd.sock")) >= SUN_PATH_MAX:  # the longer name
            sockets = self._socket_dir = Path(tempfile.mkdtemp(prefix="branchd-"))
        self.socket = sockets / "branchd.sock"
        self._notify_path = sockets / "notify.sock"
        self.log_path = self.root / "branchd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_level = log_level
        self.args = list(args)  # more branchd options, e.g. ["--allow-uid", "1000"]

    def start(self, timeout: float = READY_TIMEOUT) -> EmbeddedDaemon:
        if self._socket_dir is not None:
            self._socket_dir.mkdir(mode=0o700, exist_ok=True)  # again after a stop()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify_path = self._notify_path
        notify_path.unlink(missing_ok=True)
        notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.main", "--state-dir", str(self.state_dir),
                 "--mountpoint", str(self.mountpoint), "--socket", str(self.socket),
                 "--log-level", self.log_level, "--owner-pid", str(os.getpid()),
                 *self._owned(), *self.args],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                start_new_session=True,
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(notify, timeout)
        except BaseException:
            self.stop()
            raise
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)
        return self

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            notify.settimeout(0.2)
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                message = ""
            if "READY=1" in message.split("\n"):
                return
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise BranchError("unavailable", "embedded branchd exited with status "
                                  f"{self.proc.returncode}: {' | '.join(tail)}")
        raise BranchError("unavailable", f"embedded branchd not ready after {timeout:.0f}s "
                          f"(log: {self.log_path})")

    def _owned(self) -> list[str]:
        """The directories the daemon removes itself if we die first (ours alone)."""
        dirs = ([self.root] if self._own_root else []) + (
            [self._socket_dir] if self._socket_dir is not None else [])
        return [a for d in dirs for a in ("--owned-dir", str(d))]

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the daemon (it unmounts itself); force it only if it does not."""
        proc, self.proc = self.proc, None
        if proc is not None:
            self._terminate(proc, timeout)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _terminate(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded branchd %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        detach(str(self.mountpoint))
        if self._own_root and not mounted(str(self.mountpoint)):
            shutil.rmtree(self.root, ignore_errors=True)
