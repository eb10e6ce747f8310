"""TGI's token limits, checked at the ingress before a request is dispatched.

A prompt over the engine's `max_input_tokens`, or prompt + `max_new_tokens` over its
`max_total_tokens`, is refused here with TGI's own 422 and message (engine/validation.py's
`check_lengths`), so it never takes a Serve hop, a replica slot or engine time. The limits
are the engine's `/info` (refreshed every few seconds, so a redeployed model's new limits
are seen); the tokenizer is the model's (deployments/prompt_tokens.py).

Only what is certain is refused: a body whose fields the engine would reject for other
reasons (wrong types, a non-positive `max_new_tokens`, a bad `truncate`) is left to the
engine, which answers with TGI's message for that. Counts never exceed the engine's, so a
request the engine would accept is never refused here.
"""

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.errors import TGIError
from deployments.prompt_tokens import PromptTokens
from engine.errors import ValidationError
from engine.validation import Limits, check_lengths

log = logging.getLogger("ray.serve")

TGI_ROUTES = frozenset({"/", "/generate", "/generate_stream"})
OPENAI_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
# Prompts this long are tokenized off the event loop, which other streams share.
_INLINE_CHARS = 20_000
_ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request as the engine will see it, and its `max_new_tokens`."""

    text: str
    max_new_tokens: int | None  # None: the rest of the context
    truncate: int | None = None  # TGI's `truncate`: keep only the last N prompt tokens


def prompts_of(path: str, body: Mapping[str, Any], tokens: PromptTokens) -> list[Prompt] | None:
    """The prompts of a generation request; None when the body is not well-formed enough
    to be sure (the engine then answers)."""
    if path in TGI_ROUTES:
        parameters = body.get("parameters") or {}
        if not isinstance(body.get("inputs"), str) or not isinstance(parameters, Mapping):
            return None
        max_new_tokens = _positive_int(parameters, "max_new_tokens")
        truncate = _positive_int(parameters, "truncate")
        if max_new_tokens is False or truncate is False:
            return None
        return [Prompt(body["inputs"], max_new_tokens, truncate)]
    max_new_tokens = _positive_int(body, "max_tokens")
    if max_new_tokens is False:
        return None
    if path == "/v1/completions":
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            return None
        return [Prompt(p, max_new_tokens) for p in prompts]
    messages = _chat_messages(body.get("messages"))
    text = tokens.chat_prompt(messages) if messages else None
    return None if text is None else [Prompt(text, max_new_tokens)]


def _positive_int(fields: Mapping[str, Any], name: str) -> int | None | bool:
    """The field if it is a positive int, None if absent, False if anything else."""
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return False


def _chat_messages(messages: object) -> list[dict[str, str]] | None:
    """Messages as the engine passes them to the template (content parts joined)."""
    if not isinstance(messages, list) or not messages:
        return None
    rendered = []
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
            return None
        content = message.get("content", "")
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, Mapping)]
            if len(parts) != len(content):
                return None
            texts = [p.get("text", "") for p in parts if p.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                return None
            content = "".join(texts)
        if not isinstance(content, str):
            return None
        rendered.append({"role": message["role"], "content": content})
    return rendered


def check_prompts(prompts: list[Prompt], tokens: PromptTokens, limits: Limits) -> None:
    """Raise TGI's 422 for the first prompt over the limits."""
    for prompt in prompts:
        num_input = tokens.count(prompt.text)
        if prompt.truncate is not None:
            if prompt.truncate > limits.max_input_tokens:
                return  # the engine refuses the `truncate` itself, first
            num_input = min(num_input, prompt.truncate)
        if num_input == 0:
            continue  # TGI's "cannot be empty" comes after its parameter checks: the engine's
        try:
            check_lengths(num_input, prompt.max_new_tokens, limits)
        except ValidationError as e:
            if "`max_new_tokens` must be strictly positive" in e.message:
                return  # only reachable past the input limit, which is checked first
            raise TGIError(e.message, 422, "validation") from None


@dataclass
class _ModelBudget:
    tokens: PromptTokens | None = None
    model_id: str | None = None
    limits: Limits | None = None
    checked_at: float = float("-inf")


class TokenBudgets:
    """Per model (TGIServer deployment): its tokenizer and the engine's limits, fetched
    through the deployment's handle on first use and refreshed every `refresh_s`."""

    def __init__(self, refresh_s: float = 10.0):
        self._refresh_s = refresh_s
        self._budgets: dict[str, _ModelBudget] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def check(self, server: DeploymentHandle, path: str, body: Mapping[str, Any]) -> None:
        """Raise TGIError 422 if `body` cannot fit the model's limits; return otherwise,
        including when the limits or tokenizer are not known (the engine checks anyway)."""
        if path not in TGI_ROUTES and path not in OPENAI_ROUTES:
            return
        budget = await self._budget(server)
        if budget.tokens is None or budget.limits is None:
            return
        tokens, limits = budget.tokens, budget.limits
        prompts = prompts_of(path, body, tokens)
        if not prompts:
            return
        if sum(len(p.text) for p in prompts) <= _INLINE_CHARS:
            check_prompts(prompts, tokens, limits)
        else:
            await asyncio.to_thread(check_prompts, prompts, tokens, limits)

    async def _budget(self, server: DeploymentHandle) -> _ModelBudget:
        name = server.deployment_name
        budget = self._budgets.setdefault(name, _ModelBudget())
        if time.monotonic() - budget.checked_at < self._refresh_s:
            return budget
        async with self._locks.setdefault(name, asyncio.Lock()):
            if time.monotonic() - budget.checked_at >= self._refresh_s:
                await self._refresh(name, server, budget)
        return budget

    async def _refresh(self, name: str, server: DeploymentHandle, budget: _ModelBudget) -> None:
        budget.checked_at = time.monotonic()  # failed or not: the next try waits refresh_s
        try:
            info = json.loads((await server.call.remote("GET", "/info")).body)
            budget.limits = _limits(info)
            if budget.tokens is None or info.get("model_id") != budget.model_id:
                files = await server.tokenizer_files.remote()
                budget.tokens = await asyncio.to_thread(PromptTokens.from_files, files)
                budget.model_id = info.get("model_id")
        except Exception as exc:  # noqa: BLE001 - the engine still checks every request
            log.warning("%s: no prompt token check at the ingress for now: %r", name, exc)


def _limits(info: Mapping[str, Any]) -> Limits | None:
    if not isinstance(info.get("max_input_tokens"), int):
        return None
    if not isinstance(info.get("max_total_tokens"), int):
        return None
    return Limits(
        max_concurrent_requests=info.get("max_concurrent_requests", 0),
        max_input_tokens=info["max_input_tokens"],
        max_total_tokens=info["max_total_tokens"],
        max_stop_sequences=info.get("max_stop_sequences", 0),
        max_client_batch_size=info.get("max_client_batch_size", 0),
        max_best_of=info.get("max_best_of", 0),
        max_top_n_tokens=info.get("max_top_n_tokens", 0),
    )
