"""``branchd``: the daemon's command line."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import resource
import sys
from pathlib import Path

import trio

from daemon import ascaller, service
from daemon.config import Config
from daemon.overlays import CHOICES
from daemon.protocol import ERROR_EXIT

# syslog priorities for journald's "<N>" line prefixes
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority, as journald reads stderr."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{super().format(record)}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):  # stderr is connected to journald
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal permission mode like 0660")
    return mode


def group_id(text: str) -> int:
    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group {text!r}") from None


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def raise_fd_limit() -> int:
    """The soft open-file limit up to the hard one: systemd's soft default (1024) is
    for programs that use select(); the daemon holds a descriptor per connection.
    Returns the soft limit it had, which the runs get back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft


def parse_args(argv: list[str] | None) -> tuple[Config, str]:
    defaults = Config()
    p = argparse.ArgumentParser(prog="branchd", description="copy-on-write workspace branches")
    p.add_argument("--state-dir", type=Path, default=defaults.state_dir)
    p.add_argument("--mountpoint", type=Path, default=defaults.mountpoint)
    p.add_argument("--socket", type=Path, default=defaults.socket)
    p.add_argument("--allow-uid", type=int, action="append", default=[],
                   help="another uid that may use the control socket (repeatable); it "
                   "must also reach the socket: see --socket-group and --socket-mode")
    p.add_argument("--socket-group", type=group_id, default=defaults.socket_group,
                   help="group (name or gid) the socket is given, for users who may connect")
    p.add_argument("--socket-mode", type=octal_mode, default=defaults.socket_mode,
                   help="the socket's permission bits, octal (default 0660: owner and group)")
    p.add_argument("--idle-timeout", type=seconds, default=defaults.idle_timeout,
                   help="close a connection after this many seconds without a request and "
                   "with nothing in flight (default %(default).0f; 0: never)")
    p.add_argument("--log-level", default=os.environ.get("BRANCHD_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    p.add_argument("--owner-pid", type=int, default=None,
                   help="stop (unmounting everything, ending every run) when this process, "
                   "our parent, ends: an embedded daemon dies with its owner")
    p.add_argument("--owned-dir", action="append", type=Path, default=[],
                   help="a directory made for this daemon alone (repeatable): removed when "
                   "it stops because the --owner-pid process ended")
    p.add_argument("--backend", default=os.environ.get("BRANCHD_BACKEND", "auto"),
                   help="what serves the branches: auto (a kernel overlay where a probe "
                   "mount works, else FUSE), fuse or overlay; default $BRANCHD_BACKEND or auto")
    a = p.parse_args(argv)
    if a.backend not in CHOICES:
        p.error(f"--backend (or BRANCHD_BACKEND) must be one of {', '.join(CHOICES)}, "
                f"not {a.backend!r}")
    others = sorted(set(a.allow_uid) - {0, os.geteuid()})
    if others and not ascaller.acts_for_others():
        p.error(f"--allow-uid {others[0]}: this daemon runs as uid {os.geteuid()} without the "
                "privileges to act as another user (to check files or run commands as them); "
                "run branchd as root to serve other users")
    cfg = Config(state_dir=a.state_dir, mountpoint=a.mountpoint, socket=a.socket,
                 socket_mode=a.socket_mode, socket_group=a.socket_group,
                 allow_uids=frozenset(a.allow_uid), idle_timeout=a.idle_timeout,
                 debug_fuse=a.debug_fuse, backend=a.backend, owner_pid=a.owner_pid,
                 owned_dirs=tuple(a.owned_dir))
    return cfg.resolve(), a.log_level


def main(argv: list[str] | None = None) -> int:
    cfg, level = parse_args(argv)
    setup_logging(level)
    cfg.run_fd_limit = raise_fd_limit()
    try:
        trio.run(service.run, cfg)
    except KeyboardInterrupt:
        pass
    except Exception as e:
        # Start-up failures (busy socket, unusable state dir) are one line, not a traceback.
        code = getattr(e, "code", None)
        if code is None:
            raise
        print(f"branchd: error: {e}", file=sys.stderr)
        # busy: another daemon (4); unavailable: the asked-for backend cannot work (5)
        return ERROR_EXIT[code] if code in ("busy", "conflict", "unavailable") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
