"""Pieces shared by the OpenAI-compatible routes (chat and legacy completions)."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TypeVar

from engine.errors import RequestError, ValidationError
from engine.protocol import PRESENCE_TO_REPETITION_OFFSET
from engine.schemas import GenerateParameters, Grammar, OpenAIRequest
from engine.service import GeneratedToken, TextGenerationService, ValidRequest

T = TypeVar("T")

SYSTEM_FINGERPRINT = "3.3.6-ray-tgi"

# TGI's mapping of its finish reasons onto OpenAI's.
OPENAI_FINISH_REASON = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def usage(num_prompt: int, num_generated: int) -> dict:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_generated,
        "total_tokens": num_prompt + num_generated,
    }


def validate_openai(
    service: TextGenerationService,
    body: OpenAIRequest,
    prompt_ids: list[int],
    grammar: Grammar | None = None,
) -> ValidRequest:
    """An OpenAI request mapped onto TGI's parameters the way TGI maps it, then TGI's rules.

    temperature 0 means greedy, any other (or none) samples; presence_penalty becomes a
    repetition penalty of presence_penalty + 2 (TGI's mapping, see engine/protocol.py)."""
    unsupported = body.unsupported_fields()
    if unsupported:
        raise ValidationError(f"`{unsupported[0]}` is not supported by the embedded engine yet")
    greedy = body.temperature == 0
    wants_logprobs = bool(getattr(body, "logprobs", False))
    parameters = GenerateParameters(
        do_sample=not greedy,
        temperature=None if greedy else body.temperature,
        max_new_tokens=body.max_tokens,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_sequences(),
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=getattr(body, "repetition_penalty", None),
        top_n_tokens=getattr(body, "top_logprobs", None) if wants_logprobs else None,
        grammar=grammar,
    )
    presence = getattr(body, "presence_penalty", None)
    if presence is not None and presence + PRESENCE_TO_REPETITION_OFFSET <= 0:
        # What TGI answers, as it sends presence_penalty + 2 on as the repetition penalty.
        raise ValidationError("`repetition_penalty` must be strictly positive")
    return service.validate(prompt_ids, parameters, presence_penalty=presence)


async def merged_tokens(
    service: TextGenerationService, requests: list[ValidRequest]
) -> AsyncIterator[tuple[int, GeneratedToken | RequestError]]:
    """The tokens of several requests as they come, each with its request's index; a request
    that fails yields its error. Closing this stops every request still running."""
    async with aclosing(merged_streams([service.generate(r) for r in requests])) as items:
        async for item in items:
            yield item


async def merged_streams(
    streams: list[AsyncIterator[T]],
) -> AsyncIterator[tuple[int, T | RequestError]]:
    """The items of several streams as they come, each with its stream's index; a stream that
    fails with a RequestError yields it and ends. Closing this stops every stream."""
    merged: asyncio.Queue = asyncio.Queue()  # (index, item | RequestError | None)

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await merged.put((index, item))
        except RequestError as error:
            await merged.put((index, error))
        finally:
            await merged.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_running = len(tasks)
        while num_running:
            index, item = await merged.get()
            if item is None:
                num_running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
