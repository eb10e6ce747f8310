"""TGI's generation routes as data: a finished request becomes a GenerateResponse (with
Details, best_of sequences and x-* headers), a running one a stream of StreamResponses."""

import asyncio
from collections.abc import AsyncIterator

from engine.errors import RequestError
from engine.schemas import GenerateRequest
from engine.service import GeneratedToken, TextGenerationService, ValidRequest, with_fresh_seeds
from engine.sse import sse_event


def validate_generate(
    service: TextGenerationService, body: GenerateRequest, *, stream: bool
) -> ValidRequest:
    prompt_ids = service.tokenize(body.inputs, body.add_special_tokens)
    return service.validate(prompt_ids, body.parameters, stream=stream)


async def generate_response(
    service: TextGenerationService, body: GenerateRequest
) -> tuple[dict, dict[str, str]]:
    """Run a request to the end: TGI's GenerateResponse and its x-* timing headers."""
    request = validate_generate(service, body, stream=False)
    # best_of > 1: that many sequences, each with its own seed; the best by mean logprob wins.
    requests = with_fresh_seeds(request, request.best_of)
    service.admit(len(requests))
    try:
        runs = await asyncio.gather(*(service.generate_all(r) for r in requests))
    finally:
        service.release(len(requests))
    scored = sorted(zip(runs, requests, strict=True), key=lambda rr: -_mean_logprob(rr[0]))
    (tokens, best), others = scored[0], scored[1:]
    response: dict = {"generated_text": full_text(body, tokens[-1].generated_text)}
    if body.parameters.details:
        response["details"] = details(tokens, best)
        if others:
            response["details"]["best_of_sequences"] = [
                {"generated_text": full_text(body, t[-1].generated_text), **details(t, r)}
                for t, r in others
            ]
    num_chars = len(body.inputs)
    return response, timing_headers(service, best, len(tokens), num_chars)


def _mean_logprob(tokens: list[GeneratedToken]) -> float:
    return sum(t.logprob for t in tokens) / len(tokens)


def details(tokens: list[GeneratedToken], request: ValidRequest) -> dict:
    """TGI's Details; top_tokens only when asked for, as TGI leaves an empty list out."""
    result = {
        "finish_reason": tokens[-1].finish_reason,
        "generated_tokens": len(tokens),
        "seed": request.params.seed,
        "prefill": tokens[0].prefill or [],
        "tokens": [token_dict(t) for t in tokens],
    }
    if request.params.top_n_tokens:
        result["top_tokens"] = [t.top_tokens for t in tokens]
    return result


def token_dict(token: GeneratedToken) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def full_text(body: GenerateRequest, generated_text: str) -> str:
    return body.inputs + generated_text if body.parameters.return_full_text else generated_text


async def stream_events(
    service: TextGenerationService, body: GenerateRequest, request: ValidRequest
) -> AsyncIterator[str]:
    """StreamResponse events; the last carries generated_text (and details when asked)."""
    try:
        async for token in service.generate(request):
            event: dict = {"index": token.index, "token": token_dict(token)}
            if token.top_tokens:
                event["top_tokens"] = token.top_tokens
            event["generated_text"], event["details"] = None, None
            if token.finish_reason:
                event["generated_text"] = full_text(body, token.generated_text)
                if body.parameters.details:
                    event["details"] = {
                        "finish_reason": token.finish_reason,
                        "generated_tokens": token.index + 1,
                        "seed": request.params.seed,
                        "input_length": len(request.prompt_ids),
                    }
            yield sse_event(event)
    except RequestError as error:  # the response has started: report in the stream
        yield sse_event(error.to_dict())


def timing_headers(
    service: TextGenerationService, request: ValidRequest, num_generated: int, num_chars: int
) -> dict[str, str]:
    """TGI's headers on a finished request: times in ms (x-compute-time in s)."""
    t = request.timing
    total, inference = t.end - t.arrived, t.end - t.first_step

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": service.compute_type,
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(num_chars),
        "x-total-time": ms(total),
        "x-validation-time": ms(t.validated - t.arrived),
        "x-queue-time": ms(t.first_step - t.validated),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(inference / num_generated),
        "x-prompt-tokens": str(len(request.prompt_ids)),
        "x-generated-tokens": str(num_generated),
    }
