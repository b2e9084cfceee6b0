"""KV-fork benchmark: what a branch's next request costs, four ways.

    python -m bench.kv [--quick] [--device cpu|cuda] [--model DIR] [--json PATH]

A shared prefix (2k, 4k tokens) is forked into 1, 4, 16 branches; each branch runs
3 turns (32 new tokens of "test output", then the next token asked for). For each
turn we take the wall time of the request (time to first token: max_tokens=1) and
vLLM's own count of prompt tokens it computed (`vllm:prompt_tokens_by_source`):

- re-prefill: the whole conversation computed every turn (prefix cache not read);
- prefix cache: plain requests, vLLM's prefix cache alone, store not consulted;
- fork (same engine): `snapshot` + `fork` + `resume`;
- fork (cross engine): the prefix snapshotted by engine A, every branch resumed in
  engine B (another process) through the connector and the shared-memory store.

Each is run idle and "evicted" (vLLM's prefix cache emptied before every turn, as
other traffic on a busy engine would): there the prefix cache alone pays the prefill
again, the forks load the prefix from the store.

Then the same through HTTP, on a `vllm serve` with the connector and the branchd_kv
routes (`serve.py`): re-prefill-http (vLLM's own /v1/completions, the conversation
computed whole every turn) against fork-http (/v1/branchd/resume of a forked handle),
idle and evicted. And the partial last block: a prefix of whole blocks plus
block_size - 1 tokens resumed without its tail (recomputed, as before the connector
carried it) and with it (loaded from the store).

On the CPU with a tiny random model
the times show overheads, not a GPU's prefill cost: run `--device cuda --model DIR`
on a GPU machine for those (the code path is the same).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TURNS = 3
NEW_TOKENS = 32
METHODS = ("re-prefill", "prefix-cache", "fork-same-engine", "fork-cross-engine")
HTTP_METHODS = ("re-prefill-http", "fork-http")
TAIL_METHODS = ("tail-recomputed", "tail-loaded")


def _prefix(length: int, seed: int) -> list[int]:
    return [(i * (2 * seed + 7) + seed) % 500 + 3 for i in range(length)]


def _turn_tokens(branch: int, turn: int) -> list[int]:
    return [(branch * 31 + turn * 17 + i) % 500 + 3 for i in range(NEW_TOKENS)]


@contextmanager
def _engines(model: Path, store: Path, device: str) -> Iterator[tuple[Any, Any]]:
    """Two engine processes sharing the store: A produces, B consumes."""
    from vllm import SamplingParams

    from branching.kv.fork import make_engine, plain_request

    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # each engine its own process
    extra: dict[str, Any] = {"max_model_len": 8192}
    if device == "cpu":
        extra.update(dtype="float32", enforce_eager=True)
    else:
        extra.update(gpu_memory_utilization=0.35)
    engines = [make_engine(model, store=str(store), **extra) for _ in range(2)]
    try:
        warm = SamplingParams(max_tokens=1, detokenize=False)
        for engine in engines:  # first requests pay one-time setup: not measured
            for length in (64, 2048):
                plain_request(engine, _prefix(length, 999), warm)
        yield engines[0], engines[1]
    finally:
        engines.clear()
        gc.collect()  # vLLM stops an engine's core process when its LLM is collected


def _scenario(a: Any, b: Any, prefix_len: int, branches: int, evict: bool, seed: int
              ) -> dict[str, Any]:
    from vllm import SamplingParams

    from branching.kv.fork import (
        ResumeResult,
        fork,
        plain_request,
        prefill,
        release,
        resume,
        snapshot,
    )

    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, detokenize=False)
    out: dict[str, Any] = {}

    Body = Callable[[Callable[[Any], Any], dict[str, int]], None]

    def measure(method: str, engine: Any, body: Body) -> None:
        times: list[float] = []
        counts = {"prefill_tokens": 0, "loaded_tokens": 0}

        def timed(request: Any) -> Any:
            if evict:
                engine.reset_prefix_cache()
            t0 = time.perf_counter()
            result = request()
            times.append(time.perf_counter() - t0)
            # vLLM's own per-request count (RequestOutput.num_cached_tokens): the
            # engines' Prometheus counters are shared by both engines of this process.
            if isinstance(result, ResumeResult):
                counts["prefill_tokens"] += result.computed_tokens
                counts["loaded_tokens"] += result.loaded_tokens
            else:
                counts["prefill_tokens"] += (len(result.prompt_token_ids)
                                             - (result.num_cached_tokens or 0))
            return result

        body(timed, counts)
        out[method] = {
            "ttft_mean_s": statistics.fmean(times),
            "ttft_p50_s": statistics.median(times),
            "requests": len(times),
            **counts,
        }

    def reprefill(timed: Callable[[Any], Any], counts: dict[str, int]) -> None:
        for br in range(branches):
            conv = _prefix(prefix_len, seed)
            for turn in range(TURNS):
                conv += _turn_tokens(br, turn)
                prompt = list(conv)
                r = timed(lambda p=prompt: prefill(a, p, sp))
                conv += r.token_ids

    def prefix_cache(timed: Callable[[Any], Any], counts: dict[str, int]) -> None:
        a.reset_prefix_cache()
        plain_request(a, _prefix(prefix_len, seed + 1), sp)
        counts["prefill_tokens"] += prefix_len  # the shared prefix, computed once
        for br in range(branches):
            conv = _prefix(prefix_len, seed + 1)
            for turn in range(TURNS):
                conv += _turn_tokens(br, turn)
                prompt = list(conv)
                r = timed(lambda p=prompt: plain_request(a, p, sp))
                conv += list(r.outputs[0].token_ids)

    def forked(engine: Any, producer: Any, seed_: int) -> Body:
        def body(timed: Callable[[Any], Any], counts: dict[str, int]) -> None:
            root = snapshot(producer, _prefix(prefix_len, seed_))
            counts["prefill_tokens"] += prefix_len  # the snapshot's one prefill
            handles = fork(root, branches)
            for br, handle in enumerate(handles):
                h = handle
                for turn in range(TURNS):
                    new = _turn_tokens(br, turn)
                    r = timed(lambda h=h, new=new: resume(engine, h, new, sp, save=evict))
                    if r.fallback:
                        log.warning("fallback: %s", r.fallback)
                    if h is not handle:
                        release(h)
                    h = r.handle
                release(h)
                release(handle)
            release(root)
        return body

    measure("re-prefill", a, reprefill)
    measure("prefix-cache", a, prefix_cache)
    measure("fork-same-engine", a, forked(a, a, seed + 2))
    measure("fork-cross-engine", b, forked(b, a, seed + 3))
    return _ratios(out)


def _ratios(out: dict[str, Any]) -> dict[str, Any]:
    """Each method's speedup over the first (the baseline), in TTFT and prefill tokens."""
    base, *others = out.values()
    for row in others:
        row["ttft_speedup"] = base["ttft_mean_s"] / row["ttft_mean_s"]
        row["prefill_tokens_ratio"] = base["prefill_tokens"] / max(row["prefill_tokens"], 1)
    return out


