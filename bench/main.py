"""``python -m bench``: prepare the inputs, run every scenario on every backend, report."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

from bench import machine, report, scenarios, trees
from bench.backends import Backend, NativeBackend, OverlayBackend, overlay_unavailable
from bench.profiling import Profiler
from bench.results import Results, Row
from bench.sizes import FULL, MODES, QUICK, TINY, Sizes

log = logging.getLogger(__name__)

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
BACKENDS = ("native", "overlay", "branchd", "branchd-cli", "branchd-overlay", "branchd-unpriv")


def parse_args(args: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_const", dest="mode", const=FULL.mode,
                      help="the issue's sizes (100k-file bases, 1 GiB I/O); takes long")
    mode.add_argument("--mode", choices=sorted(MODES), help="sizes by name (default: quick)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help=f"where the results go (default: {DEFAULT_JSON})")
    p.add_argument("--dir", type=Path, default=None,
                   help="where base trees and branches are made (default: a temp dir)")
    p.add_argument("--only", default=",".join([*scenarios.SCENARIOS, "kv"]),
                   help="comma-separated scenarios (default: all): "
                        + ", ".join([*scenarios.SCENARIOS, "kv"]))
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated backends (default: all available)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="sample branchd with py-spy during each scenario; flame data and top "
                        "functions go to DIR")
    p.add_argument("--keep", action="store_true", help="leave the work directory behind")
    p.add_argument("-v", "--verbose", action="store_true")
    ns = p.parse_args(args)
    ns.sizes = MODES[ns.mode or QUICK.mode]
    return ns


def open_backends(wanted: list[str], work: Path, notes: list[str]) -> list[Backend]:
    """The backends that can run here; a note for each one that cannot."""
    backends: list[Backend] = []
    if "native" in wanted:
        backends.append(NativeBackend())
    if "overlay" in wanted:
        why = overlay_unavailable(work / "overlay-probe")
        if why:
            notes.append(f"overlay skipped: {why}")
        else:
            backends.append(OverlayBackend())
    api, cli, fast = ("branchd" in wanted, "branchd-cli" in wanted, "branchd-overlay" in wanted)
    if api or cli or fast:
        try:
            from bench.branchd_backend import start_branchd
        except ImportError as e:
            notes.append(f"branchd skipped: the client cannot be imported ({e})")
        else:
            backends += start_branchd(work / "branchd", api=api, cli=cli, overlay=fast,
                                      notes=notes)
    if "branchd-unpriv" in wanted:
        from bench.unprivileged import start_unprivileged
        backends += start_unprivileged(work, notes)
    return backends


def prepare(sizes: Sizes, work: Path, wanted: set[str]) -> scenarios.Context:
    """Make the seed trees and the agent's tarball once; every backend copies them."""
    t0 = time.perf_counter()
    seed_sizes = {sizes.bases[0]}
    if "create" in wanted:
        seed_sizes |= set(sizes.bases)
    if "commit" in wanted:
        seed_sizes.add(sizes.commit_base)
    seeds = {n: trees.make_base(work / "seeds" / f"base-{n}", n) for n in sorted(seed_sizes)}
    tarball = trees.make_agent_tarball(work, sizes.agent_modules)
    job = trees.make_job_script(work)
    log.info("inputs ready in %.1f s", time.perf_counter() - t0)
    return scenarios.Context(sizes, work, Results(), seeds, tarball, job)


class ScenarioTimeout(Exception):
    """A scenario ran past its mode's limit (a hung operation)."""


CLEANUP_SECONDS = 60  # after a timeout, what the scenario's cleanup may take


