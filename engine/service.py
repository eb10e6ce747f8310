"""The text side of generation: validate a request, tokenize it, and stream tokens with text.

Protocol-neutral: the TGI and OpenAI routes both build a `ValidRequest` here and render the
`GeneratedToken`s in their own wire format.
"""

import random
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.errors import GenerationError, OverloadedError, RequestError, ValidationError
from engine.grammar import GrammarCompiler
from engine.metrics import EngineMetrics, record_success
from engine.protocol import FinishReason, SamplingParams
from engine.schemas import GenerateParameters
from engine.text import IncrementalDetokenizer, find_stop
from engine.validation import (
    Limits,
    check_lengths,
    check_parameters,
    compile_grammar,
    sampling_params,
)


@dataclass
class Timing:
    """Monotonic times of one request: arrival, first engine step, first and last token."""

    arrived: float = field(default_factory=time.monotonic)
    validated: float | None = None
    first_step: float | None = None
    first_token: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class ValidRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    best_of: int = 1


@dataclass(frozen=True)
class GeneratedToken:
    index: int
    id: int
    text: str
    logprob: float
    special: bool
    finish_reason: FinishReason | None  # set on the last token
    generated_text: str | None  # the whole output (special tokens left out), on the last token
    top_tokens: list[dict] = field(default_factory=list)  # TGI Tokens, when top_n_tokens > 0
    prefill: list[dict] | None = None  # TGI PrefillTokens, on the first token when asked


def with_fresh_seeds(request: ValidRequest, n: int) -> list[ValidRequest]:
    """`request` and n - 1 copies, each sampling with its own seed (greedy ones stay alike),
    for best_of and OpenAI's n."""
    copies = [
        replace(request, timing=replace(request.timing),
                params=replace(request.params, seed=random.getrandbits(63)))
        for _ in range(n - 1)
    ]  # fmt: skip
    return [request, *copies]


class TextGenerationService:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer,
        eos_token_ids: frozenset[int],
        limits: Limits,
        metrics: EngineMetrics,
        grammars: GrammarCompiler | None = None,
    ):
        self.engine = engine
        # None: --disable-grammar-support. Compiles at admission, on the HTTP thread, so the
        # engine loop never waits for a new grammar (llguidance releases the GIL meanwhile).
        self.grammars = grammars
        self.metrics = metrics
        # TGI's x-compute-type header: what the model runs on.
        self.compute_type = engine.engine.model_runner.device.type
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.limits = limits
        self.num_in_flight = 0
        # added_tokens_decoder, not all_special_ids: the latter lists only the named special
        # tokens (bos, eos, unk...) and misses chat markers such as <|im_end|>.
        self._special_ids = frozenset(
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special
        )

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`; chat templates hold their special tokens already (pass False)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def simple_tokens(self, text: str, add_special_tokens: bool) -> list[dict]:
        """TGI's SimpleToken list: id, the text it covers, and its start/stop offsets."""
        encoding = self.tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
        )
        return [
            {"id": token_id, "text": text[start:stop], "start": start, "stop": stop}
            for token_id, (start, stop) in zip(
                encoding["input_ids"], encoding["offset_mapping"], strict=True
            )
        ]

    def validate(
        self,
        prompt_ids: list[int],
        p: GenerateParameters,
        *,
        stream: bool = False,
        presence_penalty: float | None = None,
    ) -> ValidRequest:
        """Check a request with TGI's rules and messages; truncate its prompt as asked."""
        timing = Timing()
        self.metrics.request_count.inc()
        best_of = check_parameters(p, self.limits, stream=stream)
        if p.truncate is not None:
            prompt_ids = prompt_ids[-p.truncate :]
        max_new_tokens = check_lengths(len(prompt_ids), p.max_new_tokens, self.limits)
        grammar = compile_grammar(p.grammar, self.grammars) if p.grammar is not None else None
        params = sampling_params(p, max_new_tokens, self.eos_token_ids, presence_penalty, grammar)
        timing.validated = time.monotonic()
        self.metrics.request_validation_duration.observe(timing.validated - timing.arrived)
        return ValidRequest(prompt_ids, params, list(p.stop), timing, best_of)

    def admit(self, num_requests: int = 1) -> None:
        """Take concurrency slots, all or none (release each with `release`), or fail with 429."""
        if self.num_in_flight + num_requests > self.limits.max_concurrent_requests:
            raise OverloadedError()
        self.num_in_flight += num_requests

    def release(self, num_requests: int = 1) -> None:
        self.num_in_flight -= num_requests

    async def generate(self, request: ValidRequest) -> AsyncIterator[GeneratedToken]:
        """Stream the request's tokens; the last one carries finish_reason and generated_text."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
        output, index = "", 0
        steps = self.engine.generate(request.prompt_ids, request.params)
        timing = request.timing
        try:
            # aclosing: leaving early (stop sequence, client gone) aborts the engine request now,
            # not whenever the generator is garbage-collected.
            async with aclosing(steps):
                async for step, step_started in steps:
                    if timing.first_step is None:
                        timing.first_step, timing.first_token = step_started, time.monotonic()
                    special = step.token_id in self._special_ids
                    text = detokenizer.push(step.token_id)
                    finish_reason = step.finish_reason
                    if not special:
                        output += text
                        if request.stop and find_stop(output, len(text), request.stop) is not None:
                            finish_reason = "stop_sequence"
                    yield GeneratedToken(
                        index=index,
                        id=step.token_id,
                        text=text,
                        logprob=step.logprob,
                        special=special,
                        finish_reason=finish_reason,
                        generated_text=output if finish_reason else None,
                        top_tokens=[self.token(i, lp) for i, lp in step.top_tokens],
                        prefill=self._prefill(request.prompt_ids, step.prefill_logprobs),
                    )
                    index += 1
                    if finish_reason:  # a stop sequence ends the stream, which aborts the request
                        timing.end = time.monotonic()
                        record_success(self.metrics, request, index)
                        break
        except EngineDeadError as e:
            raise self._failed(GenerationError(str(e))) from e
        except ValueError as e:  # the engine refused the request (it can never fit the cache)
            raise self._failed(ValidationError(str(e))) from e

    async def generate_all(self, request: ValidRequest) -> list[GeneratedToken]:
        """All the request's tokens, once it has finished."""
        return [token async for token in self.generate(request)]

    def token(self, token_id: int, logprob: float) -> dict:
        """TGI's Token: id, its text alone, logprob, and whether it is a special token."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"id": token_id, "text": text, "logprob": logprob,
                "special": token_id in self._special_ids}  # fmt: skip

    def _prefill(self, prompt_ids: list[int], logprobs) -> list[dict] | None:
        if logprobs is None:
            return None
        texts = self.tokenizer.convert_ids_to_tokens(prompt_ids)
        texts = [self.tokenizer.convert_tokens_to_string([t]) for t in texts]
        return [{"id": i, "text": t, "logprob": lp}
                for i, t, lp in zip(prompt_ids, texts, logprobs, strict=True)]  # fmt: skip

    def _failed(self, error: RequestError) -> RequestError:
        self.metrics.request_failure.labels(err=error.error_type).inc()
        error.counted = True  # the HTTP error handler must not count it again
        return error
