"""HTTP routes of the KV fork on a plain `vllm serve`: the `vllm.endpoint_plugins` entry
point `branchd_kv` (enabled, with the general plugin of the same name, by
`VLLM_PLUGINS=branchd_kv`).

    POST /v1/branchd/snapshot      messages or prompt_token_ids (+ cache_salt, pin) -> handle
    POST /v1/branchd/fork          handle_id, n -> n child handles
    POST /v1/branchd/resume        handle_id (or handle), new messages or tokens, sampling
    POST /v1/branchd/release       handle_id -> store bytes freed
    POST /v1/branchd/handles       handle (JSON) -> registered here (after a restart, say)
    GET  /v1/branchd/handles/{id}  the handle
    POST /v1/branchd/verified_completions   n candidates tested in branches (verified_routes.py)

The engine runs in another process: requests go through the server's `EngineClient`
(`run_request`), with the prompts and `kv_transfer_params` that `requests.py` builds
for the in-process API too. Handles live in an in-memory registry of this server
process, at most `max_handles` (`$BRANCHD_KV_MAX_HANDLES`, default `MAX_HANDLES`);
their blocks' references live in the store (files), refcounted as in `fork.py`.
Every bad input is a `BranchdError`, answered in one place as
`{"error": {"code", "message"}}` with the status of its `ErrorCode`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import uuid
from argparse import Namespace
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.datastructures import State
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError, VLLMServerError
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind

from branching.kv.handle import Fingerprint, PrefixHandle, fingerprint_of, new_handle_id
from branching.kv.requests import (
    ResumeResult,
    finish_snapshot,
    resume_request,
    resume_result,
    start_snapshot,
    store_of,
)
from branching.kv.store import ChunkStore

log = logging.getLogger(__name__)

# ---- limits (documented in branching/kv/README.md) ------------------------------------

MAX_BODY_BYTES = 1 << 20  # a 4k-token handle is ~30 KB of JSON
MAX_FORK = 64  # handles per fork call
MAX_OUTPUT_TOKENS = 4096  # max_tokens of one resume
MAX_HANDLES = 4096  # registered at once ($BRANCHD_KV_MAX_HANDLES); then 409 too_many_handles
# and prompt + max_tokens <= the engine's --max-model-len


# ---- errors --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int


BAD_JSON = ErrorCode("bad_json", 400)  # the body is not a JSON object
INVALID = ErrorCode("invalid_request", 422)  # fields missing, wrong or inconsistent
NO_TOKENIZER = ErrorCode("no_tokenizer", 400)  # messages to a server without a chat template
UNKNOWN_HANDLE = ErrorCode("unknown_handle", 404)
FINGERPRINT = ErrorCode("fingerprint_mismatch", 409)  # a handle from another model/engine kind
TOO_LARGE = ErrorCode("too_large", 413)  # body, tokens, n or max_tokens over the limits
TOO_MANY = ErrorCode("too_many_handles", 409)  # the registry is full: release handles first
UNAVAILABLE = ErrorCode("kv_fork_unavailable", 503)  # no connector, no engine, engine dead


class BranchdError(Exception):
    """A request the routes refuse; answered as JSON with its code's HTTP status."""

    def __init__(self, error: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.error = error

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.error.code, "message": str(self)}},
                            status_code=self.error.status)


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BranchdError)
    return exc.response()


# ---- bodies --------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Body):
    role: str
    content: str


class Sampling(_Body):
    """The sampling parameters a resume accepts (vLLM's, with its defaults)."""

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # 0: all tokens
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = []

    def to_vllm(self, detokenize: bool) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, ignore_eos=self.ignore_eos,
            stop_token_ids=list(self.stop_token_ids), detokenize=detokenize,
        )


