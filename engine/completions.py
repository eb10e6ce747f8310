"""OpenAI's legacy `/v1/completions` route, as TGI serves it: raw prompts, no chat template.

`prompt` is one string or a list of them (at most `max_client_batch_size`); each prompt is its
own engine request with its own concurrency slot, and its choice carries the prompt's index.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from engine.errors import RequestError, ValidationError
from engine.openai_common import OPENAI_FINISH_REASON, merged_tokens, usage, validate_openai
from engine.schemas import CompletionRequest
from engine.service import TextGenerationService, ValidRequest
from engine.sse import sse_event, sse_response


def register(app: FastAPI, service: TextGenerationService, envelope_base: dict) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        prompts = body.prompts()
        if not 1 <= len(prompts) <= service.limits.max_client_batch_size:
            raise ValidationError(
                f"Number of prompts must be between 1 and {service.limits.max_client_batch_size}"
                f" (--max-client-batch-size), got {len(prompts)}"
            )
        requests = [
            validate_openai(service, body, service.tokenize(p, add_special_tokens=True))
            for p in prompts
        ]
        service.admit(len(requests))
        envelope = {
            **envelope_base,
            "id": f"cmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "object": "text_completion",
        }
        if body.stream:
            response = sse_response(
                completion_events(service, requests, envelope),
                on_close=lambda: service.release(len(requests)),
            )
            num_prompt = sum(len(r.prompt_ids) for r in requests)
            response.headers["x-prompt-tokens"] = str(num_prompt)  # not TGI's
            return response
        try:
            runs = await asyncio.gather(*(service.generate_all(r) for r in requests))
        finally:
            service.release(len(requests))
        choices = [
            {"index": i, "text": tokens[-1].generated_text, "logprobs": None,
             "finish_reason": OPENAI_FINISH_REASON[tokens[-1].finish_reason]}
            for i, tokens in enumerate(runs)
        ]  # fmt: skip
        num_prompt = sum(len(r.prompt_ids) for r in requests)
        num_generated = sum(len(tokens) for tokens in runs)
        return JSONResponse(
            {**envelope, "choices": choices, "usage": usage(num_prompt, num_generated)}
        )


async def completion_events(
    service: TextGenerationService, requests: list[ValidRequest], envelope: dict
) -> AsyncIterator[str]:
    """One text_completion chunk per token, prompts interleaved as they decode, then [DONE]."""
    async for index, item in merged_tokens(service, requests):
        if isinstance(item, RequestError):
            yield sse_event(item.to_dict())
            continue
        choice = {
            "index": index,
            "text": "" if item.special else item.text,
            "logprobs": None,
            # TGI sends "" until the last chunk; its schema has no null here.
            "finish_reason": OPENAI_FINISH_REASON.get(item.finish_reason, ""),
        }
        yield sse_event({**envelope, "choices": [choice]})
    yield sse_event("[DONE]")
