"""Which of the app's models a request goes to.

One rule for every route, first match wins:

1. the route prefix: `/models/{name}/generate`, `/models/{name}/v1/chat/completions`, ...
   (every route of the app, under the model's own base URL);
2. the `x-model` header;
3. the body's `model` field (the OpenAI routes; TGI's bodies have none);
4. the first model of `args.models`.

No name, an empty one, and the placeholders that clients of a one-model TGI server send
mean "the first model", so those clients keep working: `"tgi"` (TGI's docs and examples),
`"dummy"` (huggingface_hub's InferenceClient given a base URL) and `"default"` (`ray-tgi
bench`). Any other name that the app does not serve is refused (404), never silently sent
elsewhere.
"""

from collections.abc import Sequence

MODEL_HEADER = "x-model"
# Placeholders that stand for "the server's model" rather than naming one.
FIRST_MODEL_ALIASES = frozenset({"", "tgi", "dummy", "default"})


def requested_model(
    path_model: str | None, header_model: str | None, body_model: object = None
) -> str | None:
    """The name the request asks for, by the precedence above; None if it names none."""
    for name in (path_model, header_model, body_model):
        if isinstance(name, str):
            return name
    return None


def choose_model(served: Sequence[str], requested: str | None) -> str | None:
    """The served model for `requested`, or None when the app does not serve it."""
    if requested in served:
        return requested  # a model may be called "tgi": its own name wins over the alias
    if requested is None or requested in FIRST_MODEL_ALIASES:
        return served[0]
    return None
