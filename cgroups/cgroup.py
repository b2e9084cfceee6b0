"""One cgroup of ours across the hierarchies it lives in: create, limit, place, stop, remove.

A node has at most one directory in the v2 tree and one per v1 hierarchy (a
co-mounted pair such as cpu,cpuacct shares one directory). Each operation uses
the v2 file where the controller is enabled there, and the v1 file otherwise;
which limits a node can enforce at all is answered by `unsupported`, so that
the Manager can warn once instead of a write silently doing nothing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Iterable

import psutil

from .errors import CgroupError
from .limits import Limits

log = logging.getLogger(__name__)

_CFS_PERIOD_US = 100_000
_KILL_DEADLINE = 10.0  # seconds a kill may take before we give up and report it


def write(path: str, value: str) -> None:
    """One write(2) of `value`, as cgroup files expect; errors become a one-line CgroupError."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def read_keyed(path: str) -> dict[str, int]:
    """A flat keyed file ("key value" lines, as memory.events, cpu.stat) as a dict."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


def read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def _pause(attempt: int) -> None:
    # back off from 0.5 ms to 20 ms: processes usually leave within a millisecond
    time.sleep(min(0.0005 * (2**attempt), 0.02))


class Cgroup:
    """One cgroup in the v2 tree and/or some v1 hierarchies.

    Invariants: every directory in `dirs` was created by this object and is
    removed by `remove()`; `v2_controllers` are the controllers enabled for this
    node in the v2 tree, and a controller enabled there is never also used in v1.
    """

    def __init__(self, v2: str | None, v1: dict[str, str], v2_controllers: frozenset[str]) -> None:
        self.v2 = v2
        self.v1 = v1
        self.v2_controllers = v2_controllers

    @property
    def dirs(self) -> list[str]:
        found = [self.v2] if self.v2 is not None else []
        for d in self.v1.values():
            if d not in found:
                found.append(d)
        return found

    @classmethod
    def create(
        cls,
        v2_parent: str | None,
        v1_parents: dict[str, str],
        name: str,
        v2_controllers: frozenset[str],
    ) -> Cgroup:
        """mkdir `name` under each parent; all or nothing."""
        node = cls(
            os.path.join(v2_parent, name) if v2_parent is not None else None,
            {c: os.path.join(p, name) for c, p in v1_parents.items()},
            v2_controllers,
        )
        made: list[str] = []
        try:
            for d in node.dirs:
                os.mkdir(d)
                made.append(d)
        except OSError as exc:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise CgroupError(f"cannot create cgroup {exc.filename}: {exc.strerror}") from None
        return node

    def enable(self, controllers: Iterable[str]) -> None:
        """Enable v2 controllers for this node's children (cgroup.subtree_control)."""
        wanted = " ".join(f"+{c}" for c in sorted(controllers))
        if wanted and self.v2 is not None:
            write(os.path.join(self.v2, "cgroup.subtree_control"), wanted)

    # -- what this node can do -------------------------------------------------

    def _v1_file(self, controller: str, name: str) -> str | None:
        d = self.v1.get(controller)
        if d is not None and os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
        return None

    def _v2_file(self, controller: str, name: str) -> str | None:
        if self.v2 is not None and controller in self.v2_controllers:
            path = os.path.join(self.v2, name)
            if os.path.exists(path):
                return path
        return None

    def _io_weight(self, weight: int) -> tuple[str, str] | None:
        """(file, value) that sets the v2-scale I/O `weight` here, if any file can."""
        if v2 := self._v2_file("io", "io.weight"):
            return v2, f"default {weight}"
        # v1 BFQ weights are 1..1000 with v2's default of 100: the same scale;
        # v1 CFQ weights are 10..1000 with 500 as the default
        if bfq := self._v1_file("blkio", "blkio.bfq.weight"):
            return bfq, str(min(1000, weight))
        if cfq := self._v1_file("blkio", "blkio.weight"):
            return cfq, str(min(1000, max(10, weight * 5)))
        return None

    def unsupported(self) -> dict[str, str]:
        """Limit name -> why this node cannot enforce it."""
        missing = {}
        if not (
            self._v2_file("memory", "memory.max")
            or self._v1_file("memory", "memory.limit_in_bytes")
        ):
            missing["memory"] = "no memory controller is available (neither v2 nor v1)"
        elif psutil.swap_memory().total and not (
            self._v2_file("memory", "memory.swap.max")
            or self._v1_file("memory", "memory.memsw.limit_in_bytes")
        ):
            missing["memory"] = (
                "swap cannot be limited (no memory.swap.max / memory.memsw; boot with "
                "swapaccount=1): a candidate can swap past its memory limit"
            )
        if not (self._v2_file("cpu", "cpu.max") or self._v1_file("cpu", "cpu.cfs_quota_us")):
            missing["cpus"] = "no cpu controller with a CFS quota is available (neither v2 nor v1)"
        if not (self._v2_file("pids", "pids.max") or self._v1_file("pids", "pids.max")):
            missing["pids"] = "no pids controller is available (neither v2 nor v1)"
        if self._io_weight(100) is None:
            missing["io_weight"] = (
                "no I/O weight file (v2 io.weight, v1 blkio.weight or blkio.bfq.weight: "
                "the block device's scheduler must be BFQ or CFQ)"
            )
        return missing

    @property
    def kill_method(self) -> str | None:
        """ "cgroup.kill" (v2), "freezer" (v1 freeze-kill-thaw) or None (no race-free kill here)."""
        if self.v2 is not None and os.path.exists(os.path.join(self.v2, "cgroup.kill")):
            return "cgroup.kill"
        if self._v1_file("freezer", "freezer.state"):
            return "freezer"
        return None

    @property
    def freeze_method(self) -> str | None:
        if self.v2 is not None and os.path.exists(os.path.join(self.v2, "cgroup.freeze")):
            return "cgroup.freeze"
        if self._v1_file("freezer", "freezer.state"):
            return "freezer"
        return None

    # -- limits and placement --------------------------------------------------

    def apply(self, limits: Limits) -> None:
        """Write every limit this node supports (the Manager warned about the others)."""
        if limits.memory is not None:
            if v2 := self._v2_file("memory", "memory.max"):
                write(v2, str(limits.memory))
                if swap := self._v2_file("memory", "memory.swap.max"):
                    write(swap, "0")
                # one OOM kill ends the whole candidate: a half-killed test run is noise
                if group := self._v2_file("memory", "memory.oom.group"):
                    write(group, "1")
            elif v1 := self._v1_file("memory", "memory.limit_in_bytes"):
                write(v1, str(limits.memory))
                # memsw = memory + swap: the same value leaves no room for swap
                if memsw := self._v1_file("memory", "memory.memsw.limit_in_bytes"):
                    write(memsw, str(limits.memory))
        if limits.cpus is not None:
            quota = max(1000, round(limits.cpus * _CFS_PERIOD_US))
            if v2 := self._v2_file("cpu", "cpu.max"):
                write(v2, f"{quota} {_CFS_PERIOD_US}")
            elif v1 := self._v1_file("cpu", "cpu.cfs_quota_us"):
                write(os.path.join(os.path.dirname(v1), "cpu.cfs_period_us"), str(_CFS_PERIOD_US))
                write(v1, str(quota))
        pids = self._v2_file("pids", "pids.max") or self._v1_file("pids", "pids.max")
        if limits.pids is not None and pids:
            write(pids, str(limits.pids))
        if limits.io_weight is not None and (io := self._io_weight(limits.io_weight)):
            write(*io)

    def place(self, pid: int) -> None:
        """Move `pid` (all its threads) into this node in every hierarchy."""
        for d in self.dirs:
            write(os.path.join(d, "cgroup.procs"), str(pid))

    def procs(self) -> set[int]:
        """Processes in this node (exited processes are no longer listed, zombies included)."""
        found: set[int] = set()
        for d in self.dirs:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    found.update(int(x) for x in f.read().split())
            except FileNotFoundError:
                pass
        return found

    # -- stop ------------------------------------------------------------------

    def kill(self, wait: bool = True) -> int:
        """SIGKILL every process in the node, forks in flight included; returns how many.

        With wait, returns once the node is empty, and raises CgroupError when it
        is not after the deadline (a process stuck in uninterruptible sleep).
        Without wait (cgroup.kill only), returns at once: the kernel delivers the
        kills, and exiting processes may still need answers from our own FUSE
        session (FLUSH on close) before they are gone.
        """
        seen = self.procs()
        if not seen:
            return 0
        method = self.kill_method
        if method == "cgroup.kill":
            assert self.v2 is not None
            write(os.path.join(self.v2, "cgroup.kill"), "1")
        elif method == "freezer" and wait:
            seen |= self._freezer_kill()
        else:
            raise CgroupError(f"cannot kill {self.dirs[0]} this way ({method}, wait={wait})")
        if wait:
            self.wait_empty()
        return len(seen)

    def _freezer_kill(self) -> set[int]:
        # freeze so that nothing forks between reading cgroup.procs and the kills,
        # kill what is listed, thaw so that the kills are delivered; repeat for
        # anything that was mid-fork when the freeze began
        state = self._v1_file("freezer", "freezer.state")
        assert state is not None
        killed: set[int] = set()
        deadline = time.monotonic() + _KILL_DEADLINE
        attempt = 0
        while self.procs() and time.monotonic() < deadline:
            self._freeze_v1(state, deadline)
            for pid in self.procs():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            write(state, "THAWED")
            _pause(attempt)
            attempt += 1
        return killed

    def _freeze_v1(self, state: str, deadline: float) -> bool:
        write(state, "FROZEN")
        attempt = 0
        while time.monotonic() < deadline:
            with open(state) as f:
                if f.read().strip() == "FROZEN":
                    return True
            _pause(attempt)
            attempt += 1
        return False

    def wait_empty(self, timeout: float = _KILL_DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        attempt = 0
        while self.procs():
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"processes {sorted(self.procs())} still in {self.dirs[0]} "
                    f"{timeout:g}s after SIGKILL (uninterruptible sleep?)"
                )
            _pause(attempt)
            attempt += 1

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) every process in the node; returns once the kernel says so."""
        method = self.freeze_method
        if method == "cgroup.freeze":
            assert self.v2 is not None
            write(os.path.join(self.v2, "cgroup.freeze"), "1" if frozen else "0")
            events = os.path.join(self.v2, "cgroup.events")
            attempt = 0
            deadline = time.monotonic() + _KILL_DEADLINE
            while read_keyed(events).get("frozen") != int(frozen):
                if time.monotonic() > deadline:
                    raise CgroupError(f"{self.v2} did not {'freeze' if frozen else 'thaw'}")
                _pause(attempt)
                attempt += 1
        elif method == "freezer":
            state = self._v1_file("freezer", "freezer.state")
            assert state is not None
            if not frozen:
                write(state, "THAWED")
            elif not self._freeze_v1(state, time.monotonic() + _KILL_DEADLINE):
                raise CgroupError(f"{os.path.dirname(state)} did not freeze")
        else:
            raise CgroupError("this host has neither cgroup.freeze (v2) nor a v1 freezer")

    # -- measure ---------------------------------------------------------------

    def peak_memory(self) -> int | None:
        path = self._v2_file("memory", "memory.peak") or self._v1_file(
            "memory", "memory.max_usage_in_bytes"
        )
        return read_int(path) if path else None

    def cpu_time(self) -> float | None:
        """Seconds of CPU used by the node's processes, children included."""
        if self.v2 is not None and os.path.exists(os.path.join(self.v2, "cpu.stat")):
            # usage_usec is kept by the v2 core, with or without the cpu controller
            usage = read_keyed(os.path.join(self.v2, "cpu.stat")).get("usage_usec")
            if usage is not None:
                return usage / 1e6
        if path := self._v1_file("cpuacct", "cpuacct.usage"):
            return read_int(path) / 1e9
        return None

    def oom_kills(self) -> int | None:
        """OOM kills in this node; None where the kernel does not count them."""
        if path := self._v2_file("memory", "memory.events"):
            return read_keyed(path).get("oom_kill", 0)
        if path := self._v1_file("memory", "memory.oom_control"):
            return read_keyed(path).get("oom_kill")
        return None

    def memory_failcnt(self) -> int | None:
        path = self._v1_file("memory", "memory.failcnt")
        return read_int(path) if path else None

    # -- remove ----------------------------------------------------------------

    def remove(self) -> None:
        """rmdir every directory; the node must be empty. Missing directories are fine."""
        failed = []
        for d in reversed(self.dirs):
            for attempt in range(20):
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    # EBUSY right after the last exit: the kernel finishes
                    # tearing the css down asynchronously
                    if exc.errno == errno.EBUSY and attempt < 19:
                        _pause(attempt)
                        continue
                    failed.append(f"{d}: {exc.strerror}")
                break
        if failed:
            raise CgroupError(f"cannot remove cgroup {'; '.join(failed)}")
