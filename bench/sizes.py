"""The sizes each mode runs at: the issue's (full), scaled down (quick), and tiny (smoke test)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    """One mode's sizes. Invariant: ``commit_files`` never exceeds ``commit_base``."""

    mode: str
    repeat: int  # runs per measurement (the median is reported)
    heavy_repeat: int  # runs of the long ones (1 GiB I/O, agent workload)
    bases: tuple[int, ...]  # files in the base trees that branch create is measured on
    commit_base: int  # files in the base tree of the commit/discard rows
    commit_files: tuple[int, ...]  # changed files per commit
    commit_bytes: tuple[int, ...]  # new data per commit
    small_files: int  # files created, then stat'ed, inside a branch
    small_file_size: int
    seq_bytes: int  # sequential write (fsync'ed) and cold read
    agent_modules: int  # modules of the synthetic Python package of the agent workload
    agent_edits: int
    parallel: tuple[int, ...]  # numbers of branches running a job at once
    job_files: int  # files each parallel job writes and reads back
    job_file_size: int
    control_copy_bytes: int  # the copy-up the control requests are timed during
    control_commit_files: int  # the commit they are timed during
    control_parallel: int  # the parallel branches they are timed during
    scenario_timeout: int  # seconds one scenario may take on one backend before it is failed
    row_seconds: int  # after this long, a row takes no more samples (it has at least one)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Sizes(
    mode="full",
    repeat=5,
    heavy_repeat=3,
    bases=(100, 10_000, 100_000),
    commit_base=10_000,
    commit_files=(1, 100, 10_000),
    commit_bytes=(1 * MiB, 100 * MiB),
    small_files=10_000,
    small_file_size=256,
    seq_bytes=1 * GiB,
    agent_modules=400,
    agent_edits=20,
    parallel=(1, 4, 16),
    job_files=100,
    job_file_size=64 * KiB,
    control_copy_bytes=500 * MiB,
    control_commit_files=10_000,
    control_parallel=16,
    scenario_timeout=3600,
    # the slow rows (a native copy of 100k files, 10k-file commits) get one to three samples:
    # the whole run fits in about 20 minutes on a 2-core machine instead of 45
    row_seconds=30,
)

QUICK = Sizes(
    mode="quick",
    repeat=5,
    heavy_repeat=3,
    bases=(100, 1_000, 10_000),
    commit_base=1_000,
    commit_files=(1, 100, 1_000),
    commit_bytes=(1 * MiB, 16 * MiB),
    small_files=2_000,
    small_file_size=256,
    seq_bytes=128 * MiB,
    agent_modules=200,
    agent_edits=20,
    parallel=(1, 4, 16),
    job_files=20,
    job_file_size=16 * KiB,
    control_copy_bytes=500 * MiB,  # the loads: the rows are about the daemon
    control_commit_files=10_000,
    control_parallel=16,
    scenario_timeout=600,
    row_seconds=120,  # in practice every row gets its samples
)

TINY = Sizes(
    mode="tiny",
    repeat=2,
    heavy_repeat=1,
    bases=(10, 100),
    commit_base=20,
    commit_files=(1, 20),
    commit_bytes=(64 * KiB,),
    small_files=30,
    small_file_size=64,
    seq_bytes=1 * MiB,
    agent_modules=12,
    agent_edits=3,
    parallel=(1, 2),
    job_files=3,
    job_file_size=4 * KiB,
    control_copy_bytes=4 * MiB,
    control_commit_files=50,
    control_parallel=2,
    scenario_timeout=120,
    row_seconds=60,
)

MODES = {s.mode: s for s in (FULL, QUICK, TINY)}
