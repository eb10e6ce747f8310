"""One choice of a chat completion, whole or streamed, with or without tools.

Without tools a choice is the generation's text. With tools the generation is a call in the
tool grammar (engine/tool_calls.py): it becomes `tool_calls`, streamed as deltas of the
arguments once the function's name is known; if the model picked `no_tool`, that generation
is dropped and a plain one, from the prompt without tools, answers instead (as TGI 3.3).
"""

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

from engine.openai_common import OPENAI_FINISH_REASON
from engine.service import GeneratedToken, TextGenerationService, ValidRequest
from engine.tool_calls import NO_TOOL, CallText, ToolPlan, new_call_id, tool_call_message

# Builds the request that answers a `no_tool` choice: the prompt without tools, no grammar.
PlainRequest = Callable[[], ValidRequest]


@dataclass
class ChatUsage:
    """Token counts of the generations that answered (a dropped `no_tool` one is not)."""

    num_prompt: int = 0
    num_generated: int = 0


def chat_logprobs(tokens: list[GeneratedToken]) -> dict:
    """OpenAI's logprobs object: each token's text and logprob, with its top alternatives."""
    content = [
        {"token": t.text, "logprob": t.logprob,
         "top_logprobs": [{"token": x["text"], "logprob": x["logprob"]} for x in t.top_tokens]}
        for t in tokens
    ]  # fmt: skip
    return {"content": content}


def _plain_request(request: ValidRequest, plain: PlainRequest) -> ValidRequest:
    """The no-tool request, drawing with the tool request's seed."""
    answer = plain()
    return replace(answer, params=replace(answer.params, seed=request.params.seed))


async def complete_choice(
    service: TextGenerationService,
    request: ValidRequest,
    plan: ToolPlan | None,
    plain: PlainRequest,
    index: int,
    logprobs: bool,
    usage: ChatUsage,
) -> dict:
    """A finished ChatCompletionComplete choice."""
    tokens = await service.generate_all(request)
    text = tokens[-1].generated_text
    message: dict | None = {"role": "assistant", "content": text}
    if plan is not None:
        message = tool_call_message(text, new_call_id())
        if message is None:  # cut before a function was named: the text as it is
            message = {"role": "assistant", "content": text}
        elif message["tool_calls"][0]["function"]["name"] == NO_TOOL:
            request = _plain_request(request, plain)
            tokens = await service.generate_all(request)
            message = {"role": "assistant", "content": tokens[-1].generated_text}
    usage.num_prompt = len(request.prompt_ids)
    usage.num_generated += len(tokens)
    return {
        "index": index,
        "message": message,
        "logprobs": chat_logprobs(tokens) if logprobs else None,
        "finish_reason": OPENAI_FINISH_REASON[tokens[-1].finish_reason],
    }


def _delta_choice(index: int, delta: dict, tokens: list[GeneratedToken], logprobs: bool):
    finish_reason = tokens[-1].finish_reason
    return {
        "index": index,
        "delta": {"role": "assistant", **delta},
        "logprobs": chat_logprobs(tokens) if logprobs else None,
        "finish_reason": finish_reason and OPENAI_FINISH_REASON[finish_reason],
    }


async def _content_chunks(
    service: TextGenerationService, request: ValidRequest, index: int, logprobs: bool,
    usage: ChatUsage,
) -> AsyncIterator[dict]:  # fmt: skip
    usage.num_prompt = len(request.prompt_ids)
    async for token in service.generate(request):
        usage.num_generated += 1
        content = "" if token.special else token.text
        yield _delta_choice(index, {"content": content}, [token], logprobs)


async def stream_choice(
    service: TextGenerationService,
    request: ValidRequest,
    plan: ToolPlan | None,
    plain: PlainRequest,
    index: int,
    logprobs: bool,
    usage: ChatUsage,
) -> AsyncIterator[dict]:
    """ChatCompletionChoice chunks of one choice (`delta` and `finish_reason`)."""
    if plan is None:
        async for chunk in _content_chunks(service, request, index, logprobs, usage):
            yield chunk
        return
    call, call_id = CallText(), new_call_id()
    buffered: list[GeneratedToken] = []  # tokens not yet in a chunk
    num_sent = 0  # characters of the arguments already sent
    async with aclosing(service.generate(request)) as tokens:
        async for token in tokens:
            buffered.append(token)
            if not token.special:
                call.push(token.text)
            if call.name == NO_TOOL:
                break  # leaving the block aborts this generation
            if call.name is None:
                if token.finish_reason:  # ended before naming a function: send the text
                    usage.num_prompt = len(request.prompt_ids)
                    usage.num_generated += len(buffered)
                    text = {"content": call.text}
                    yield _delta_choice(index, text, buffered, logprobs)
                continue
            arguments = call.arguments(final=token.finish_reason is not None)
            function = {"name": call.name if num_sent == 0 else None,
                        "arguments": arguments[num_sent:]}  # fmt: skip
            num_sent = len(arguments)
            delta = {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                     "function": function}]}  # fmt: skip
            usage.num_prompt = len(request.prompt_ids)
            usage.num_generated += len(buffered)
            yield _delta_choice(index, delta, buffered, logprobs)
            buffered = []
    if call.name == NO_TOOL:
        answer = _plain_request(request, plain)
        async for chunk in _content_chunks(service, answer, index, logprobs, usage):
            yield chunk
