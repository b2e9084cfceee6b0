"""The measurements. Each scenario runs once per backend, on its own copy of the same
deterministic base tree, and appends Rows to the run's Results."""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import agent
from bench.backends import Backend, BenchWorkspace
from bench.results import Results, Row
from bench.sizes import MiB, Sizes
from bench.trees import FILES_PER_DIR, base_file, changed_content

log = logging.getLogger(__name__)
T = TypeVar("T")


_libc = ctypes.CDLL(None, use_errno=True)
SYNC_DIR: list[Path] = []  # the bench dir, set by main: the filesystem flushed before a step


def flush() -> None:
    """syncfs(2) of the bench dir's filesystem: not sync(2), which would also wait for every
    other FUSE mount on the machine (a hung one would hang the benchmark)."""
    for path in SYNC_DIR:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"syncfs {path}: {os.strerror(e)}")
        finally:
            os.close(fd)


def timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    """Seconds ``fn(*args)`` took, and its value. Dirty data of earlier steps is written
    out first (untimed): left in the page cache, it would be flushed by throttled writers
    in later samples, and a row would grow with every run (seen: native create 0.3 s ->
    3.8 s over five runs of 10k files)."""
    flush()
    t0 = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - t0, value


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def files_label(n: int) -> str:
    return "1 file" if n == 1 else f"{n} files"


@dataclass
class Context:
    """What every scenario shares. Invariant: ``seeds[n]`` is the pristine base tree of n
    files; scenarios copy it and never change it."""

    sizes: Sizes
    work: Path
    results: Results
    seeds: dict[int, Path]
    tarball: Path
    job: Path
    notes: list[str] = field(default_factory=list)
    _names: Iterator[int] = field(default_factory=itertools.count)

    def name(self, prefix: str) -> str:
        """A branch name never used before in this run (safe across threads)."""
        return f"{prefix}{next(self._names)}"

    def row(self, scenario: str, param: str, backend: Backend) -> Row:
        return self.results.add(Row(scenario, param, backend.name))

    def runs(self, n: int) -> Iterator[int]:
        """Up to ``n`` runs of one measurement. After the first, none starts once
        ``sizes.row_seconds`` have passed since it began, untimed setup included: a native
        copy of the largest tree takes minutes a sample, a branchd create milliseconds, and
        the run must still end in its mode's time."""
        start = time.monotonic()
        for i in range(n):
            if i and time.monotonic() - start > self.sizes.row_seconds:
                return
            yield i

    @contextmanager
    def workspace(self, backend: Backend, files: int | None, label: str, *,
                  read_only: bool = False) -> Iterator[BenchWorkspace]:
        """A fresh copy of the seed tree of ``files`` files (None: a README alone),
        registered with the backend, removed afterwards whatever happened. A workspace
        whose base no operation changes (``read_only``) is a tree of hard links to the
        seed's files: one link per file instead of a copy of its data."""
        # the directory's name is the workspace's name in branchd: unique per backend
        base = self.work / backend.name / f"{label}-{backend.name}"
        base.parent.mkdir(exist_ok=True)
        if files is None:
            base.mkdir()
            (base / "README").write_text("agent workspace\n")
        else:
            how = "-al" if read_only else "-a"
            subprocess.run(["cp", how, str(self.seeds[files]), str(base)], check=True)
        ws = backend.workspace(base)
        try:
            yield ws
        finally:
            try:
                ws.close()
            finally:
                shutil.rmtree(base, ignore_errors=True)


# --- branch create, commit, discard --------------------------------------------------------


def create(ctx: Context, backend: Backend) -> None:
    for n in ctx.sizes.bases:
        # create and discard leave the base as it was: it may share the seed's files
        with ctx.workspace(backend, n, f"create-{n}", read_only=True) as ws:
            row = ctx.row("branch create", files_label(n), backend)
            fresh = ctx.row("discard fresh branch", files_label(n), backend)
            last_rel, last_data = base_file(n - 1)
            for _ in ctx.runs(ctx.sizes.repeat):
                name = ctx.name("c")
                seconds, path = timed(ws.create, name)
                row.samples.append(seconds)
                ws.verify(name)
                if (path / last_rel).read_bytes() != last_data:
                    raise AssertionError(f"branch {name} does not show the base's {last_rel}")
                fresh.samples.append(timed(ws.discard, name)[0])
                ws.settle()
            row.checks.append("the branch shows the base's last file and is served by the "
                              "column's backend")


Expect = dict[str, tuple[int, bytes]]  # relative path -> (size, first bytes)