class SnapshotBody(_Body):
    messages: list[Message] | None = None
    prompt_token_ids: list[int] | None = None
    cache_salt: str | None = None
    pin: bool = False  # keep the prefix's blocks in vLLM's cache while a handle holds them

    @field_validator("cache_salt")
    @classmethod
    def _salt(cls, salt: str | None) -> str | None:
        from vllm.entrypoints.generate.base.protocol import validate_cache_salt

        try:
            validate_cache_salt(salt)  # vLLM's own rule for its salts
        except VLLMClientError as e:
            raise ValueError(str(e).split(" (parameter=")[0]) from None
        return salt

    @model_validator(mode="after")
    def _one_prompt(self) -> SnapshotBody:
        if (self.messages is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of messages and prompt_token_ids")
        if not (self.messages or self.prompt_token_ids):
            raise ValueError("the prefix is empty")
        return self


class HandleRef(_Body):
    """A registered handle by id, or a handle's JSON (registered on the way)."""

    handle_id: str | None = None
    handle: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_ref(self) -> HandleRef:
        if (self.handle_id is None) == (self.handle is None):
            raise ValueError("give exactly one of handle_id and handle")
        return self


class ForkBody(_Body):
    handle_id: str
    n: int = Field(ge=1)


class ResumeBody(HandleRef):
    messages: list[Message] | None = None
    prompt_token_ids: list[int] | None = None
    sampling: Sampling = Sampling()
    save: bool = False  # this turn's blocks to the store too (resumable in another engine)

    @model_validator(mode="after")
    def _new_input(self) -> ResumeBody:
        if self.messages is not None and self.prompt_token_ids is not None:
            raise ValueError("give at most one of messages and prompt_token_ids")
        return self


class ReleaseBody(_Body):
    handle_id: str


class ImportBody(_Body):
    handle: dict[str, Any]


B = TypeVar("B", bound=BaseModel)


async def read_body(request: Request, model: type[B]) -> B:
    """The request's JSON body as `model`, within `MAX_BODY_BYTES` (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BranchdError(TOO_LARGE, f"body of {declared} bytes > {MAX_BODY_BYTES}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BranchdError(TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise BranchdError(BAD_JSON, f"body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BranchdError(BAD_JSON, "body is not a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise BranchdError(INVALID, f"{where}: {message}" if where else message) from None


# ---- the engine ----------------------------------------------------------------------


async def run_request(engine_client: Any, prompt: TokensPrompt, params: SamplingParams) -> Any:
    """One request through the server's engine client; vLLM's final `RequestOutput`.
    A request vLLM itself refuses is `INVALID`, an engine failure `UNAVAILABLE`."""
    # only the final output is read: asked for so, vLLM also gathers every one of an
    # n= request's samples into it (streamed, each output holds the samples of a step)
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY
    final = None
    try:
        async for out in engine_client.generate(prompt, params, f"branchd-{uuid.uuid4().hex}"):
            final = out
    except (VLLMClientError, ValueError) as e:
        raise BranchdError(INVALID, f"vLLM refused the request: {e}") from None
    except VLLMServerError as e:
        raise BranchdError(UNAVAILABLE, f"engine failed: {e}") from None
    if final is None:
        raise BranchdError(UNAVAILABLE, "engine returned no output")
    return final


@dataclasses.dataclass
class Entry:
    """A registered handle, with the conversation its tokens render when it was made
    from messages (so that a resume can take new messages)."""

    handle: PrefixHandle
    messages: list[dict[str, str]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"handle_id": self.handle.handle_id, "handle": self.handle.to_json(),
                "messages": self.messages}


class KVService:
    """What the routes serve from: the engine client, its store and fingerprint, the
    tokenizer (or None) and the registry of handles (in memory: lost on restart)."""

    def __init__(self, engine_client: Any, store: ChunkStore,
                 max_handles: int = MAX_HANDLES) -> None:
        config = engine_client.vllm_config
        self.engine = engine_client
        self.store = store
        self.fingerprint: Fingerprint = fingerprint_of(config)
        self.max_model_len = int(config.model_config.max_model_len)
        self.vocab = int(config.model_config.get_vocab_size())
        self.tokenizer = getattr(engine_client.renderer, "tokenizer", None)
        self.handles: dict[str, Entry] = {}
        self.max_handles = max_handles
        self._reserved = 0  # places taken by requests that will register handles

    # the registry

    @contextlib.contextmanager
    def room(self, n: int) -> Iterator[None]:
        """Places for `n` new handles, held while the request that registers them runs
        (refused, before any work, when the registry would grow past `max_handles`)."""
        held = len(self.handles) + self._reserved
        if held + n > self.max_handles:
            raise BranchdError(TOO_MANY, f"{held} handles registered here, {n} more would "
                                         f"pass the limit of {self.max_handles}: release some")
        self._reserved += n
        try:
            yield
        finally:
            self._reserved -= n

    def entry(self, handle_id: str) -> Entry:
        try:
            return self.handles[handle_id]
        except KeyError:
            raise BranchdError(UNKNOWN_HANDLE, f"no handle {handle_id!r} here") from None

    async def register(self, handle: PrefixHandle, messages: list[dict[str, str]] | None,
                       retain: bool) -> Entry:
        if retain:
            await asyncio.to_thread(self.store.retain, handle.handle_id, handle.chunk_keys)
        entry = self.handles[handle.handle_id] = Entry(handle, messages)
        return entry

    async def resolve(self, ref: HandleRef) -> Entry:
        """The entry a body names: by id, or a posted handle checked and registered."""
        if ref.handle_id is not None:
            return self.entry(ref.handle_id)
        assert ref.handle is not None
        try:
            handle = PrefixHandle.from_json(ref.handle)
        except (ValueError, KeyError, TypeError) as e:
            raise BranchdError(INVALID, f"handle: not a prefix handle ({e})") from None
        if handle.fingerprint != self.fingerprint:
            raise BranchdError(FINGERPRINT, _mismatch(handle.fingerprint, self.fingerprint))
        if handle.handle_id in self.handles:
            return self.handles[handle.handle_id]
        self.check_tokens(handle.token_ids, 1)
        handle = dataclasses.replace(handle, store=str(self.store.path))
        with self.room(1):
            return await self.register(handle, None, retain=True)

    async def continuation(self, entry: Entry, messages: list[Message] | None,
                           prompt_token_ids: list[int] | None
                           ) -> tuple[list[dict[str, str]] | None, list[int]]:
        """What a request adds after `entry`'s prefix: new messages (the conversation
        then, rendered, must start with the handle's tokens) or token ids; returns the
        whole conversation (None for token ids) and the new tokens."""
        handle = entry.handle
        if messages is None:
            return None, list(prompt_token_ids or [])
        if entry.messages is None:
            raise BranchdError(INVALID, f"handle {handle.handle_id} was made from token "
                                        "ids: continue it with prompt_token_ids")
        conversation = entry.messages + _messages(messages)
        full = await self.render(conversation, generation_prompt=True)
        if full[: len(handle.token_ids)] != list(handle.token_ids):
            raise BranchdError(INVALID, "the conversation does not render to the handle's "
                                        "tokens then more: post prompt_token_ids")
        return conversation, full[len(handle.token_ids):]

    # tokens

    def check_tokens(self, tokens: Sequence[int], max_tokens: int) -> None:
        if len(tokens) + max_tokens > self.max_model_len:
            raise BranchdError(TOO_LARGE, f"{len(tokens)} prompt tokens + {max_tokens} to "
                                          f"generate > max_model_len {self.max_model_len}")
        bad = next((t for t in tokens if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise BranchdError(INVALID, f"token id {bad} outside the vocabulary "
                                        f"(0..{self.vocab - 1})")

    async def render(self, messages: list[dict[str, str]], generation_prompt: bool
                     ) -> list[int]:
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise BranchdError(NO_TOKENIZER, "this server has no tokenizer with a chat "
                                             "template: post prompt_token_ids")

        def render() -> list[int]:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
            return list(tokenizer.encode(text, add_special_tokens=False))

        return await asyncio.to_thread(render)


def _mismatch(theirs: Fingerprint, ours: Fingerprint) -> str:
    fields = [f.name for f in dataclasses.fields(Fingerprint)
              if getattr(theirs, f.name) != getattr(ours, f.name)]
    return ("handle from another engine kind: " + ", ".join(
        f"{name} {getattr(theirs, name)!r} != {getattr(ours, name)!r}" for name in fields))


STATE_KEY = "branchd_kv"


def service(request: Request) -> KVService:
    """The route's `KVService`, or `UNAVAILABLE` saying why this server has none."""
    found = getattr(request.app.state, STATE_KEY, None)
    if isinstance(found, KVService):
        return found
    raise BranchdError(UNAVAILABLE, found or "branchd_kv endpoint plugin not initialised")


# ---- routes --------------------------------------------------------------------------

router = APIRouter(prefix="/v1/branchd")


def _messages(messages: list[Message]) -> list[dict[str, str]]:
    return [m.model_dump() for m in messages]


@router.post("/snapshot")
async def snapshot(request: Request) -> dict[str, Any]:
    kv = service(request)
    body = await read_body(request, SnapshotBody)
    messages = _messages(body.messages) if body.messages is not None else None
    if messages is not None:
        prefix = await kv.render(messages, generation_prompt=False)
    else:
        prefix = list(body.prompt_token_ids or [])
    kv.check_tokens(prefix, 1)
    with kv.room(1):
        handle, prompt, params = await asyncio.to_thread(
            start_snapshot, kv.engine.vllm_config, prefix, body.cache_salt, body.pin)
        try:
            out = await run_request(kv.engine, prompt, params)
        except BranchdError:
            await asyncio.to_thread(kv.store.release, handle.handle_id)
            raise
        snap = await asyncio.to_thread(finish_snapshot, handle, out)
        entry = await kv.register(snap.handle, messages, retain=False)  # already retained
    return {**entry.to_json(), "pinned": snap.pinned, "pin_refused": snap.pin_refused}


@router.post("/fork")
async def fork(request: Request) -> dict[str, Any]:
    kv = service(request)
    body = await read_body(request, ForkBody)
    if body.n > MAX_FORK:
        raise BranchdError(TOO_LARGE, f"n={body.n} > {MAX_FORK} handles per fork")
    parent = kv.entry(body.handle_id)
    children = []
    with kv.room(body.n):
        for _ in range(body.n):
            child = dataclasses.replace(parent.handle, handle_id=new_handle_id(),
                                        parent=parent.handle.handle_id)
            children.append(await kv.register(child, parent.messages, retain=True))
    return {"handle_ids": [c.handle.handle_id for c in children],
            "handles": [c.handle.to_json() for c in children]}


@router.post("/resume")
async def resume(request: Request) -> dict[str, Any]:
    kv = service(request)
    body = await read_body(request, ResumeBody)
    if body.sampling.max_tokens > MAX_OUTPUT_TOKENS:
        raise BranchdError(TOO_LARGE, f"max_tokens {body.sampling.max_tokens} > "
                                      f"{MAX_OUTPUT_TOKENS}")
    entry = await kv.resolve(body)
    handle = entry.handle
    messages, new = await kv.continuation(entry, body.messages, body.prompt_token_ids)
    kv.check_tokens(list(handle.token_ids) + new, body.sampling.max_tokens)
    sampling = body.sampling.to_vllm(detokenize=kv.tokenizer is not None)
    with kv.room(1):
        prompt, params = resume_request(handle, new, sampling, body.save)
        out = await run_request(kv.engine, prompt, params)
        result: ResumeResult = await asyncio.to_thread(resume_result, out, handle, new,
                                                       body.save)
        if messages is not None:
            messages = messages + [{"role": "assistant", "content": result.text}]
        child = await kv.register(result.handle, messages, retain=False)
    return {
        **child.to_json(),
        "token_ids": result.token_ids,
        "text": result.text,
        "cumulative_logprob": result.cumulative_logprob,
        "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
        "computed_tokens": result.computed_tokens,
        "expected_cached": result.expected_cached,
        "loaded_tokens": result.loaded_tokens,
        "evicted": result.evicted,
        "fallback": result.fallback,
        "pinned": result.pinned,
    }


@router.post("/release")
async def release(request: Request) -> dict[str, Any]:
    kv = service(request)
    body = await read_body(request, ReleaseBody)
    kv.entry(body.handle_id)
    del kv.handles[body.handle_id]
    freed = await asyncio.to_thread(kv.store.release, body.handle_id)
    return {"handle_id": body.handle_id, "bytes_freed": freed}


@router.post("/handles")
async def import_handle(request: Request) -> dict[str, Any]:
    kv = service(request)
    body = await read_body(request, ImportBody)
    return (await kv.resolve(HandleRef(handle=body.handle))).to_json()


@router.get("/handles/{handle_id}")
async def get_handle(request: Request, handle_id: str) -> dict[str, Any]:
    return service(request).entry(handle_id).to_json()


# ---- the plugin ----------------------------------------------------------------------


class BranchdEndpoints:
    """vLLM endpoint plugin: the KV-fork routes on `vllm serve`'s API server.

    `routers` are all included (another module's routes join by being listed there),
    and `verified_routes.router` (imported as they attach: it imports this module);
    they answer 503 `kv_fork_unavailable` when the server runs without
    `BranchdConnector` in its `--kv-transfer-config`.
    """

    name = "branchd_kv"
    required_tasks = ("generate",)
    routers: tuple[APIRouter, ...] = (router,)

    def attach_router(self, app: FastAPI) -> None:
        # modules built on this one's helpers join here (imported late: they import it)
        from branching.kv import verified_routes

        app.add_exception_handler(BranchdError, _error_response)
        for r in (*self.routers, verified_routes.router):
            app.include_router(r)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        from branching.kv.verified_routes import init_verifiers

        init_verifiers(state)
        if engine_client is None:
            setattr(state, STATE_KEY, "this server has no engine")
            return
        store = store_of(engine_client.vllm_config)
        if store is None:
            setattr(state, STATE_KEY, "the server runs without BranchdConnector: start it "
                    "with --kv-transfer-config naming it (branching/kv/README.md)")
            return
        limit = os.environ.get("BRANCHD_KV_MAX_HANDLES", "")
        if limit and not limit.isdigit():
            log.warning("BRANCHD_KV_MAX_HANDLES=%r is not a count: %d handles at most",
                        limit, MAX_HANDLES)
        setattr(state, STATE_KEY, KVService(engine_client, store,
                                            int(limit) if limit.isdigit() else MAX_HANDLES))
