"""Where branchd keeps things: state directory, mountpoint, socket, and who may connect."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from daemon.protocol import default_socket, runtime_dir
from daemon.server import DEFAULT_IDLE_TIMEOUT


def default_state_dir() -> Path:
    if env := os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/branchd")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "branchd"


@dataclass
class Config:
    state_dir: Path = field(default_factory=default_state_dir)
    mountpoint: Path = field(default_factory=lambda: runtime_dir() / "mnt")
    socket: Path = field(default_factory=default_socket)
    socket_mode: int = 0o660
    socket_group: int | None = None  # gid the socket is given (--socket-group)
    # peers other than the daemon's own uid (and root) that may connect
    allow_uids: frozenset[int] = frozenset()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # seconds; 0: connections never time out
    debug_fuse: bool = False
    backend: str = "auto"  # auto | fuse | overlay (daemon.overlays)
    owner_pid: int | None = None  # stop when this process (our parent) ends (--owner-pid)
    # directories made for this daemon alone (an embedded daemon's temporary root):
    # removed when it stops because its owner ended, who can no longer (--owned-dir)
    owned_dirs: tuple[Path, ...] = ()
    run_fd_limit: int | None = None  # soft RLIMIT_NOFILE runs get (the daemon raises its own)

    def resolve(self) -> Config:
        self.state_dir = self.state_dir.expanduser().absolute()
        self.mountpoint = self.mountpoint.expanduser().absolute()
        self.socket = self.socket.expanduser().absolute()
        return self
