"""A request body as the JSON object the engine expects, or TGI's 422 saying why not.

Stricter than Python's json module, as TGI's parser (serde_json) is: `NaN`, `Infinity`, a
number too large for a float (`1e400`) and lone UTF-16 surrogates (`"\\ud800"`) are not
JSON; nesting too deep for the parser is refused rather than crashing it.
"""

import json
import math
from typing import Any

from deployments.errors import TGIError


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse `raw` (UTF-8 JSON) into a dict; TGIError 422 for anything else."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
        _check_text(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise TGIError(f"request body is not valid JSON: {reason}", 422, "validation") from None
    if not isinstance(body, dict):
        raise TGIError("request body must be a JSON object", 422, "validation")
    return body


def _check_text(value: Any) -> None:
    """Raise ValueError on a string (or key) that is not Unicode text (a lone surrogate)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone UTF-16 surrogate") from None
