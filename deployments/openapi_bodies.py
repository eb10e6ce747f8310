"""Request bodies in the ingress's OpenAPI document (/api-doc/openapi.json).

The ingress forwards bodies to the engine untouched, and the engine validates them, so its
routes read the raw request and FastAPI would document no body at all. The bodies are
described here with the engine's own pydantic models (engine/schemas.py), registered as
components of the document, so clients, API tools and schema-driven tests see them.
"""

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from engine.schemas import ChatRequest, CompatGenerateRequest, CompletionRequest, GenerateRequest

BODY_MODELS: tuple[type[BaseModel], ...] = (
    GenerateRequest,
    CompatGenerateRequest,
    ChatRequest,
    CompletionRequest,
)
_REF = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model`."""
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def with_body_schemas(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Wrap FastAPI's `app.openapi` so the document holds the body models' schemas."""

    def document() -> dict[str, Any]:
        schema = openapi()
        _, definitions = models_json_schema(
            [(model, "validation") for model in BODY_MODELS], ref_template=_REF
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(definitions.get("$defs", {}))
        return schema

    return document
