"""OpenAI-compatible routes of the engine, as TGI serves them."""

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
    usage,
    validate_openai,
)
from engine.schemas import ChatRequest
from engine.service import GeneratedToken, TextGenerationService, ValidRequest
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
        service.admit()
        envelope = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_id,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if body.stream:
            chunks = chat_chunks(service, body, request, envelope)
            return sse_response(chunks, on_close=service.release)
        try:
            tokens = [token async for token in service.generate(request)]
        finally:
            service.release()
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": tokens[-1].generated_text},
            "logprobs": chat_logprobs(tokens) if body.logprobs else None,
            "finish_reason": OPENAI_FINISH_REASON[tokens[-1].finish_reason],
        }
        return JSONResponse(
            {
                **envelope,
                "object": "chat.completion",
                "choices": [choice],
                "usage": usage(len(request.prompt_ids), len(tokens)),
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
    service: TextGenerationService, body: ChatRequest, request: ValidRequest, envelope: dict
) -> AsyncIterator[str]:
    """chat.completion.chunk objects, then "[DONE]"; an error mid-stream is an error event."""
    base = {**envelope, "object": "chat.completion.chunk"}
    num_generated = 0
    try:
        async for token in service.generate(request):
            num_generated += 1
            content = "" if token.special else token.text
            finish_reason = token.finish_reason and OPENAI_FINISH_REASON[token.finish_reason]
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": content},
                "logprobs": chat_logprobs([token]) if body.logprobs else None,
                "finish_reason": finish_reason,
            }
            yield sse_event({**base, "choices": [choice], "usage": None})
        if body.stream_options and body.stream_options.include_usage:
            num_prompt = len(request.prompt_ids)
            yield sse_event({**base, "choices": [], "usage": usage(num_prompt, num_generated)})
        yield sse_event("[DONE]")
    except RequestError as error:
        yield sse_event(error.to_dict())
