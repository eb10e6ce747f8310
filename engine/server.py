"""The engine's HTTP API: TGI's routes (this file) and OpenAI's (openai_routes.py)."""

from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine import openai_routes
from engine.errors import RequestError, ValidationError
from engine.schemas import CompatGenerateRequest, GenerateRequest
from engine.service import GeneratedToken, TextGenerationService, ValidRequest
from engine.sse import sse_event, sse_response


def token_dict(token: GeneratedToken) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def create_app(service: TextGenerationService, info: dict) -> FastAPI:
    app = FastAPI(title="ray-tgi embedded engine", version=info["version"])
    app.state.service = service

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, error: RequestError) -> JSONResponse:
        return error.to_response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return ValidationError(f"`{where}`: {first['msg']}").to_response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.engine.is_alive:
            return JSONResponse(None, status_code=200)
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)

    @app.get("/info")
    async def get_info() -> dict:
        return info

    @app.post("/")
    async def compat_generate(body: CompatGenerateRequest) -> Response:
        """TGI's compat route: a one-element list, or the event stream when `stream` is set."""
        if body.stream:
            return start_stream(service, body)
        return JSONResponse([await generate_response(service, body)])

    @app.post("/generate")
    async def generate(body: GenerateRequest) -> JSONResponse:
        return JSONResponse(await generate_response(service, body))

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest) -> StreamingResponse:
        return start_stream(service, body)

    openai_routes.register(app, service, model_id=info["model_id"])
    return app


async def generate_response(service: TextGenerationService, body: GenerateRequest) -> dict:
    """Run a request to the end and build TGI's GenerateResponse."""
    request = validate_generate(service, body)
    service.admit()
    try:
        tokens = [token async for token in service.generate(request)]
    finally:
        service.release()
    last = tokens[-1]
    response: dict = {"generated_text": full_text(body, last.generated_text)}
    if body.parameters.details:
        response["details"] = {
            "finish_reason": last.finish_reason,
            "generated_tokens": len(tokens),
            "seed": request.params.seed,
            "prefill": [],
            "tokens": [token_dict(t) for t in tokens],
        }
    return response


def start_stream(service: TextGenerationService, body: GenerateRequest) -> StreamingResponse:
    request = validate_generate(service, body)
    service.admit()
    return sse_response(stream_events(service, body, request), on_close=service.release)


def full_text(body: GenerateRequest, generated_text: str) -> str:
    return body.inputs + generated_text if body.parameters.return_full_text else generated_text


def validate_generate(service: TextGenerationService, body: GenerateRequest) -> ValidRequest:
    unsupported = body.parameters.unsupported_fields()
    if unsupported:
        raise ValidationError(f"`{unsupported[0]}` is not supported by the embedded engine yet")
    p = body.parameters
    prompt_ids = service.tokenize(body.inputs)
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]
    return service.validate(
        prompt_ids,
        p.max_new_tokens,
        do_sample=p.do_sample,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=p.seed,
        stop=p.stop,
    )


async def stream_events(
    service: TextGenerationService, body: GenerateRequest, request: ValidRequest
) -> AsyncIterator[str]:
    """StreamResponse events; the last carries generated_text (and details when asked)."""
    try:
        async for token in service.generate(request):
            event = {"index": token.index, "token": token_dict(token), "generated_text": None}
            if token.finish_reason:
                event["generated_text"] = full_text(body, token.generated_text)
                if body.parameters.details:
                    event["details"] = {
                        "finish_reason": token.finish_reason,
                        "generated_tokens": token.index + 1,
                        "seed": request.params.seed,
                        "input_length": len(request.prompt_ids),
                    }
            yield sse_event(event)
    except RequestError as error:  # the response has started: report in the stream
        yield sse_event(error.to_dict())
