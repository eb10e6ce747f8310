"""OpenAI-compatible routes of the engine, as TGI serves them."""

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import jinja2
import jinja2.meta
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from engine import completions
from engine.chat_choices import ChatUsage, complete_choice, stream_choice
from engine.errors import RequestError, ValidationError
from engine.openai_common import SYSTEM_FINGERPRINT, merged_streams, usage, validate_openai
from engine.schemas import (
    ChatRequest,
    Grammar,
    JsonGrammar,
    JsonSchemaGrammar,
    RegexGrammar,
    ResponseFormat,
)
from engine.service import TextGenerationService, ValidRequest, with_fresh_seeds
from engine.sse import sse_event, sse_response
from engine.tool_calls import ToolPlan, plan_tools, tools_message_suffix


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
        """The chat template applied to the messages (and tools), and its tokens."""
        text = apply_chat_template(service, body, plan_tools(body))
        tokens = service.simple_tokens(text, add_special_tokens=False)
        return {"tokenize_response": tokens, "templated_text": text}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> JSONResponse | StreamingResponse:
        plan = plan_tools(body)
        request = validate_chat(service, body, plan)
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
            chunks = chat_chunks(service, body, plan, requests, envelope)
            response = sse_response(chunks, on_close=lambda: service.release(n))
            response.headers["x-prompt-tokens"] = str(len(request.prompt_ids))  # not TGI's
            return response
        counts = ChatUsage()
        try:
            choices = await asyncio.gather(*(
                complete_choice(service, r, plan, lambda: validate_chat(service, body, None),
                                i, bool(body.logprobs), counts)
                for i, r in enumerate(requests)
            ))  # fmt: skip
        finally:
            service.release(n)
        return JSONResponse(
            {
                **envelope,
                "object": "chat.completion",
                "choices": choices,
                "usage": usage(counts.num_prompt, counts.num_generated),
            }
        )


@functools.lru_cache(maxsize=8)
def template_takes_tools(template: str) -> bool:
    """Whether a chat template renders `tools` itself (else they go into the last message)."""
    source = jinja2.Environment().parse(template)
    return "tools" in jinja2.meta.find_undeclared_variables(source)


def apply_chat_template(
    service: TextGenerationService, body: ChatRequest, plan: ToolPlan | None
) -> str:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    tools = None
    if plan is not None:
        takes_tools = template_takes_tools(service.tokenizer.chat_template or "")
        messages[-1]["content"] += tools_message_suffix(plan, body.tool_prompt, takes_tools)
        tools = [tool.model_dump() for tool in plan.tools] if takes_tools else None
    try:
        return service.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
    except Exception as e:  # a template may raise on roles or orders it does not accept
        raise ValidationError(f"chat template error: {e}") from e


def response_format_grammar(response_format: ResponseFormat | None) -> Grammar | None:
    """OpenAI's and TGI's `response_format` as TGI's grammar (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":  # any JSON object
        return JsonGrammar(type="json", value={"type": "object"})
    if response_format.type == "json":
        return JsonGrammar(type="json", value=response_format.value)
    if response_format.type == "regex":
        return RegexGrammar(type="regex", value=response_format.value)
    return JsonSchemaGrammar(type="json_schema", value=response_format.json_schema)


def validate_chat(
    service: TextGenerationService, body: ChatRequest, plan: ToolPlan | None
) -> ValidRequest:
    """The chat request as an engine request; with `plan`, constrained to its tool calls."""
    prompt = apply_chat_template(service, body, plan)
    if plan is not None:
        grammar: Grammar | None = JsonGrammar(type="json", value=plan.schema)
    else:
        grammar = response_format_grammar(body.response_format)
    prompt_ids = service.tokenize(prompt, add_special_tokens=False)
    return validate_openai(service, body, prompt_ids, grammar)


async def chat_chunks(
    service: TextGenerationService,
    body: ChatRequest,
    plan: ToolPlan | None,
    requests: list[ValidRequest],
    envelope: dict,
) -> AsyncIterator[str]:
    """chat.completion.chunk objects (choices interleaved as they decode), then "[DONE]"; a
    failing choice sends an error event."""
    base = {**envelope, "object": "chat.completion.chunk"}
    counts = ChatUsage()

    def plain() -> ValidRequest:
        return validate_chat(service, body, None)

    streams = [stream_choice(service, r, plan, plain, i, bool(body.logprobs), counts)
               for i, r in enumerate(requests)]  # fmt: skip
    async with aclosing(merged_streams(streams)) as items:
        async for _, item in items:
            if isinstance(item, RequestError):
                yield sse_event(item.to_dict())
                continue
            yield sse_event({**base, "choices": [item], "usage": None})
    if body.stream_options and body.stream_options.include_usage:
        yield sse_event(
            {**base, "choices": [], "usage": usage(counts.num_prompt, counts.num_generated)}
        )
    yield sse_event("[DONE]")
