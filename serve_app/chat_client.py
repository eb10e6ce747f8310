"""`ray-tgi chat`: stream one answer from a running app to the terminal.

The OpenAI chat route with `"stream": true`, read over httpx as server-sent events, so it
works against any OpenAI-compatible server (ray-tgi, TGI itself). Leaving the iterator early
(Ctrl-C) closes the connection, which makes the server cancel the generation.
"""

import json
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ChatError(Exception):
    """The server refused the request or reported an error inside the stream."""


def stream_chat(
    url: str,
    prompt: str,
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    api_key: str | None = None,
) -> Iterator[str]:
    """Yield the answer's text pieces as the server streams them (one token each)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "stream": True}
    # Left out when unset: the server's defaults apply (the first model, the rest of the
    # context, the model's sampling defaults).
    optional = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    body.update({k: v for k, v in optional.items() if v is not None})
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # No read timeout: a long answer is bounded by max_tokens, not by a clock.
    timeout = httpx.Timeout(30.0, read=None)
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    with httpx.stream("POST", endpoint, json=body, headers=headers, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            raise ChatError(f"HTTP {response.status_code}: {_error_message(response.text)}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and keep-alive comments
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ChatError(_error_message(data))
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield content


def _error_message(text: str) -> str:
    """The message of a TGI-shaped (`{"error": str}`) or OpenAI-shaped
    (`{"error": {"message": str}}`) error body; the raw text otherwise."""
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text.strip()
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)
