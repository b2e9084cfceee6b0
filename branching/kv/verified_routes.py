"""`POST /v1/branchd/verified_completions` on `vllm serve`: candidates tested before they
are returned (`verified.verify`), under a verifier of the server's verifiers file.

    {"verifier": "fix-bug", "n": 4, "commit": true,
     "messages": [...] | "prompt_token_ids": [...]
       | "handle_id": "..." (or "handle": {...}) with new "messages" or "prompt_token_ids",
     "sampling": {"max_tokens": 64, "temperature": 0.8, "seed": 1}}

The body names a verifier, never a command: its fields are closed (a `command` or
`test` field is refused, 422). The verifiers file is `$BRANCHD_VERIFIERS`, read as
the plugin starts and again whenever it changes. Errors are the other routes':
unknown verifier 404, a bad body 400/422, n over the verifier's `max_n` (or a body
over 1 MiB) 413, a verifier that cannot serve (the file unset or broken, its daemon
unreachable, a text verifier on a model without a tokenizer) 503 with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, model_validator
from starlette.datastructures import State
from vllm.inputs import TokensPrompt

from branching.kv.requests import resume_request, with_logprobs
from branching.kv.routes import (
    MAX_OUTPUT_TOKENS,
    TOO_LARGE,
    BranchdError,
    ErrorCode,
    HandleRef,
    KVService,
    Message,
    Sampling,
    _Body,
    _messages,
    read_body,
    run_request,
    service,
)
from branching.kv.verified import Completion, VerifierUnavailable, verify
from branching.kv.verifiers import ENV_VAR, Verifier, VerifierConfigError, VerifierFile

log = logging.getLogger(__name__)

UNKNOWN_VERIFIER = ErrorCode("unknown_verifier", 404)
VERIFIER_UNAVAILABLE = ErrorCode("verifier_unavailable", 503)
STATE_KEY = "branchd_verifiers"

router = APIRouter(prefix="/v1/branchd")


class VerifiedBody(_Body):
    verifier: str
    n: int = Field(ge=1)
    commit: bool = False
    handle_id: str | None = None
    handle: dict[str, Any] | None = None
    messages: list[Message] | None = None
    prompt_token_ids: list[int] | None = None
    sampling: Sampling = Sampling()

    @model_validator(mode="after")
    def _one_prompt(self) -> VerifiedBody:
        if self.handle_id is not None and self.handle is not None:
            raise ValueError("give at most one of handle_id and handle")
        if self.messages is not None and self.prompt_token_ids is not None:
            raise ValueError("give at most one of messages and prompt_token_ids")
        if self.handle_id is None and self.handle is None and not (
                self.messages or self.prompt_token_ids):
            raise ValueError("give a prompt: messages, prompt_token_ids or a handle")
        return self


def init_verifiers(state: State) -> None:
    """Hold the server's verifiers file; a broken one is logged now, and every request
    answers 503 with the reason until the file is fixed."""
    path = os.environ.get(ENV_VAR)
    held = VerifierFile(path) if path else None
    setattr(state, STATE_KEY, held)
    if held is not None:
        try:
            log.info("verifiers: %s", ", ".join(held.current()))
        except VerifierConfigError as e:
            log.error("%s", e)


def _verifier(request: Request, name: str) -> Verifier:
    held: VerifierFile | None = getattr(request.app.state, STATE_KEY, None)
    if held is None:
        raise BranchdError(VERIFIER_UNAVAILABLE, "this server has no verifiers: start it "
                                                 f"with ${ENV_VAR} naming a verifiers file")
    try:
        verifiers = held.current()
    except VerifierConfigError as e:
        raise BranchdError(VERIFIER_UNAVAILABLE, str(e)) from None
    try:
        return verifiers[name]
    except KeyError:
        raise BranchdError(UNKNOWN_VERIFIER, f"no verifier {name!r} here (known: "
                                             f"{', '.join(sorted(verifiers))})") from None


async def _request(kv: KVService, body: VerifiedBody) -> tuple[TokensPrompt, Any]:
    """The one n= request: its prompt (a handle's prefix then the new input, or the
    prompt alone) and its parameters."""
    sampling = body.sampling.to_vllm(detokenize=kv.tokenizer is not None)
    sampling.n = body.n
    if body.handle_id is not None or body.handle is not None:
        entry = await kv.resolve(HandleRef(handle_id=body.handle_id, handle=body.handle))
        _, new = await kv.continuation(entry, body.messages, body.prompt_token_ids)
        kv.check_tokens(list(entry.handle.token_ids) + new, body.sampling.max_tokens)
        return resume_request(entry.handle, new, sampling)
    if body.messages is not None:
        tokens = await kv.render(_messages(body.messages), generation_prompt=True)
    else:
        tokens = list(body.prompt_token_ids or [])
    kv.check_tokens(tokens, body.sampling.max_tokens)
    return TokensPrompt(prompt_token_ids=tokens), with_logprobs(sampling)


@router.post("/verified_completions")
async def verified_completions(request: Request) -> dict[str, Any]:
    kv = service(request)
    body = await read_body(request, VerifiedBody)
    verifier = _verifier(request, body.verifier)
    if body.n > verifier.max_n:
        raise BranchdError(TOO_LARGE, f"n={body.n} > {verifier.max_n}, the max_n of "
                                      f"verifier {verifier.name}")
    if body.sampling.max_tokens > MAX_OUTPUT_TOKENS:
        raise BranchdError(TOO_LARGE, f"max_tokens {body.sampling.max_tokens} > "
                                      f"{MAX_OUTPUT_TOKENS}")
    prompt, params = await _request(kv, body)
    loop = asyncio.get_running_loop()
    answer: list[Any] = []
    detokenized = kv.tokenizer is not None

    def generate(n: int) -> list[Completion]:
        # verify runs in a worker thread; the engine is this event loop's
        out = asyncio.run_coroutine_threadsafe(run_request(kv.engine, prompt, params),
                                               loop).result()
        answer.append(out)
        return [Completion(tuple(c.token_ids), float(c.cumulative_logprob),
                           c.text if detokenized else None) for c in out.outputs]

    try:
        result = await asyncio.to_thread(verify, generate, verifier, body.n,
                                         commit=body.commit)
    except VerifierUnavailable as e:
        raise BranchdError(VERIFIER_UNAVAILABLE, str(e)) from None
    [out] = answer
    return {**result.to_json(), "prompt_tokens": len(prompt["prompt_token_ids"]),
            "cached_tokens": int(out.num_cached_tokens or 0)}
