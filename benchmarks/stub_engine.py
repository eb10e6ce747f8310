"""A stub engine for benchmarks/serve_floor.py: TGI's `POST /generate_stream` answered with
its headers at once and one SSE event `--first-token-ms` later, as an engine sends its
headers at once and its first token after the prefill; `GET /health`. It takes the
launcher's `--hostname/--port`, so deployments/launcher.py's Launcher runs it.

    python -m benchmarks.stub_engine --first-token-ms 4.5 --hostname 127.0.0.1 --port 8080
"""

import argparse
import asyncio

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

EVENT = 'data:{"token":{"id":1,"text":"x","logprob":0.0,"special":false},"generated_text":"x"}\n\n'


def stub_app(first_token_s: float) -> FastAPI:
    app = FastAPI()

    @app.post("/generate_stream")
    async def generate_stream() -> StreamingResponse:
        async def one_event():
            await asyncio.sleep(first_token_s)
            yield EVENT

        return StreamingResponse(one_event(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict:
        return {}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--first-token-ms", type=float, default=0.0)
    p.add_argument("--hostname", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    app = stub_app(args.first_token_ms / 1000)
    uvicorn.run(app, host=args.hostname, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
