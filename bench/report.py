"""The table on stdout, the targets met or missed, and the JSON file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.agent import STEPS
from bench.results import Results, Row
from bench.scenarios import control_loads, files_label, fmt_bytes
from bench.sizes import Sizes

BRANCHD = "branchd"
FAST_PATH = "branchd-overlay"
FAST_PATH_LIMIT = 1.2  # the kernel fast path's time on an I/O row, at most this x native


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e3:.3f} ms"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


@dataclass(frozen=True)
class Target:
    """One of the issue's goals, judged on one row. ``value`` turns the rows into the number
    compared with ``limit`` (at most, or at least when ``at_least``)."""

    text: str
    short: str  # beside the row in the table
    scenario: str
    param: str
    value: Callable[[Results, str, str], float | None]
    limit: float
    at_least: bool = False

    def judge(self, results: Results) -> dict[str, Any]:
        v = self.value(results, self.scenario, self.param)
        met = None if v is None else (v >= self.limit if self.at_least else v <= self.limit)
        return {"target": self.text, "short": self.short, "scenario": self.scenario,
                "param": self.param, "value": v, "limit": self.limit, "met": met}


def _median(backend: str) -> Callable[[Results, str, str], float | None]:
    def value(results: Results, scenario: str, param: str) -> float | None:
        row = results.get(scenario, param, backend)
        return row.median if row else None
    return value


def _ratio(over: str, inverse: bool = False, ours_backend: str = BRANCHD
           ) -> Callable[[Results, str, str], float | None]:
    """A branchd column's median over ``over``'s (or the inverse: a throughput ratio)."""
    def value(results: Results, scenario: str, param: str) -> float | None:
        ours = results.get(scenario, param, ours_backend)
        theirs = results.get(scenario, param, over)
        if not ours or not theirs or not ours.median or not theirs.median:
            return None
        return theirs.median / ours.median if inverse else ours.median / theirs.median
    return value


def _over_idle(results: Results, scenario: str, param: str) -> float | None:
    """A control row's median over the same request's idle one (branchd's column)."""
    row, idle = results.get(scenario, param, BRANCHD), results.get(scenario, "idle", BRANCHD)
    if not row or not idle or not row.median or not idle.median:
        return None
    return row.median / idle.median


def targets(sizes: Sizes) -> list[Target]:
    big = files_label(sizes.bases[-1])
    many = files_label(sizes.commit_files[-1])
    small = files_label(sizes.small_files)
    return [
        Target(f"API create at {big} < 1 ms", "api < 1 ms", "branch create", big,
               _median(BRANCHD), 1e-3),
        Target(f"CLI create at {big} < 100 ms", "cli < 100 ms", "branch create", big,
               _median("branchd-cli"), 0.1),
        Target("commit of 1 file < 2 ms", "< 2 ms", "commit", "1 file", _median(BRANCHD), 2e-3),
        Target(f"commit of {many} < 1 s", "< 1 s", "commit", many, _median(BRANCHD), 1.0),
        Target(f"discard after {many} < 20 ms", "< 20 ms", "discard after changes", many,
               _median(BRANCHD), 0.02),
        Target(f"stat of {small} <= 2x native", "<= 2x native", "inside: stat", small,
               _ratio("native"), 2.0),
        Target("agent workload <= 1.5x native", "<= 1.5x native", "agent workload", "total",
               _ratio("native"), 1.5),
        Target("cold sequential read >= 0.8x native throughput", ">= 0.8x native MB/s",
               "inside: cold seq read", fmt_bytes(sizes.seq_bytes),
               _ratio("native", inverse=True), 0.8, at_least=True),
        Target(f"{sizes.parallel[-1]} parallel branches <= overlayfs in total",
               "<= overlayfs", "parallel branches", f"{sizes.parallel[-1]} branches",
               _ratio("overlay"), 1.0),
        *(Target(f"{probe} {load} <= 2x idle", "<= 2x idle", f"control: {probe}", load,
                 _over_idle, 2.0)
          for probe in ("branchctl list", "API list") for load in control_loads(sizes)),
        *(Target(f"fast path: {scenario} {param} <= {FAST_PATH_LIMIT}x native",
                 f"fast path <= {FAST_PATH_LIMIT}x", scenario, param,
                 _ratio("native", ours_backend=FAST_PATH), FAST_PATH_LIMIT)
          for scenario, param in io_rows(sizes)),
    ]


def io_rows(sizes: Sizes) -> list[tuple[str, str]]:
    """The rows that time I/O inside a branch, where the fast path is to be near native."""
    small, seq = files_label(sizes.small_files), fmt_bytes(sizes.seq_bytes)
    return [("inside: create small files", small), ("inside: stat", small),
            ("inside: stat again", small), ("inside: seq write+fsync", seq),
            ("inside: cold seq read", seq),
            *(("agent workload", step) for step in (*STEPS, "total"))]


def _ordered_keys(results: Results) -> list[tuple[str, str]]:
    """Rows grouped by scenario (first seen first), parameters in the order measured."""
    scenarios: dict[str, list[str]] = {}
    for scenario, param in results.measured():
        scenarios.setdefault(scenario, []).append(param)
    return [(s, p) for s, params in scenarios.items() for p in params]


def table(results: Results, judged: list[dict[str, Any]]) -> str:
    backends = results.backends()
    verdicts: dict[tuple[str, str], list[str]] = {}
    for t in judged:
        word = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        verdicts.setdefault((t["scenario"], t["param"]), []).append(f"{word} {t['short']}")
    header = ["scenario", "size", *backends, "target"]
    lines = []
    for key in _ordered_keys(results):
        native = results.get(*key, "native")
        cells = [key[0], key[1]]
        for backend in backends:
            row = results.get(*key, backend)
            cells.append(_cell(row, native))
        cells.append("; ".join(verdicts.get(key, [])))
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for cells in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(out)


def _cell(row: Row | None, native: Row | None) -> str:
    if row is None:
        return ""
    if row.error:
        return "FAILED"
    text = fmt_seconds(row.median)
    if row.backend != "native" and native and native.median and row.median is not None:
        text += f" ({row.median / native.median:.2f}x)"
    return text


def kv_table(kv: dict[str, Any]) -> str:
    """bench.kv's rows: time to first token and prefill tokens per method of continuing."""
    out = [f"KV fork ({kv.get('device', '?')}): mean TTFT per branch turn, prefill tokens "
           "computed, speedup over re-prefill"]
    for row in kv["rows"]:
        state = "evicted" if row.get("evicted") else "idle"
        out.append(f"  prefix {row['prefix']} tokens, {row['branches']} branches, {state}:")
        for method, m in row["methods"].items():
            speed = f"  x{m['ttft_speedup']:.2f}" if "ttft_speedup" in m else ""
            out.append(f"    {method:<20} {fmt_seconds(m['ttft_mean_s']):>10}"
                       f"  prefill {m['prefill_tokens']:>7}{speed}")
    return "\n".join(out)


def errors(results: Results) -> list[str]:
    return [f"{r.backend} / {r.scenario} {r.param}: {r.error}" for r in results.rows if r.error]


def write_json(path: Path, doc: dict[str, Any], results: Results,
               judged: list[dict[str, Any]]) -> None:
    rows = [r.as_dict(results.get(r.scenario, r.param, "native")) for r in results.rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**doc, "rows": rows, "targets": judged}, indent=1) + "\n")
    tmp.replace(path)
