"""Session-scoped vLLM engines (CPU) on a tiny random-weight Llama, shared by the kv tests.

Engines take ~15 s to start, so one engine with the connector serves every test in
the session, and one producer engine runs in a child process (started first, so
that both start at once), writes a handle and waits to be killed. The HTTP routes'
tests share one `vllm serve` subprocess (`kv_server`, ~100 s to start on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# vLLM's engine core in this process (not a spawned child): faster to start, and
# the tests' pids are the only processes to clean up.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

try:
    with warnings.catch_warnings():
        # vLLM's import emits torch deprecation warnings; pyproject makes warnings errors.
        warnings.simplefilter("ignore")
        import vllm  # noqa: F401

        import branching.kv.fork  # noqa: F401  (vLLM's engine and connector modules)
except ModuleNotFoundError as e:
    if e.name != "vllm":
        raise
    # the engine tests skip themselves (importorskip), saying why

HERE = Path(__file__).parent
# A small KV cache (192 blocks of 32 tokens; vLLM's CPU default would hold ~32k of the
# tiny model's): the pinning tests fill it with other traffic in a few requests.
# pin_share 0.25: at most 48 blocks pinned.
NUM_BLOCKS = 192
ENGINE_ARGS: dict[str, Any] = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
                               "num_gpu_blocks_override": NUM_BLOCKS}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == HERE:
            # vLLM warns (deprecations) while it builds and runs an engine: not ours.
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::UserWarning"))


@pytest.fixture(scope="session", autouse=True)
def vllm_ipc_dir() -> Iterator[Path]:
    """vLLM's engines and servers make their ZMQ IPC sockets in VLLM_RPC_BASE_PATH
    (default: /tmp) and leave them there: here, in a directory of the session's own,
    removed at its end."""
    path = Path(tempfile.mkdtemp(prefix="branchd-kv-ipc-"))
    old = os.environ.get("VLLM_RPC_BASE_PATH")
    os.environ["VLLM_RPC_BASE_PATH"] = str(path)
    yield path
    if old is None:
        os.environ.pop("VLLM_RPC_BASE_PATH", None)
    else:
        os.environ["VLLM_RPC_BASE_PATH"] = old
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from branching.kv.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def store_dir() -> Iterator[Path]:
    path = Path("/dev/shm") / f"branchd-kv-test-{os.getpid()}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def producer(tiny_model: Path, store_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[subprocess.Popen[bytes]]:
    """A second engine process that snapshots a prefix into the store (see producer.py)."""
    out = tmp_path_factory.mktemp("producer") / "handle.json"
    with open(out.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "producer.py"), str(tiny_model), str(store_dir),
             str(out)],
            stdout=subprocess.DEVNULL, stderr=log,
        )
    proc.result_path = out  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def producer_result(proc: subprocess.Popen[bytes], timeout: float = 180) -> dict[str, Any]:
    path: Path = proc.result_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            log = path.with_suffix(".log").read_text()[-3000:]
            raise AssertionError(f"producer exited {proc.returncode}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError("producer wrote no handle in time")
        time.sleep(0.2)
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def engine(tiny_model: Path, store_dir: Path, producer: subprocess.Popen[bytes]) -> Any:
    from branching.kv.fork import make_engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_engine(tiny_model, store=str(store_dir), **ENGINE_ARGS)


@pytest.fixture
def kill_producer(producer: subprocess.Popen[bytes]) -> Any:
    def kill() -> dict[str, Any]:
        result = producer_result(producer)
        producer.send_signal(signal.SIGKILL)
        producer.wait()
        return result
    return kill


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its word-level tokenizer and chat template."""
    from branching.kv.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-chat"), tokenizer=True)


SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
               "--num-gpu-blocks-override", str(NUM_BLOCKS)]


@pytest.fixture(scope="session")
def verifiers_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kv_server's $BRANCHD_VERIFIERS: one verifier to start with (of an empty
    directory, a daemon that is not there); tests write theirs (read again on change)."""
    root = tmp_path_factory.mktemp("verifiers")
    (root / "empty").mkdir()
    path = root / "verifiers.toml"
    path.write_text(f'[verifiers.none]\nworkspace = "{root / "empty"}"\n'
                    f'socket = "{root / "no.sock"}"\nfile = "f"\ntest = ["false"]\n')
    return path


@pytest.fixture(scope="session")
def kv_server(chat_model: Path, store_dir: Path, tmp_path_factory: pytest.TempPathFactory,
              verifiers_file: Path) -> Iterator[Any]:
    """`vllm serve` on the tiny model with BranchdConnector (its own store under the
    session's /dev/shm directory) and the branchd_kv routes; stopped by its pid (its
    process group) and its store removed in teardown. VLLM_SERVER_DEV_MODE exposes
    vLLM's /reset_prefix_cache, with which tests evict the prefix cache for real."""
    from branching.kv.serve import served

    store = store_dir / "serve"
    log = tmp_path_factory.mktemp("kv-server") / "serve.log"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "BRANCHD_VERIFIERS": str(verifiers_file)}
    try:
        with served(chat_model, store=store, log=log, extra=SERVER_ARGS, env=env) as server:
            yield server
    finally:
        shutil.rmtree(store, ignore_errors=True)