def _summary(times: list[float], prefill: int, loaded: int) -> dict[str, Any]:
    return {"ttft_mean_s": statistics.fmean(times), "ttft_p50_s": statistics.median(times),
            "requests": len(times), "prefill_tokens": prefill, "loaded_tokens": loaded}


def _tail_row(engine: Any, prefix_len: int, seed: int) -> dict[str, Any]:
    """A prefix ending block_size - 1 tokens into a block, resumed (3 new tokens) by
    branches that recompute that partial block (their handle without its tail) and by
    branches that load it (the handle as snapshot makes it); 8 resumes each."""
    import dataclasses

    from vllm import SamplingParams

    from branching.kv.fork import fork, release, resume, snapshot

    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, detokenize=False)
    root = snapshot(engine, _prefix(prefix_len, seed))
    bare = dataclasses.replace(root, tail_key=None, tail_checksum=None, tail_tokens=None)
    out: dict[str, Any] = {}
    for m, (method, handle) in enumerate(zip(TAIL_METHODS, (bare, root), strict=True)):
        times, prefill, loaded = [], 0, 0
        for i, branch in enumerate(fork(handle, 8)):
            # new tokens of their own: a recomputed tail + the first new token fill a
            # block that vLLM caches, which a branch starting the same way would hit
            t0 = time.perf_counter()
            r = resume(engine, branch, [100 + 10 * m + i, 8, 9], sp)
            times.append(time.perf_counter() - t0)
            prefill += r.computed_tokens
            loaded += r.loaded_tokens
            release(branch)
        out[method] = _summary(times, prefill, loaded)
    release(root)
    return {"prefix": prefix_len, "branches": 8, "turns": 1, "evicted": False,
            "methods": _ratios(out)}


