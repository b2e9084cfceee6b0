"""A cgroup of one user's own in every hierarchy runs use, as systemd delegates one to
a user session: what the tests and the benchmark give a daemon they run as that user.

``delegate`` makes the directory in v2 and in v1's memory, cpu, pids, blkio and
freezer hierarchies (those present) and chowns it and its interface files to the user;
``remove`` kills whatever is left in them and removes them bottom-up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from .layout import detect

HIERARCHIES = ("memory", "cpu", "pids", "blkio", "freezer")
INTERFACE = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads", "tasks")


def delegate(uid: int, name: str) -> list[str]:
    """The directories named ``name`` made in each hierarchy, the user's; on an error,
    those made so far are removed again."""
    layout = detect()
    roots = [d for d in (layout.v2_dir, *(layout.v1_dir(c) for c in HIERARCHIES))
             if d is not None]
    made: list[str] = []
    try:
        for root in dict.fromkeys(roots):
            d = os.path.join(root, name)
            os.mkdir(d)
            made.append(d)
            os.chown(d, uid, uid)
            for file in INTERFACE:
                if os.path.exists(os.path.join(d, file)):
                    os.chown(os.path.join(d, file), uid, uid)
    except BaseException:
        remove(made)
        raise
    return made


def remove(dirs: list[str]) -> None:
    """Kill what is left in ``dirs`` and below, then rmdir them bottom-up (retried for
    5 s: the kernel finishes tearing a cgroup down after its last process is gone)."""
    for d in reversed(dirs):
        for sub, _, _ in sorted(os.walk(d), key=lambda w: -w[0].count("/")):
            with contextlib.suppress(OSError), open(os.path.join(sub, "cgroup.procs")) as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            for _ in range(100):
                try:
                    os.rmdir(sub)
                    break
                except OSError:
                    time.sleep(0.05)
