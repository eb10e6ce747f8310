"""Pieces shared by the OpenAI-compatible routes (chat and legacy completions)."""

from engine.errors import ValidationError
from engine.schemas import OpenAIRequest
from engine.service import TextGenerationService, ValidRequest

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
    service: TextGenerationService, body: OpenAIRequest, prompt_ids: list[int]
) -> ValidRequest:
    """TGI's validation of an OpenAI request whose prompt is already tokenized."""
    unsupported = body.unsupported_fields()
    if unsupported:
        raise ValidationError(f"`{unsupported[0]}` is not supported by the embedded engine yet")
    greedy = body.temperature == 0  # OpenAI's temperature 0 means greedy; TGI rejects it elsewhere
    return service.validate(
        prompt_ids,
        body.max_tokens,
        do_sample=not greedy and body.temperature is not None,
        temperature=None if greedy else body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_sequences(),
    )
