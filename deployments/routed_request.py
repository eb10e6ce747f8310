"""What the request router reads from a TGIServer call: the prompt and the token budget.

The ingress calls `server.call.remote("POST", path, body, headers)` and
`server.options(stream=True).stream.remote(path, body, headers)`; Serve hands the router
those arguments as `PendingRequest.args` / `.kwargs`. The body is the client's JSON
object, untouched: TGI's `inputs` + `parameters.max_new_tokens`, or OpenAI's `messages` /
`prompt` + `max_tokens`.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The routes that put work in the engine's batch (not /tokenize, /info, /metrics, health).
GENERATION_ROUTES = frozenset(
    {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"}
)


@dataclass(frozen=True)
class RoutedRequest:
    """A generation request as the router sees it."""

    prompt: str  # the prompt as text (chat messages rendered); "" if the body has none
    max_new_tokens: int | None  # None: the client left it to the engine

    def estimate_tokens(self, chars_per_token: float, default_max_new_tokens: int) -> int:
        """Tokens this request may hold in the engine's KV cache: prompt + new tokens, the
        same reservation the engine counts in `tgi_batch_current_max_tokens`."""
        prompt_tokens = math.ceil(len(self.prompt) / chars_per_token)
        return prompt_tokens + (self.max_new_tokens or default_max_new_tokens)


def read_routed_request(args: Sequence[Any], kwargs: Mapping[str, Any]) -> RoutedRequest | None:
    """The generation request in a TGIServer call's arguments; None for any other call
    (health, GET routes, tokenize)."""
    path = next((a for a in args if isinstance(a, str) and a.startswith("/")), kwargs.get("path"))
    if path not in GENERATION_ROUTES:
        return None
    body = next((a for a in args if isinstance(a, Mapping)), kwargs.get("request"))
    if not isinstance(body, Mapping):
        return RoutedRequest("", None)
    return RoutedRequest(prompt_text(body), _max_new_tokens(body))


def prompt_text(body: Mapping[str, Any]) -> str:
    """The prompt of a TGI or OpenAI body as one string. Chat messages render as
    "role\\ncontent\\n" each, so conversations sharing a system prompt share a prefix."""
    if isinstance(body.get("inputs"), str):
        return body["inputs"]
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(_message_text(m) for m in messages if isinstance(m, Mapping))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return ""


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts; only text parts reach the prompt
        # Malformed parts (a non-string text) are the engine's to refuse: a router that
        # raised here would leave the request waiting for a replica forever.
        content = "".join(
            part["text"] for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )  # fmt: skip
    return f"{message.get('role', '')}\n{content if isinstance(content, str) else ''}\n"


def _max_new_tokens(body: Mapping[str, Any]) -> int | None:
    parameters = body.get("parameters")
    candidates = [
        parameters.get("max_new_tokens") if isinstance(parameters, Mapping) else None,
        body.get("max_tokens"),
        body.get("max_completion_tokens"),
    ]
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