def _http_scenario(post: Callable[..., Any], complete: Callable[[list[int]], Any],
                   prefix_len: int, n: int, evict: bool, seed: int) -> dict[str, Any]:
    sampling = {"max_tokens": 1, "temperature": 0, "ignore_eos": True}
    times: list[float] = []
    prefill = 0
    for br in range(n):
        conv = _prefix(prefix_len, seed)
        for turn in range(TURNS):
            conv += _turn_tokens(br, turn)
            post("/reset_prefix_cache")  # re-prefill: computed whole
            t0 = time.perf_counter()
            complete(conv)
            times.append(time.perf_counter() - t0)
            prefill += len(conv)
            conv = conv + [5]  # its answer (the content costs nothing)
    out = {"re-prefill-http": _summary(times, prefill, 0)}
    times, loaded = [], 0
    root = post("/v1/branchd/snapshot", {"prompt_token_ids": _prefix(prefix_len, seed + 1)})
    prefill = prefix_len  # the snapshot's one prefill
    for kid in post("/v1/branchd/fork", {"handle_id": root["handle_id"], "n": n})["handle_ids"]:
        held = [kid]
        for turn in range(TURNS):
            if evict:
                post("/reset_prefix_cache")
            t0 = time.perf_counter()
            r = post("/v1/branchd/resume", {
                "handle_id": held[-1], "prompt_token_ids": _turn_tokens(0, turn),
                "sampling": sampling, "save": evict})
            times.append(time.perf_counter() - t0)
            prefill += r["computed_tokens"]
            loaded += r["loaded_tokens"]
            held.append(r["handle_id"])
        for hid in held:
            post("/v1/branchd/release", {"handle_id": hid})
    post("/v1/branchd/release", {"handle_id": root["handle_id"]})
    out["fork-http"] = _summary(times, prefill, loaded)
    return _ratios(out)


def _http_rows(model: Path, store: Path, work: Path, device: str, prefix_len: int,
               fanouts: tuple[int, ...]) -> list[dict[str, Any]]:
    """The HTTP rows: one `vllm serve` (the tests' command line), fork-http against
    re-prefill-http for each fan-out, idle and evicted (/reset_prefix_cache, vLLM's
    dev-mode route, before each turn: the fork then loads its prefix from the store)."""
    import httpx

    from branching.kv.serve import served

    extra = ["--max-model-len", "8192", "--skip-tokenizer-init"]
    extra += (["--dtype", "float32", "--enforce-eager"] if device == "cpu"
              else ["--gpu-memory-utilization", "0.35"])
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    sampling = {"max_tokens": 1, "temperature": 0, "ignore_eos": True}
    rows = []
    with served(model, store=store / "http", log=work / "serve.log", extra=extra,
                env=env) as server, httpx.Client(base_url=server.url, timeout=600) as http:

        def post(path: str, body: dict[str, Any] | None = None) -> Any:
            r = http.post(path, json=body) if body is not None else http.post(path)
            r.raise_for_status()
            return r.json()

        def complete(prompt: list[int]) -> Any:
            return post("/v1/completions", {"model": str(model), "prompt": prompt, **sampling})

        for length in (64, prefix_len, prefix_len + 100):  # one-time setup: not measured
            complete(_prefix(length, 999))
        _http_scenario(post, complete, prefix_len, 1, True, 998)  # the routes' too
        seed = 500
        for n in fanouts:
            for evict in (False, True):
                seed += 2
                rows.append({"prefix": prefix_len, "branches": n, "turns": TURNS,
                             "evicted": evict, "transport": "http",
                             "methods": _http_scenario(post, complete, prefix_len, n, evict,
                                                       seed)})
                _print_row(rows[-1])
    return rows


