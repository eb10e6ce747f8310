"""Call ray-tgi's models from another Ray Serve application, through handles: no HTTP hop.

Two handles reach a model, with the same two methods:

- the app's handle, `serve.get_app_handle("ray-tgi")` (the Ingress): picks the model by
  `model=` as HTTP does (None or "tgi": the first model);
- a model's deployment handle, `serve.get_deployment_handle("TGIServer:smollm2", "ray-tgi")`:
  straight to that model's replicas, one hop less.

`call.remote(method, path, body)` returns a `LauncherReply` (`body` bytes of the engine's
JSON answer, `content_type`, TGI's `x-*` headers). `options(stream=True).stream.remote(path,
body)` yields the engine's `x-*` headers (a dict) first, then each SSE event as TGI framed it
(`"data:{...}\\n\\n"`). The paths and bodies are TGI's (`/generate`, `/generate_stream`,
`/v1/chat/completions`, ...); an error arrives as a `TGIError` with TGI's status and type.

Run it beside a running app (`make serve` in another terminal):

    .venv/bin/python examples/handle_client.py "What is the capital of France?"

It deploys the app "handle-client" (HTTP at /handle-client) into the same cluster, asks it
once through each handle, and leaves it running; `serve delete handle-client` removes it.
"""

import asyncio
import json
import sys
from typing import Any, Literal

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

APP_NAME = "handle-client"
Via = Literal["app", "deployment"]


def chat_prompt(question: str) -> str:
    """SmolLM2's chat template by hand: the TGI routes take a raw prompt."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def stream_text(event: dict[str, str] | str) -> str:
    """The text of one `/generate_stream` event ("" for the headers and special tokens)."""
    if isinstance(event, dict):
        return ""  # the engine's x-* headers, sent once before the events
    payload = json.loads(event.removeprefix("data:"))
    if "error" in payload:  # an error after the stream started (TGI sends it as an event)
        raise RuntimeError(f"{payload.get('error_type')}: {payload['error']}")
    token = payload["token"]
    return "" if token["special"] else token["text"]


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class HandleClient:
    """Asks ray-tgi's models for text through Serve handles (`via`: "app" or "deployment")."""

    def __init__(self, target_app: str = "ray-tgi"):
        self._target_app = target_app
        self._handles: dict[str, DeploymentHandle] = {}

    async def _handle(self, via: Via, model: str | None) -> tuple[DeploymentHandle, dict]:
        """The handle to call, and the keyword arguments it needs to pick the model."""
        if via == "app":
            key, get = "", lambda: serve.get_app_handle(self._target_app)
            kwargs: dict[str, Any] = {"model": model}
        else:
            if model is None:
                raise ValueError("via='deployment' needs the model's name")
            deployment = f"TGIServer:{model}"  # a deployment handle names one model
            key, get = deployment, lambda: serve.get_deployment_handle(deployment, self._target_app)
            kwargs = {}
        if key not in self._handles:  # the lookup asks the controller: keep it off the loop
            self._handles[key] = await asyncio.to_thread(get)
        return self._handles[key], kwargs

    async def generate(
        self, question: str, max_new_tokens: int = 32, model: str | None = None, via: Via = "app"
    ) -> str:
        handle, kwargs = await self._handle(via, model)
        body = {"inputs": chat_prompt(question), "parameters": {"max_new_tokens": max_new_tokens}}
        reply = await handle.call.remote("POST", "/generate", body, **kwargs)
        return json.loads(reply.body)["generated_text"]

    async def generate_stream(
        self, question: str, max_new_tokens: int = 32, model: str | None = None, via: Via = "app"
    ) -> str:
        handle, kwargs = await self._handle(via, model)
        body = {"inputs": chat_prompt(question), "parameters": {"max_new_tokens": max_new_tokens}}
        events = handle.options(stream=True).stream.remote("/generate_stream", body, **kwargs)
        return "".join([stream_text(event) async for event in events])

    async def __call__(self, request: Request) -> dict[str, str]:
        """HTTP: POST {"question", "max_new_tokens"?, "model"?, "via"?, "stream"?}."""
        body = await request.json()
        ask = self.generate_stream if body.pop("stream", False) else self.generate
        return {"generated_text": await ask(**body)}


app = HandleClient.bind()


def main(question: str) -> None:
    import ray

    ray.init(address="auto")  # the running cluster that serves ray-tgi
    handle = serve.run(app, name=APP_NAME, route_prefix=f"/{APP_NAME}")
    print("app handle, /generate:", handle.generate.remote(question).result())
    streamed = handle.generate_stream.remote(question, via="deployment", model="smollm2")
    print("deployment handle, /generate_stream:", streamed.result())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?")
