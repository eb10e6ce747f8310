"""Pieces shared by the OpenAI-compatible routes (chat and legacy completions)."""

SYSTEM_FINGERPRINT = "3.3.6-ray-tgi"

# TGI's mapping of its finish reasons onto OpenAI's.
OPENAI_FINISH_REASON = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def usage(num_prompt: int, num_generated: int) -> dict:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_generated,
        "total_tokens": num_prompt + num_generated,
    }