def _blob_chunk(tag: int) -> bytes:
    return hashlib.sha256(b"blob-%d" % tag).digest() * (MiB // 32)


def _change(branch: Path, kind: str, amount: int, tag: int) -> Expect:
    """Change ``amount`` files (or write ``amount`` new bytes) in the branch; what to expect."""
    if kind == "files":
        expect: Expect = {}
        for i in range(amount):
            rel, _ = base_file(i)
            data = changed_content(i, tag)
            (branch / rel).write_bytes(data)
            if i in (0, amount - 1):
                expect[rel] = (len(data), data)
        return expect
    rel = f"blob-{tag}.bin"
    chunk = _blob_chunk(tag)
    with open(branch / rel, "wb") as f:
        left = amount
        while left:
            left -= f.write(chunk[: min(left, len(chunk))])
    return {rel: (amount, chunk[:4096])}


def _holds(base: Path, expect: Expect) -> bool:
    for rel, (size, head) in expect.items():
        try:
            with open(base / rel, "rb") as f:
                if os.fstat(f.fileno()).st_size != size or f.read(len(head)) != head:
                    return False
        except FileNotFoundError:
            return False
    return True


def commit(ctx: Context, backend: Backend) -> None:
    s = ctx.sizes
    changes = [("files", k, files_label(k)) for k in s.commit_files]
    changes += [("bytes", b, fmt_bytes(b)) for b in s.commit_bytes]
    with ctx.workspace(backend, s.commit_base, "commit") as ws:
        for kind, amount, label in changes:
            row = ctx.row("commit", label, backend)
            for _ in ctx.runs(s.repeat):
                name = ctx.name("m")
                expect = _change(ws.create_verified(name), kind, amount, tag=int(name[1:]))
                row.samples.append(timed(ws.commit, name)[0])
                ws.settle()
                if not _holds(ws.base, expect):
                    raise AssertionError(f"the base lacks what branch {name} committed")
            row.checks.append("the base holds the committed changes")
            row = ctx.row("discard after changes", label, backend)
            for _ in ctx.runs(s.repeat):
                name = ctx.name("m")
                expect = _change(ws.create_verified(name), kind, amount, tag=int(name[1:]))
                row.samples.append(timed(ws.discard, name)[0])
                ws.settle()
                if _holds(ws.base, expect):
                    raise AssertionError(f"the base shows what discarded branch {name} wrote")
            row.checks.append("the base does not show the discarded changes")


# --- inside a branch -----------------------------------------------------------------------


def _write_small(paths: list[Path], data: bytes) -> None:
    for i, path in enumerate(paths):
        if i % FILES_PER_DIR == 0:
            path.parent.mkdir(parents=True)
        with open(path, "wb") as f:
            f.write(data)


def _stat_all(paths: list[Path]) -> list[int]:
    return [os.stat(p).st_size for p in paths]


_CHUNK = MiB


def _seq_write(path: Path, size: int, chunk: bytes) -> None:
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        os.fsync(f.fileno())


def _seq_read(path: Path, size: int, chunk: bytes) -> int:
    buf = bytearray(len(chunk))
    view = memoryview(buf)
    total = 0
    wrong = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
            if n == len(chunk) and buf != chunk:
                wrong += 1
    if total != size or wrong:
        raise AssertionError(f"read {total} of {size} bytes back, {wrong} chunks wrong")
    return total


def drop_caches(path: Path) -> str:
    """Empty the page cache so the next read comes from the disk; how it was done."""
    flush()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "posix_fadvise DONTNEED (this file's cache only)"


def inside(ctx: Context, backend: Backend) -> None:
    s = ctx.sizes
    small = ctx.row("inside: create small files", files_label(s.small_files), backend)
    stat_row = ctx.row("inside: stat", files_label(s.small_files), backend)
    again = ctx.row("inside: stat again", files_label(s.small_files), backend)
    write = ctx.row("inside: seq write+fsync", fmt_bytes(s.seq_bytes), backend)
    read = ctx.row("inside: cold seq read", fmt_bytes(s.seq_bytes), backend)
    payload = b"x" * s.small_file_size
    chunk = hashlib.sha256(b"seq").digest() * (_CHUNK // 32)
    with ctx.workspace(backend, s.bases[0], "inside") as ws:
        for _ in ctx.runs(s.heavy_repeat):
            name = ctx.name("i")
            branch = ws.create_verified(name)
            paths = [branch / "small" / f"d{i // FILES_PER_DIR:04d}" / f"s{i:06d}"
                     for i in range(s.small_files)]
            small.samples.append(timed(_write_small, paths, payload)[0])
            seconds, sizes = timed(_stat_all, paths)
            stat_row.samples.append(seconds)
            if sizes != [len(payload)] * len(paths):
                raise AssertionError("stat shows sizes other than those written")
            again.samples.append(timed(_stat_all, paths)[0])
            seq = branch / "seq.bin"
            write.samples.append(timed(_seq_write, seq, s.seq_bytes, chunk)[0])
            read.extra["cache"] = drop_caches(seq)
            read.samples.append(timed(_seq_read, seq, s.seq_bytes, chunk)[0])
            ws.discard(name)
            ws.settle()
    for row in (write, read):
        row.extra["MB/s"] = round(s.seq_bytes / row.median / 1e6, 1) if row.median else None
    stat_row.checks.append("every size is the one written")
    read.checks.append("every byte read back is the one written")


# --- the agent workload --------------------------------------------------------------------


def agent_workload(ctx: Context, backend: Backend) -> None:
    s = ctx.sizes
    rows = {step: ctx.row("agent workload", step, backend) for step in (*agent.STEPS, "total")}
    home = ctx.work / "home"
    home.mkdir(exist_ok=True)
    with ctx.workspace(backend, None, "agent") as ws:
        for _ in ctx.runs(s.heavy_repeat):
            name = ctx.name("a")
            ws.create_verified(name)
            times = ws.agent(name, ctx.tarball, s.agent_modules, s.agent_edits, home)
            for step, seconds in times.items():
                rows[step].samples.append(seconds)
            ws.discard(name)
            ws.settle()
        rows["total"].checks.extend(ws.checks)
    rows["total"].checks.append(
        "git status lists exactly the edited files, compileall writes a .pyc per module, "
        "grep finds exactly the edited files")


# --- parallel branches ---------------------------------------------------------------------


def parallel(ctx: Context, backend: Backend) -> None:
    s = ctx.sizes
    expected = s.bases[0] + 1 + s.job_files  # base files, README, the job's own files
    argv = [sys.executable, str(ctx.job), str(s.job_files), str(s.job_file_size)]
    with ctx.workspace(backend, s.bases[0], "parallel") as ws:

        def job(_: int) -> int:
            name = ctx.name("p")
            branch = ws.create(name)
            try:
                out = subprocess.run(argv, cwd=branch, capture_output=True, text=True,
                                     check=False)
            finally:
                ws.discard(name)
            if out.returncode != 0:
                raise AssertionError(f"job in {name} failed: {out.stderr.strip()[-300:]}")
            return int(out.stdout)

        for n in s.parallel:
            row = ctx.row("parallel branches", f"{n} branches", backend)
            for _ in ctx.runs(s.heavy_repeat):
                with ThreadPoolExecutor(n) as pool:
                    seconds, counts = timed(lambda n=n, pool=pool: list(pool.map(job, range(n))))
                row.samples.append(seconds)
                ws.settle()
                if counts != [expected] * n:
                    raise AssertionError(f"jobs counted {counts}, expected {expected} each")
            row.checks.append("each job reads back what it wrote and sees the base")


# --- running a command in a branch ---------------------------------------------------------


def run_true(ctx: Context, backend: Backend) -> None:
    with ctx.workspace(backend, ctx.sizes.bases[0], "run") as ws:
        row = ctx.row("run `true` in a branch", "", backend)
        name = ctx.name("r")
        ws.create_verified(name)
        for _ in ctx.runs(ctx.sizes.repeat):
            seconds, code = timed(ws.run, name, ["true"])
            if code != 0:
                raise AssertionError(f"`true` exited {code}")
            row.samples.append(seconds)
        ws.discard(name)


# --- control requests while the data plane is busy ----------------------------------------

IDLE = "idle"
LOAD_START_S = 0.02  # after a load is started, before the first probe: it reaches the daemon
PROBE_PAUSE_S = 0.01  # between one probe's requests
IDLE_SAMPLES = 3  # of each probe, before each round of loads


def _probe_during(load: Callable[[], object], probes: dict[str, Callable[[], object]],
                  rows: dict[str, Row]) -> tuple[float, dict[str, int]]:
    """Run *load* on a thread, and each probe on a thread of its own, again and again
    while the load runs (at least once); every latency of a probe started during the
    load goes to its row. The load's seconds, and per probe how many of its requests
    ended while the load still ran (the others may have waited for it)."""
    done = threading.Event()
    took: list[float] = []
    failed: list[BaseException] = []
    outlasted = dict.fromkeys(probes, 0)

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # re-raised below, on the scenario's thread
                failed.append(e)
                done.set()
        return run

    def run_load() -> None:
        t0 = time.perf_counter()
        try:
            load()
        finally:
            took.append(time.perf_counter() - t0)
            done.set()

    def run_probe(name: str) -> None:
        first = True
        while first or not done.is_set():
            first = False
            t0 = time.perf_counter()
            probes[name]()
            rows[name].samples.append(time.perf_counter() - t0)
            outlasted[name] += not done.is_set()
            time.sleep(PROBE_PAUSE_S)

    flush()
    threads = [threading.Thread(target=guarded(run_load), name="control-load")]
    threads[0].start()
    time.sleep(LOAD_START_S)
    for name in probes:
        threads.append(threading.Thread(target=guarded(lambda name=name: run_probe(name)),
                                        name=f"control-{name}"))
        threads[-1].start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return took[0], outlasted


def control_loads(sizes: Sizes) -> list[str]:
    """The control rows' loads, by row name."""
    return [f"during a {fmt_bytes(sizes.control_copy_bytes)} copy-up",
            f"during a commit of {files_label(sizes.control_commit_files)}",
            f"during {sizes.control_parallel} parallel branches"]


def control(ctx: Context, backend: Backend) -> None:
    """The latency of control requests (``branchctl list`` as a user runs it, and the same
    request through the API) idle, and while the daemon serves, elsewhere: a large FUSE
    copy-up, a commit of many files, many parallel branches doing I/O. Each row's
    ``x idle`` is its median over the idle one's (the target: at most 2x)."""
    s = ctx.sizes
    loads = control_loads(s)
    with ctx.workspace(backend, None, "control") as ws:
        probes = ws.probes()
        if not probes:
            return  # a column without a daemon of its own: nothing to ask
        rows = {p: {label: ctx.row(f"control: {p}", label, backend) for label in (IDLE, *loads)}
                for p in probes}
        big = ws.base / "big.bin"
        chunk = _blob_chunk(0)
        with open(big, "wb") as f:
            for _ in range(s.control_copy_bytes // len(chunk)):
                f.write(chunk)
            f.write(chunk[: s.control_copy_bytes % len(chunk)])
        argv = [sys.executable, str(ctx.job), str(s.job_files), str(s.job_file_size)]

        def copy_up(branch: Path) -> None:
            with open(branch / "big.bin", "r+b") as f:  # the open copies the file up
                f.write(b"x")

        def commit_of(name: str) -> Callable[[], None]:
            branch = ws.create_verified(name)
            for i in range(s.control_commit_files):
                d = branch / f"many-{name}" / f"d{i // FILES_PER_DIR:04d}"
                if i % FILES_PER_DIR == 0:
                    d.mkdir(parents=True)
                (d / f"f{i:06d}").write_bytes(b"new\n")
            return lambda: ws.commit(name)

        def parallel_load() -> None:
            def job(_: int) -> None:
                name = ctx.name("q")
                branch = ws.create(name)
                try:
                    subprocess.run(argv, cwd=branch, capture_output=True, check=True)
                finally:
                    ws.discard(name)
            with ThreadPoolExecutor(s.control_parallel) as pool:
                list(pool.map(job, range(s.control_parallel)))

        for _ in ctx.runs(s.heavy_repeat):
            # idle next to each round of loads: the machine's own load drifts (other
            # processes), and each ratio should compare like with like
            for _ in range(IDLE_SAMPLES):
                for p, probe in probes.items():
                    rows[p][IDLE].samples.append(timed(probe)[0])
            name = ctx.name("u")
            branch = ws.create_verified(name)
            at = {p: rows[p][loads[0]] for p in probes}
            took, outlasted = _probe_during(lambda branch=branch: copy_up(branch), probes, at)
            _note_load(at, took, outlasted)
            ws.discard(name)
            at = {p: rows[p][loads[1]] for p in probes}
            took, outlasted = _probe_during(commit_of(ctx.name("k")), probes, at)
            _note_load(at, took, outlasted)
            at = {p: rows[p][loads[2]] for p in probes}
            took, outlasted = _probe_during(parallel_load, probes, at)
            _note_load(at, took, outlasted)
            ws.settle()
        for by_load in rows.values():
            idle = by_load[IDLE].median
            for label, row in by_load.items():
                if label != IDLE and idle and row.median:
                    row.extra["x idle"] = round(row.median / idle, 2)
                row.checks.append("the daemon answered every request")


def _note_load(rows: dict[str, Row], seconds: float, outlasted: dict[str, int]) -> None:
    for name, row in rows.items():
        row.extra.setdefault("load seconds", []).append(round(seconds, 3))
        row.extra.setdefault("requests ended during the load", []).append(outlasted[name])


SCENARIOS: dict[str, Callable[[Context, Backend], None]] = {
    "create": create,
    "commit": commit,
    "inside": inside,
    "agent": agent_workload,
    "parallel": parallel,
    "run": run_true,
    "control": control,
}
