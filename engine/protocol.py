"""Types shared by the engine core (scheduler, model runner) and its HTTP front end.

The core works in token ids only; text (tokenizing, detokenizing, stop sequences) is the
front end's job. One `TokenStep` is produced per running request per engine step.
"""

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next tokens (validated by the HTTP layer before it gets here)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    # Token ids that end the request with finish_reason "eos_token".
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def is_greedy(self) -> bool:
        # As TGI: any active warper (temperature != 1, top_k, top_p < 1) turns sampling on.
        has_warpers = (
            self.temperature not in (None, 1.0) or bool(self.top_k) or self.top_p not in (None, 1.0)
        )
        return not (self.do_sample or has_warpers)


@dataclass(frozen=True)
class TokenStep:
    """One token generated for one request in one engine step."""

    request_id: str
    token_id: int
    logprob: float
    finish_reason: FinishReason | None  # set on the request's last token
