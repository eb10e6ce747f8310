"""What a request produced, read from TGI's answer as it passes: tokens, finish reason, error.

The ingress (metrics, logs, its span) and the TGIServer (its span) read the same answers, so
they read them here. Sources, as TGI and the embedded engine send them:
- headers: `x-prompt-tokens` / `x-generated-tokens` on TGI's non-streamed routes (the
  embedded engine also sends `x-prompt-tokens` when a stream starts);
- a non-streamed body: TGI's `details` (`finish_reason`, `generated_tokens`; the compat
  route wraps it in a one-element list), OpenAI's `usage` and `choices[].finish_reason`;
- stream events, one token each: TGI's StreamResponse (the last one's `details`), OpenAI's
  chunks (`choices`, and a final `usage` when the client asked for it);
- `{"error": .., "error_type": ..}` bodies and events.
A count the answer reports (usage, details, headers) wins over events counted.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deployments.errors import STATUS_BY_ERROR_TYPE


@dataclass
class GenerationOutcome:
    input_tokens: int | None = None  # None: the answer did not say
    reported_output_tokens: int | None = None  # from usage, details or x-generated-tokens
    num_token_events: int = 0  # stream events that carried a token
    finish_reasons: list[str] = field(default_factory=list)  # one per choice that finished
    error_type: str | None = None
    error_message: str | None = None

    @property
    def output_tokens(self) -> int | None:
        if self.reported_output_tokens is not None:
            return self.reported_output_tokens
        return self.num_token_events or None

    @property
    def error_status(self) -> int | None:
        """TGI's HTTP status for the error type (an error inside a started stream)."""
        if self.error_type is None:
            return None
        return STATUS_BY_ERROR_TYPE.get(self.error_type, 500)

    def read_headers(self, headers: Mapping[str, str]) -> None:
        """TGI's x-* token headers (keys lower-case)."""
        prompt = _int(headers.get("x-prompt-tokens"))
        if prompt is not None:
            self.input_tokens = prompt
        generated = _int(headers.get("x-generated-tokens"))
        if generated is not None:
            self.reported_output_tokens = generated

    def read_body(self, body: bytes) -> None:
        """A whole JSON answer (non-streamed, or an error)."""
        try:
            payload = json.loads(body)
        except ValueError:
            return
        if isinstance(payload, list) and payload and isinstance(payload[0], dict):
            payload = payload[0]  # TGI's compat route: [GenerateResponse]
        if isinstance(payload, dict):
            self._read_object(payload, streamed=False)

    def read_event(self, event: str) -> bool:
        """One SSE event (`data:{...}`, framing included or not); True if it carried a token."""
        data = event.strip()
        if not data.startswith("data:"):
            return False  # a keep-alive comment
        data = data[len("data:") :].strip()
        if data == "[DONE]":
            return False
        try:
            payload = json.loads(data)
        except ValueError:
            return False
        if not isinstance(payload, dict):
            return False
        is_token = self._read_object(payload, streamed=True)
        self.num_token_events += is_token
        return is_token

    def _read_object(self, payload: dict[str, Any], streamed: bool) -> bool:
        if "error" in payload and isinstance(payload["error"], str):
            self.error_type = str(payload.get("error_type") or "generation")
            self.error_message = payload["error"]
            return False
        details = payload.get("details")
        if isinstance(details, dict):  # TGI's Details / StreamDetails
            self._finished(details.get("finish_reason"))
            self.reported_output_tokens = _int(details.get("generated_tokens"))
            if _int(details.get("input_length")) is not None:
                self.input_tokens = _int(details.get("input_length"))
        usage = payload.get("usage")
        if isinstance(usage, dict):  # OpenAI's usage
            self.input_tokens = _int(usage.get("prompt_tokens"))
            self.reported_output_tokens = _int(usage.get("completion_tokens"))
        choices = payload.get("choices")
        if isinstance(choices, list):  # OpenAI: one chunk per token when streamed
            for choice in choices:
                if isinstance(choice, dict):
                    self._finished(choice.get("finish_reason"))
            return streamed and bool(choices)
        return streamed and isinstance(payload.get("token"), dict)  # TGI's StreamResponse

    def _finished(self, reason: object) -> None:
        if isinstance(reason, str) and reason:
            self.finish_reasons.append(reason)


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