def run(quick: bool, device: str = "cpu", model: Path | None = None) -> dict[str, Any]:
    """Every scenario; returns {"rows": [...], "notes": [...]} for bench's report."""
    from branching.kv.store import ChunkStore
    from branching.kv.tiny import build_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="branchd-kv-bench-"))
    store = Path("/dev/shm") / f"branchd-kv-bench-{os.getpid()}"
    prefixes = (2048,) if quick else (2048, 4096)
    fanouts = (1, 4) if quick else (1, 4, 16)
    notes = [
        "TTFT = wall time of a max_tokens=1 request; prefill_tokens from vLLM's "
        "vllm:prompt_tokens_by_source{source=local_compute}",
        "prefill tokens include the shared prefix's one prefill in the prefix-cache and "
        "fork rows (for cross-engine: computed by engine A, resumed in engine B)",
        "tail rows: a prefix of block_size - 1 tokens past whole blocks, 8 branches, "
        "3 new tokens each; tail-recomputed is the handle without its partial block",
        "http rows (transport http): TTFT is the HTTP request's wall time on vllm serve "
        "(re-prefill-http: /v1/completions after /reset_prefix_cache; fork-http: "
        "/v1/branchd/resume)",
    ]
    if device == "cpu":
        notes.append("CPU, tiny random 2-layer model: times are overheads, not a GPU's "
                     "prefill cost; rerun with --device cuda --model DIR on a GPU")
    rows: list[dict[str, Any]] = []
    try:
        model = model or build_tiny_llama(work / "tiny")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _engines(model, store, device) as (a, b):
                seed = 0
                for prefix_len in prefixes:
                    # one unrecorded pass: the CPU backend's first requests at new
                    # lengths pay one-time kernel setup that is no part of any method
                    _scenario(a, b, prefix_len, 1, True, 1000 + prefix_len)
                    for n in fanouts:
                        for evict in (False, True):
                            seed += 4
                            t0 = time.perf_counter()
                            res = _scenario(a, b, prefix_len, n, evict, seed)
                            rows.append({"prefix": prefix_len, "branches": n, "turns": TURNS,
                                         "evicted": evict, "methods": res,
                                         "seconds": time.perf_counter() - t0})
                            _print_row(rows[-1])
                    rows.append(_tail_row(a, prefix_len - 1, 2000 + prefix_len))
                    _print_row(rows[-1])
            rows += _http_rows(model, store, work, device, prefixes[0], fanouts)
        usage = ChunkStore(store).usage()
        notes.append(f"store after all handles released: {usage.chunks} chunks, "
                     f"{usage.bytes} bytes")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    return {"device": device, "rows": rows, "notes": notes}


def _print_row(row: dict[str, Any]) -> None:
    state = "evicted" if row["evicted"] else "idle"
    print(f"prefix {row['prefix']:5d}  branches {row['branches']:2d}  {state}", file=sys.stderr)
    for method, m in row["methods"].items():
        ratio = ""
        if "ttft_speedup" in m:
            ratio = (f"  ttft x{m['ttft_speedup']:.2f}"
                     f"  prefill tokens /{m['prefill_tokens_ratio']:.1f}")
        print(f"  {method:<18s} ttft {m['ttft_mean_s'] * 1e3:7.1f} ms"
              f"  prefill {m['prefill_tokens']:7d}  loaded {m['loaded_tokens']:7d}{ratio}",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2k prefix, 1 and 4 branches")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", type=Path, default=None,
                   help="a model directory (default: a tiny random Llama built on the fly)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = run(ns.quick, ns.device, ns.model)
    text = json.dumps(results, indent=2)
    if ns.json:
        ns.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
