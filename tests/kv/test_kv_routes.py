"""The KV fork's HTTP routes on a real `vllm serve` (CPU, tiny model, BranchdConnector):
every route, vLLM's own cached-token counts through HTTP, cache salts, pinned prefixes
under other traffic, the partial last block, every refusal, the registry's bound."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (requirements/kv.txt)")

import httpx  # noqa: E402

from branching.kv.handle import PrefixHandle, block_keys, new_handle_id  # noqa: E402
from branching.kv.store import ChunkStore  # noqa: E402

pytestmark = [pytest.mark.kv, pytest.mark.slow, pytest.mark.timeout(900)]

BLOCK = 32


def prefix_of(seed: int, length: int = 256) -> list[int]:
    return [(i * (2 * seed + 5) + seed) % 500 + 7 for i in range(length)]


def greedy(max_tokens: int = 6) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def http(kv_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=kv_server.url + "/v1/branchd", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def api(http: httpx.Client) -> Callable[..., dict[str, Any]]:
    """POST (or GET without a body) that must succeed; returns the JSON answer."""
    def call(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = http.get(path) if body is None else http.post(path, json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())
    return call


def reset_prefix_cache(kv_server: Any) -> None:
    r = httpx.post(kv_server.url + "/reset_prefix_cache", timeout=60)
    assert r.status_code == 200 and r.json()["success"], r.text  # none held: all evicted


def other_traffic(kv_server: Any, chat_model: Path, seed: int) -> None:
    """Plain completions (vLLM's own route) of more blocks than the server's cache holds
    (conftest's NUM_BLOCKS), sharing no prefix with prefix_of's: vLLM reuses every
    block no request or pin holds."""
    rng = random.Random(seed)
    for _ in range(2):
        prompt = [rng.randrange(7, 500) for _ in range(3200)]
        r = httpx.post(kv_server.url + "/v1/completions", timeout=300, json={
            "model": str(chat_model), "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, r.text


def test_pinned_prefix_resumes_from_vllms_cache_under_other_traffic(
        api: Callable[..., dict[str, Any]], kv_server: Any, chat_model: Path) -> None:
    pinned = api("/snapshot", {"prompt_token_ids": prefix_of(30), "pin": True})
    assert pinned["pinned"] and pinned["pin_refused"] is None
    plain = api("/snapshot", {"prompt_token_ids": prefix_of(31)})
    assert not plain["pinned"]
    [kid] = api("/fork", {"handle_id": pinned["handle_id"], "n": 1})["handle_ids"]
    api("/release", {"handle_id": pinned["handle_id"]})  # its fork still holds the prefix
    other_traffic(kv_server, chat_model, 1)
    new = {"prompt_token_ids": [1, 2, 3], "sampling": greedy(2)}
    kept = api("/resume", {"handle_id": kid, **new})
    # vLLM's own count through HTTP: all from its cache, nothing loaded or recomputed
    assert kept["cached_tokens"] == 256 and kept["loaded_tokens"] == 0
    assert kept["computed_tokens"] == 3 and kept["pinned"] and not kept["evicted"]
    gone = api("/resume", {"handle_id": plain["handle_id"], **new})
    assert gone["loaded_tokens"] == 256 and not gone["pinned"]  # evicted: from the store
    for hid in (kid, plain["handle_id"], kept["handle_id"], gone["handle_id"]):
        api("/release", {"handle_id": hid})
    step = api("/snapshot", {"prompt_token_ids": [9]})  # a step of the engine: it unpins
    api("/release", {"handle_id": step["handle_id"]})
    reset_prefix_cache(kv_server)  # which vLLM refuses while any block is pinned


def test_partial_last_block_is_not_recomputed(api: Callable[..., dict[str, Any]]) -> None:
    root = api("/snapshot", {"prompt_token_ids": prefix_of(32, 256 + 20)})
    assert root["handle"]["tail_key"] and root["handle"]["tail_checksum"] is not None
    r = api("/resume", {"handle_id": root["handle_id"], "prompt_token_ids": [1, 2, 3],
                        "sampling": greedy()})
    assert r["cached_tokens"] == 276 and r["loaded_tokens"] == 20 and r["computed_tokens"] == 3
    # the child (285 tokens: no block filled) carries the tail: its next turn too
    assert r["handle"]["tail_key"] == root["handle"]["tail_key"]
    again = api("/resume", {"handle_id": r["handle_id"], "prompt_token_ids": [4],
                            "sampling": greedy()})
    assert again["loaded_tokens"] == 20 and again["computed_tokens"] == 3 + 6 + 1
    for h in (again, r, root):
        api("/release", {"handle_id": h["handle_id"]})


def test_snapshot_fork_resume_release(api: Callable[..., dict[str, Any]],
                                      http: httpx.Client, kv_server: Any) -> None:
    root = api("/snapshot", {"prompt_token_ids": prefix_of(1)})
    rid = root["handle_id"]
    assert root["handle"]["token_ids"] == prefix_of(1) and len(root["handle"]["keys"]) == 8
    assert len(root["handle"]["checksums"]) == 8  # saved whole to the store
    assert api(f"/handles/{rid}")["handle"] == root["handle"]
    forked = api("/fork", {"handle_id": rid, "n": 3})
    assert len(forked["handle_ids"]) == 3
    assert all(h["parent"] == rid for h in forked["handles"])
    children = []
    for i, bid in enumerate(forked["handle_ids"]):
        new = [10 + i, 20 + i, 30 + i]
        r = api("/resume", {"handle_id": bid, "prompt_token_ids": new, "sampling": greedy()})
        # vLLM's own count, through HTTP: the prefix is not computed again
        assert r["cached_tokens"] == 256 and r["computed_tokens"] == 3
        assert r["prompt_tokens"] == 259 and not r["evicted"] and r["fallback"] is None
        assert len(r["token_ids"]) == 6 and r["handle"]["parent"] == bid
        assert r["handle"]["token_ids"] == prefix_of(1) + new + r["token_ids"]
        assert api(f"/handles/{r['handle_id']}")["handle"] == r["handle"]
        children.append(r["handle_id"])
    store = ChunkStore(kv_server.store)
    for hid in children + forked["handle_ids"]:
        assert api("/release", {"handle_id": hid})["bytes_freed"] == 0  # root holds them
    assert store.chunk_path(root["handle"]["keys"][-1]).exists()
    freed = api("/release", {"handle_id": rid})
    assert freed["bytes_freed"] > 0 and not store.chunk_path(root["handle"]["keys"][0]).exists()
    assert http.get(f"/handles/{rid}").status_code == 404


def test_evicted_prefix_is_loaded_from_the_store(api: Callable[..., dict[str, Any]],
                                                 kv_server: Any) -> None:
    root = api("/snapshot", {"prompt_token_ids": prefix_of(2)})
    body = {"handle_id": root["handle_id"], "prompt_token_ids": [5, 6, 7], "sampling": greedy()}
    hit = api("/resume", body)
    assert hit["cached_tokens"] == 256 and hit["loaded_tokens"] == 0
    reset_prefix_cache(kv_server)  # vLLM evicts everything
    back = api("/resume", body)
    assert back["loaded_tokens"] == 256 and back["cached_tokens"] == 256
    assert back["token_ids"] == hit["token_ids"]
    # a handle kept elsewhere (as after a server restart) is posted back and served
    kept = {**root["handle"], "handle_id": new_handle_id()}
    imported = api("/handles", {"handle": kept})
    assert imported["handle"] == kept and api(f"/handles/{kept['handle_id']}") == imported
    again = api("/resume", {**body, "handle_id": kept["handle_id"]})
    assert again["cached_tokens"] == 256 and again["token_ids"] == hit["token_ids"]
    for h in (root, imported, hit, back, again):
        api("/release", {"handle_id": h["handle_id"]})


def test_messages_are_rendered_with_the_chat_template(
        api: Callable[..., dict[str, Any]], http: httpx.Client, chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    first = [{"role": "system", "content": " ".join(["fix the bug in this file"] * 12)},
             {"role": "user", "content": "the tests fail"}]
    then = [{"role": "user", "content": "run the tests please"}]

    def render(messages: list[dict[str, str]], gen: bool) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        return list(tok.encode(text, add_special_tokens=False))

    root = api("/snapshot", {"messages": first})
    assert root["handle"]["token_ids"] == render(first, False)
    assert root["messages"] == first
    r = api("/resume", {"handle_id": root["handle_id"], "messages": then,
                        "sampling": greedy()})
    full = render(first + then, True)
    assert r["prompt_tokens"] == len(full)
    # the whole prefix: its full blocks from vLLM's cache, its partial last one loaded
    prefix = len(render(first, False))
    assert r["cached_tokens"] == prefix and r["loaded_tokens"] == prefix % BLOCK > 0
    # vLLM's incremental detokenizer keeps the space before the first word
    assert r["text"].strip() == tok.decode(r["token_ids"], skip_special_tokens=True).strip()
    assert r["messages"] == first + then + [{"role": "assistant", "content": r["text"]}]
    ids = api("/snapshot", {"prompt_token_ids": prefix_of(3, 40)})
    refused = http.post("/resume", json={"handle_id": ids["handle_id"], "messages": then})
    assert refused.status_code == 422 and "token ids" in refused.json()["error"]["message"]
    for h in (r, root, ids):
        api("/release", {"handle_id": h["handle_id"]})


def salted(handle: dict[str, Any], salt: str | None) -> dict[str, Any]:
    """The same prefix under another salt (as another tenant would snapshot it)."""
    tokens = handle["token_ids"]
    return {**handle, "handle_id": new_handle_id(), "cache_salt": salt, "checksums": [],
            "keys": block_keys(tokens, BLOCK, salt)}


def test_cache_salts_never_share_blocks(api: Callable[..., dict[str, Any]],
                                        kv_server: Any) -> None:
    prefix = prefix_of(4)
    root = api("/snapshot", {"prompt_token_ids": prefix, "cache_salt": "tenant-a"})
    assert root["handle"]["cache_salt"] == "tenant-a"
    [child] = api("/fork", {"handle_id": root["handle_id"], "n": 1})["handles"]
    assert child["cache_salt"] == "tenant-a"  # inherited
    new = {"prompt_token_ids": [1, 2, 3], "sampling": greedy(2)}
    same = api("/resume", {"handle_id": child["handle_id"], **new})
    assert same["cached_tokens"] == 256 and same["handle"]["cache_salt"] == "tenant-a"
    for salt in ("tenant-b", None):  # same tokens, another salt or none: nothing shared
        other = api("/resume", {"handle": salted(root["handle"], salt), **new})
        assert other["cached_tokens"] == 0 and other["loaded_tokens"] == 0, salt
        assert other["fallback"] is None
    store = ChunkStore(kv_server.store)
    assert all(store.chunk_path(k).exists() for k in root["handle"]["keys"])
    assert not any(store.chunk_path(k).exists() for k in block_keys(prefix, BLOCK, "tenant-b"))
    reset_prefix_cache(kv_server)  # from the store now: still by salt
    back = api("/resume", {"handle_id": child["handle_id"], **new})
    assert back["loaded_tokens"] == 256 and back["cached_tokens"] == 256
    other = api("/resume", {"handle": salted(root["handle"], "tenant-c"), **new})
    assert other["cached_tokens"] == 0 and other["loaded_tokens"] == 0


@pytest.fixture(scope="module")
def root(api: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return api("/snapshot", {"prompt_token_ids": prefix_of(5, 64)})


def alien(handle: dict[str, Any], **change: Any) -> dict[str, Any]:
    """The handle as another kind of engine made it (keys consistent with its fields)."""
    h = PrefixHandle.from_json(handle)
    fp = dataclasses.replace(h.fingerprint, **change)
    keys = tuple(block_keys(h.token_ids, fp.block_size, h.cache_salt))
    return dataclasses.replace(h, handle_id=new_handle_id(), fingerprint=fp, keys=keys,
                               checksums=()).to_json()


def tampered(handle: dict[str, Any]) -> dict[str, Any]:
    return {**handle, "token_ids": [7] + handle["token_ids"][1:]}


BIG = "x" * (1 << 20)
# (route, body as JSON or raw bytes, status, code); `root` is replaced by a real handle id
BAD: list[tuple[str, Any, int, str]] = [
    ("/resume", {"handle_id": "nope"}, 404, "unknown_handle"),
    ("/fork", {"handle_id": "nope", "n": 2}, 404, "unknown_handle"),
    ("/release", {"handle_id": "nope"}, 404, "unknown_handle"),
    ("/handles", lambda h: {"handle": alien(h, block_size=16)}, 409, "fingerprint_mismatch"),
    ("/handles", lambda h: {"handle": alien(h, model="other")}, 409, "fingerprint_mismatch"),
    ("/resume", lambda h: {"handle": alien(h, dtype="bfloat16")}, 409, "fingerprint_mismatch"),
    ("/snapshot", {"prompt_token_ids": [5] * 5000}, 413, "too_large"),
    ("/snapshot", {"prompt_token_ids": [5], "pad": BIG}, 413, "too_large"),
    ("/fork", lambda h: {"handle_id": h["handle_id"], "n": 65}, 413, "too_large"),
    ("/resume", lambda h: {"handle_id": h["handle_id"], "prompt_token_ids": [5] * 4000,
                           "sampling": {"max_tokens": 64}}, 413, "too_large"),
    ("/resume", lambda h: {"handle_id": h["handle_id"], "sampling": {"max_tokens": 5000}},
     413, "too_large"),
    ("/snapshot", b"{not json", 400, "bad_json"),
    ("/snapshot", b"[1, 2]", 400, "bad_json"),
    ("/snapshot", {}, 422, "invalid_request"),
    ("/snapshot", {"prompt_token_ids": []}, 422, "invalid_request"),
    ("/snapshot", {"prompt_token_ids": [1], "messages": []}, 422, "invalid_request"),
    ("/snapshot", {"prompt_token_ids": [1, 999]}, 422, "invalid_request"),
    ("/snapshot", {"prompt_token_ids": [1], "cache_salt": "a/b"}, 422, "invalid_request"),
    ("/snapshot", {"prompt_token_ids": [1], "colour": 3}, 422, "invalid_request"),
    ("/fork", lambda h: {"handle_id": h["handle_id"], "n": 0}, 422, "invalid_request"),
    ("/resume", lambda h: {"handle_id": h["handle_id"], "sampling": {"top_p": 2}},
     422, "invalid_request"),
    ("/resume", lambda h: {"handle": tampered(h)}, 422, "invalid_request"),
    ("/resume", lambda h: {"handle_id": h["handle_id"], "handle": h}, 422, "invalid_request"),
]


@pytest.mark.parametrize(("route", "body", "status", "code"), BAD,
                         ids=[f"{r}-{s}-{i}" for i, (r, _, s, _) in enumerate(BAD)])
def test_bad_input_is_refused_with_its_code(http: httpx.Client, root: dict[str, Any],
                                            route: str, body: Any, status: int,
                                            code: str) -> None:
    if callable(body):
        body = body(root["handle"])
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert http.get(f"/handles/{root['handle_id']}").status_code == 200  # nothing lost


def test_unknown_handle_get_is_404(http: httpx.Client) -> None:
    r = http.get("/handles/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_handle"


def test_plugin_is_found_by_name_and_refuses_what_its_server_lacks(
        chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own loader and wiring (`VLLM_PLUGINS=branchd_kv`) on an app of our own:
    without an engine or without BranchdConnector every route answers 503, without a
    tokenizer messages are refused. The engine client is a stand-in holding a real
    VllmConfig of the tiny model (what the routes read before any request): a second
    and third `vllm serve` would cost minutes on a 2-core CI machine."""
    import asyncio
    from argparse import Namespace
    from types import SimpleNamespace

    import vllm.envs
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins.endpoint_plugins.interface import (
        attach_endpoint_plugins,
        init_endpoint_plugins_state,
    )

    from branching.kv.requests import kv_transfer_config
    from branching.kv.routes import BranchdEndpoints

    monkeypatch.setenv("VLLM_PLUGINS", "branchd_kv")
    # an in-process engine started earlier in the session (test_kv_fork's) froze vLLM's
    # environment variables (enable_envs_cache): VLLM_PLUGINS would read as unset
    vllm.envs.disable_envs_cache()

    def app_with(engine_client: Any) -> FastAPI:
        app = FastAPI()
        attach_endpoint_plugins(app, ("generate",))
        assert [type(p) for p in app.state.endpoint_plugins] == [BranchdEndpoints]
        asyncio.run(init_endpoint_plugins_state(engine_client, app.state, Namespace()))
        return app

    def config(**kw: Any) -> Any:
        return EngineArgs(model=str(chat_model), dtype="float32", max_model_len=4096,
                          block_size=32, **kw).create_engine_config()

    body = {"messages": [{"role": "user", "content": "hello"}]}
    plain = SimpleNamespace(vllm_config=config(), renderer=SimpleNamespace(tokenizer=None))
    for engine_client, words in ((None, "no engine"), (plain, "BranchdConnector")):
        with TestClient(app_with(engine_client)) as client:
            for route, data in (("/snapshot", body), ("/fork", {"handle_id": "x", "n": 1})):
                r = client.post("/v1/branchd" + route, json=data)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "kv_fork_unavailable"
                assert words in r.json()["error"]["message"]
            assert client.get("/v1/branchd/handles/x").status_code == 503
    kv = KVTransferConfig(**kv_transfer_config(tmp_path / "store"))
    bare = SimpleNamespace(vllm_config=config(kv_transfer_config=kv),
                           renderer=SimpleNamespace(tokenizer=None))
    with TestClient(app_with(bare)) as client:
        r = client.post("/v1/branchd/snapshot", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"


def test_the_registry_holds_at_most_max_handles(
        chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`$BRANCHD_KV_MAX_HANDLES` handles at most; a request that would register more is
    refused (409 `too_many_handles`) before any work, until some are released. On an
    app of our own with a stand-in engine client (no request reaches an engine)."""
    import asyncio
    from argparse import Namespace
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from branching.kv.handle import fingerprint_of
    from branching.kv.requests import kv_transfer_config
    from branching.kv.routes import BranchdEndpoints

    monkeypatch.setenv("BRANCHD_KV_MAX_HANDLES", "3")
    kv = KVTransferConfig(**kv_transfer_config(tmp_path / "store"))
    config = EngineArgs(model=str(chat_model), dtype="float32", max_model_len=4096,
                        block_size=BLOCK, kv_transfer_config=kv).create_engine_config()
    engine = SimpleNamespace(vllm_config=config, renderer=SimpleNamespace(tokenizer=None))
    app = FastAPI()
    plugin = BranchdEndpoints()
    plugin.attach_router(app)
    asyncio.run(plugin.init_state(engine, app.state, Namespace()))
    tokens = tuple(prefix_of(6, 64))

    def handle() -> dict[str, Any]:
        return PrefixHandle(new_handle_id(), fingerprint_of(config), tokens,
                            tuple(block_keys(tokens, BLOCK))).to_json()

    with TestClient(app, base_url="http://test/v1/branchd") as client:
        ids = [client.post("/handles", json={"handle": handle()}).json()["handle_id"]
               for _ in range(3)]
        for route, body in (("/handles", {"handle": handle()}),
                            ("/fork", {"handle_id": ids[0], "n": 1}),
                            ("/resume", {"handle": handle()})):
            r = client.post(route, json=body)
            assert r.status_code == 409, r.text
            error = r.json()["error"]
            assert error["code"] == "too_many_handles" and "limit of 3" in error["message"]
        assert client.post("/release", json={"handle_id": ids[1]}).status_code == 200
        r = client.post("/fork", json={"handle_id": ids[0], "n": 2})  # 2 + 2 > 3: all or none
        assert r.status_code == 409
        r = client.post("/fork", json={"handle_id": ids[0], "n": 1})
        assert r.status_code == 200, r.text
        for hid in (ids[0], ids[2], r.json()["handle_ids"][0]):
            assert client.post("/release", json={"handle_id": hid}).status_code == 200
