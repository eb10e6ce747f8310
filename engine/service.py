"""The text side of generation: validate a request, tokenize it, and stream tokens with text.

Protocol-neutral: the TGI and OpenAI routes both build a `ValidRequest` here and render the
`GeneratedToken`s in their own wire format.
"""

import random
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.errors import GenerationError, OverloadedError, ValidationError
from engine.protocol import FinishReason, SamplingParams
from engine.text import IncrementalDetokenizer, find_stop


@dataclass(frozen=True)
class Limits:
    max_concurrent_requests: int
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int
    max_client_batch_size: int


@dataclass(frozen=True)
class ValidRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GeneratedToken:
    index: int
    id: int
    text: str
    logprob: float
    special: bool
    finish_reason: FinishReason | None  # set on the last token
    generated_text: str | None  # the whole output (special tokens left out), on the last token


@dataclass
class Timing:
    """When a request was admitted, when its first token and its last arrived (monotonic s)."""

    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    end: float | None = None


class TextGenerationService:
    def __init__(
        self, engine: AsyncEngine, tokenizer, eos_token_ids: frozenset[int], limits: Limits
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.limits = limits
        self.num_in_flight = 0
        # added_tokens_decoder, not all_special_ids: the latter lists only the named special
        # tokens (bos, eos, unk...) and misses chat markers such as <|im_end|>.
        self._special_ids = frozenset(
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special
        )

    def tokenize(self, text: str) -> list[int]:
        # Chat templates already contain the model's special tokens, so add none here.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def validate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int | None,
        *,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> ValidRequest:
        """Check a request against the launcher's limits, with TGI's messages."""
        limits, num_input = self.limits, len(prompt_ids)
        if num_input == 0:
            raise ValidationError("`inputs` cannot be empty")
        if temperature is not None and temperature <= 0:
            raise ValidationError("`temperature` must be strictly positive")
        if top_k is not None and top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        stop = stop or []
        if len(stop) > limits.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
                f"Given: {len(stop)}"
            )
        if num_input > limits.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {num_input}"
            )
        if max_new_tokens is None:  # as TGI 3: the rest of the context
            max_new_tokens = limits.max_total_tokens - num_input
        if max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if num_input + max_new_tokens > limits.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {num_input} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_ids=self.eos_token_ids,
        )
        if seed is None and not params.is_greedy:  # TGI reports the seed it drew
            params = SamplingParams(**{**params.__dict__, "seed": random.getrandbits(63)})
        return ValidRequest(prompt_ids, params, stop)

    def admit(self, num_requests: int = 1) -> None:
        """Take concurrency slots, all or none (release each with `release`), or fail with 429."""
        if self.num_in_flight + num_requests > self.limits.max_concurrent_requests:
            raise OverloadedError()
        self.num_in_flight += num_requests

    def release(self, num_requests: int = 1) -> None:
        self.num_in_flight -= num_requests

    async def generate(
        self, request: ValidRequest, timing: Timing | None = None
    ) -> AsyncIterator[GeneratedToken]:
        """Stream the request's tokens; the last one carries finish_reason and generated_text."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
        output, index = "", 0
        steps = self.engine.generate(request.prompt_ids, request.params)
        try:
            # aclosing: leaving early (stop sequence, client gone) aborts the engine request now,
            # not whenever the generator is garbage-collected.
            async with aclosing(steps):
                async for step in steps:
                    special = step.token_id in self._special_ids
                    text = detokenizer.push(step.token_id)
                    finish_reason = step.finish_reason
                    if not special:
                        output += text
                        if request.stop and find_stop(output, len(text), request.stop) is not None:
                            finish_reason = "stop_sequence"
                    if timing and timing.first_token is None:
                        timing.first_token = time.monotonic()
                    yield GeneratedToken(
                        index=index,
                        id=step.token_id,
                        text=text,
                        logprob=step.logprob,
                        special=special,
                        finish_reason=finish_reason,
                        generated_text=output if finish_reason else None,
                    )
                    index += 1
                    if finish_reason:  # a stop sequence ends the stream, which aborts the request
                        break
        except EngineDeadError as e:
            raise GenerationError(str(e)) from e
        except ValueError as e:  # the engine refused the request (it can never fit the cache)
            raise ValidationError(str(e)) from e
        finally:
            if timing:
                timing.end = time.monotonic()