@contextmanager
def watchdog(seconds: int) -> Iterator[None]:
    """Raise ScenarioTimeout in the main thread after ``seconds``, and again if the cleanup
    that the exception runs hangs too: a hung daemon must cost one row, not the whole run."""

    def expire(signum: int, frame: object) -> None:
        signal.alarm(CLEANUP_SECONDS)
        raise ScenarioTimeout(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_scenarios(ctx: scenarios.Context, backends: list[Backend], wanted: list[str],
                  profiler: Profiler | None) -> None:
    hung: set[str] = set()
    for scenario in wanted:
        fn = scenarios.SCENARIOS[scenario]
        for backend in backends:
            if backend.scenarios is not None and scenario not in backend.scenarios:
                continue
            if backend.group in hung:
                ctx.results.add(Row(scenario, "", backend.name, error="skipped: hung before"))
                continue
            log.info("%s on %s", scenario, backend.name)
            first = len(ctx.results.rows)
            t0 = time.perf_counter()
            try:
                with watchdog(ctx.sizes.scenario_timeout):
                    if profiler:
                        with profiler.sampling(backend, scenario):
                            fn(ctx, backend)
                    else:
                        fn(ctx, backend)
            except Exception as e:  # the run goes on: one failing backend must not hide others
                log.exception("%s on %s failed", scenario, backend.name)
                mine = ctx.results.rows[first:]
                row = mine[-1] if mine else ctx.results.add(Row(scenario, "", backend.name))
                row.error = f"{type(e).__name__}: {e}"
                if isinstance(e, ScenarioTimeout):
                    hung.add(backend.group)
            log.info("%s on %s took %.1f s", scenario, backend.name, time.perf_counter() - t0)


def run_kv(sizes: Sizes, notes: list[str]) -> Any:
    """The KV-fork rows, owned by bench/kv*.py, where that module and vLLM are installed.
    vLLM's engine processes log to their fd 1: it points at stderr meanwhile, so that stdout
    stays the table."""
    if sizes.mode == TINY.mode:
        notes.append("kv skipped: not run in tiny mode (python -m bench.kv runs it alone)")
        return None
    if importlib.util.find_spec("bench.kv") is None:
        notes.append("kv skipped: bench/kv.py is not there")
        return None
    if importlib.util.find_spec("vllm") is None:
        notes.append("kv skipped: vLLM is not installed")
        print("note: KV-fork rows skipped, vLLM is not installed")
        return None
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):
            kv = importlib.import_module("bench.kv").run(sizes.mode != FULL.mode)
    except Exception as e:  # the filesystem rows are still worth printing
        log.exception("the KV-fork rows failed")
        notes.append(f"kv FAILED: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
    notes += [f"kv: {note}" for note in kv.get("notes", [])]
    return kv


def main(args: list[str] | None = None) -> int:
    ns = parse_args(args)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="bench: %(message)s", stream=sys.stderr)
    sizes: Sizes = ns.sizes
    wanted = [s for s in ns.only.split(",") if s]
    unknown = [s for s in wanted if s not in scenarios.SCENARIOS and s != "kv"]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    if ns.dir:
        ns.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="branchd-bench-", dir=ns.dir))
    started = time.time()
    notes: list[str] = []
    if sizes.mode != FULL.mode:
        notes.append(f"{sizes.mode} mode: sizes scaled down from the issue's "
                     f"(python -m bench --full runs them); targets are judged on these sizes")
    scenarios.SYNC_DIR[:] = [work]
    desc = machine.describe(work)
    print(f"branchd benchmark, {sizes.mode} mode")
    print(f"machine: {machine.summary(desc)}")
    backends: list[Backend] = []
    profiler = Profiler(ns.profile) if ns.profile else None
    try:
        ctx = prepare(sizes, work, set(wanted))
        ctx.notes = notes
        backends = open_backends(ns.backends.split(","), work, notes)
        run_scenarios(ctx, backends, [w for w in wanted if w != "kv"], profiler)
    finally:
        for backend in backends:
            backend.close()
        if ns.keep:
            log.info("work directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    kv = run_kv(sizes, notes) if "kv" in wanted else None
    judged = [t.judge(ctx.results) for t in report.targets(sizes)]
    print()
    print(report.table(ctx.results, judged))
    print()
    if isinstance(kv, dict) and kv.get("rows"):
        print(report.kv_table(kv))
        print()
    for t in judged:
        word = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"target {word:12} {t['target']}")
    for note in notes:
        print(f"note: {note}")
    failed = report.errors(ctx.results)
    if isinstance(kv, dict) and kv.get("error"):
        failed.append(f"kv: {kv['error']}")
    for line in failed:
        print(f"FAILED: {line}")
    if profiler:
        print()
        print(profiler.summary())
    desc["loadavg_end"] = machine.loadavg()
    doc = {"mode": sizes.mode, "scaled_down": sizes.mode != FULL.mode, "machine": desc,
           "sizes": sizes.as_dict(), "notes": notes, "kv": kv,
           "started": started, "seconds": round(time.time() - started, 1)}
    report.write_json(ns.json, doc, ctx.results, judged)
    print(f"\nresults: {ns.json}")
    return 1 if failed else 0
