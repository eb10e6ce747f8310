"""What stands in front of every route: API key, payload limit, CORS (launcher flags)."""

import hmac

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

# As TGI: generation needs the key; health, info, models, metrics and docs do not.
OPEN_PATHS = frozenset({"/health", "/info", "/v1/models", "/metrics", "/scheduler", "/docs",
                        "/api-doc/openapi.json", "/docs/oauth2-redirect"})  # fmt: skip


def install_guards(
    app: FastAPI, api_key: str | None, payload_limit: int, cors_allow_origin: list[str] | None
) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(
                    {"error": "Unauthorized", "error_type": "unauthorized"}, status_code=401
                )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > payload_limit:
            return JSONResponse(
                {"error": f"Payload too large: {length} bytes, the limit is {payload_limit} "
                          "(--payload-limit)", "error_type": "payload_too_large"},
                status_code=413,
            )  # fmt: skip
        return await call_next(request)

    if cors_allow_origin:
        app.add_middleware(
            CORSMiddleware, allow_origins=cors_allow_origin, allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )  # fmt: skip
