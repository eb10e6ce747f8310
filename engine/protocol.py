"""Types shared by the engine core (scheduler, model runner) and its HTTP front end.

The core works in token ids only; text (tokenizing, detokenizing, stop sequences) is the
front end's job. One `TokenStep` is produced per running request per engine step.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from engine.grammar import CompiledGrammar

FinishReason = Literal["length", "eos_token", "stop_sequence"]

# TGI's chat route has no presence penalty of its own: it sends presence_penalty + 2.0 as the
# repetition penalty (router/src/lib.rs, ChatRequest::try_into_generate). We do the same.
PRESENCE_TO_REPETITION_OFFSET = 2.0


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next tokens (validated by the HTTP layer before it gets here).

    Logits go through, in TGI's order: watermark, repetition penalty, frequency penalty, then
    the warpers temperature, top-k, top-p, typical-p. Penalties and watermark apply to greedy
    requests too; the warpers only ever change sampling requests (see `is_greedy`).
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    seed: int | None = None
    # HF/CTRL rule over prompt + generated tokens: a seen token's logit is divided by the
    # penalty when positive, multiplied when negative. 1.0 or None: off.
    repetition_penalty: float | None = None
    # TGI's rule: logits -= penalty * count(token in prompt + generated) / num_tokens.
    frequency_penalty: float | None = None
    # TGI chat semantics, not OpenAI's: applied as repetition_penalty = presence_penalty + 2.0.
    # Cannot be combined with repetition_penalty.
    presence_penalty: float | None = None
    # TGI's watermark (Kirchenbauer et al.): +2.0 on a "green" half of the vocabulary drawn
    # from the previous token.
    watermark: bool = False
    top_n_tokens: int = 0  # report this many most likely tokens per step (ties included)
    prefill_logprobs: bool = False  # TGI's decoder_input_details: logprobs of prompt tokens
    # Token ids that end the request with finish_reason "eos_token".
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    # TGI's `grammar`: the output must match this JSON schema or regex (engine/grammar.py).
    # Applied after the penalties and before the warpers, as TGI does.
    grammar: "CompiledGrammar | None" = None

    def __post_init__(self) -> None:
        if self.repetition_penalty is not None and self.presence_penalty is not None:
            raise ValueError("repetition_penalty and presence_penalty cannot both be set")

    @property
    def is_greedy(self) -> bool:
        # As TGI: any active warper (temperature != 1, top_k, top_p < 1, typical_p < 1) turns
        # sampling on.
        has_warpers = (
            self.temperature not in (None, 1.0)
            or bool(self.top_k)
            or self.top_p not in (None, 1.0)
            or self.typical_p not in (None, 1.0)
        )
        return not (self.do_sample or has_warpers)

    @property
    def applied_repetition_penalty(self) -> float | None:
        """The repetition penalty the engine applies (None when off)."""
        penalty = self.repetition_penalty
        if self.presence_penalty is not None:
            penalty = self.presence_penalty + PRESENCE_TO_REPETITION_OFFSET
        return None if penalty in (None, 1.0) else penalty

    @property
    def has_penalties(self) -> bool:
        return self.applied_repetition_penalty is not None or bool(self.frequency_penalty)


@dataclass(frozen=True)
class TokenStep:
    """One token generated for one request in one engine step."""

    request_id: str
    token_id: int
    # log-probability of token_id under the distribution it was drawn from: log_softmax of the
    # logits after the penalties and warpers, masked tokens at -inf (TGI's convention).
    logprob: float
    finish_reason: FinishReason | None  # set on the request's last token
    # The top_n_tokens most likely (token id, logprob) of that same distribution, most likely
    # first; more than top_n_tokens when several tie at the n-th logprob, fewer when fewer
    # tokens survive the warpers.
    top_tokens: tuple[tuple[int, float], ...] = ()
    # On a request's first step only, when asked: one entry per prompt token, its logprob
    # given the tokens before it under the raw model (no penalties or warpers); the first
    # token has none.
    prefill_logprobs: tuple[float | None, ...] | None = None
