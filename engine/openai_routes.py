"""OpenAI-compatible routes of the engine, as TGI serves them."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from engine import completions
from engine.errors import RequestError, ValidationError
from engine.openai_common import (
    OPENAI_FINISH_REASON,
    SYSTEM_FINGERPRINT,
    merged_tokens,
    usage,
    validate_openai,
)
from engine.schemas import ChatRequest
from engine.service import GeneratedToken, TextGenerationService, ValidRequest, with_fresh_seeds
from engine.sse import sse_event, sse_response


def register(app: FastAPI, service: TextGenerationService, model_id: str) -> None:
    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}
        return {"object": "list", "data": [card]}

    completions.register(
        app, service, {"model": model_id, "system_fingerprint": SYSTEM_FINGERPRINT}
    )

    @app.post("/chat_tokenize")
    async def chat_tokenize(body: ChatRequest) -> dict:
        """The chat template applied to the messages, and its tokens."""
        text = apply_chat_template(service, body)
        tokens = service.simple_tokens(text, add_special_tokens=False)
        return {"tokenize_response": tokens, "templated_text": text}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> JSONResponse | StreamingResponse:
        request = validate_chat(service, body)
        n = body.n if body.n is not None else 1
        if not 1 <= n <= service.limits.max_client_batch_size:
            raise ValidationError(
                f"`n` must be between 1 and {service.limits.max_client_batch_size}"
                f" (--max-client-batch-size). Given: {n}"
            )
        requests = with_fresh_seeds(request, n)  # n choices, each sampled on its own
        service.admit(n)
        envelope = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_id,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if body.stream:
            chunks = chat_chunks(service, body, requests, envelope)
            return sse_response(chunks, on_close=lambda: service.release(n))
        try:
            runs = await asyncio.gather(*(service.generate_all(r) for r in requests))
        finally:
            service.release(n)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": tokens[-1].generated_text},
                "logprobs": chat_logprobs(tokens) if body.logprobs else None,
                "finish_reason": OPENAI_FINISH_REASON[tokens[-1].finish_reason],
            }
            for i, tokens in enumerate(runs)
        ]
        num_generated = sum(len(tokens) for tokens in runs)
        return JSONResponse(
            {
                **envelope,
                "object": "chat.completion",
                "choices": choices,
                "usage": usage(len(request.prompt_ids), num_generated),
            }
        )


def chat_logprobs(tokens: list[GeneratedToken]) -> dict:
    """OpenAI's logprobs object: each token's text and logprob, with its top alternatives."""
    content = [
        {"token": t.text, "logprob": t.logprob,
         "top_logprobs": [{"token": x["text"], "logprob": x["logprob"]} for x in t.top_tokens]}
        for t in tokens
    ]  # fmt: skip
    return {"content": content}


def apply_chat_template(service: TextGenerationService, body: ChatRequest) -> str:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return service.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    except Exception as e:  # a template may raise on roles or orders it does not accept
        raise ValidationError(f"chat template error: {e}") from e


def validate_chat(service: TextGenerationService, body: ChatRequest) -> ValidRequest:
    prompt = apply_chat_template(service, body)
    return validate_openai(service, body, service.tokenize(prompt, add_special_tokens=False))


async def chat_chunks(
    service: TextGenerationService,
    body: ChatRequest,
    requests: list[ValidRequest],
    envelope: dict,
) -> AsyncIterator[str]:
    """chat.completion.chunk objects (choices interleaved as they decode), then "[DONE]"; a
    failing choice sends an error event."""
    base = {**envelope, "object": "chat.completion.chunk"}
    num_generated = 0
    async for index, item in merged_tokens(service, requests):
        if isinstance(item, RequestError):
            yield sse_event(item.to_dict())
            continue
        num_generated += 1
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": "" if item.special else item.text},
            "logprobs": chat_logprobs([item]) if body.logprobs else None,
            "finish_reason": item.finish_reason and OPENAI_FINISH_REASON[item.finish_reason],
        }
        yield sse_event({**base, "choices": [choice], "usage": None})
    if body.stream_options and body.stream_options.include_usage:
        num_prompt = len(requests[0].prompt_ids)
        yield sse_event({**base, "choices": [], "usage": usage(num_prompt, num_generated)})
    yield sse_event("[DONE]")
