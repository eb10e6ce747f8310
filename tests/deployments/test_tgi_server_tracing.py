"""TGIServer's spans, exported over OTLP/HTTP to a test-run collector, and the W3C trace
context it sends its launcher (a stand-in launcher process that records the headers it
gets). No Ray: the plain class, as in test_launcher.py."""

import asyncio
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from otlp_collector import otlp_collector

from deployments.errors import TGIError
from deployments.tgi_server import TGIServer
from serve_app.config import ModelConfig, TracingOptions

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"

STAND_IN = textwrap.dedent(
    '''
    """A stand-in launcher that answers as TGI does and records the headers it got."""
    import argparse, json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--hostname")
    parser.add_argument("--port", type=int)
    args, _ = parser.parse_known_args()
    SEEN = []
    DETAILS = {"finish_reason": "length", "generated_tokens": 3, "seed": None}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, status, body, headers):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            body = json.dumps(SEEN if self.path == "/seen" else {}).encode()
            self._send(200, body, {"Content-Type": "application/json"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            SEEN.append({k.lower(): v for k, v in self.headers.items()})
            if body["inputs"] == "invalid":
                error = {"error": "bad input", "error_type": "validation"}
                return self._send(422, json.dumps(error).encode(), {})
            if self.path == "/generate":
                answer = {"generated_text": "abc", "details": DETAILS}
                headers = {"Content-Type": "application/json", "x-prompt-tokens": "5",
                           "x-generated-tokens": "3"}
                return self._send(200, json.dumps(answer).encode(), headers)
            events = []
            for i in range(3):
                event = {"index": i, "token": {"id": i, "text": "a", "logprob": 0.0,
                                               "special": False},
                         "generated_text": "aaa" if i == 2 else None,
                         "details": {**DETAILS, "input_length": 5} if i == 2 else None}
                events.append(f"data:{json.dumps(event)}\\n\\n")
            self._send(200, "".join(events).encode(), {"Content-Type": "text/event-stream"})

    ThreadingHTTPServer((args.hostname, args.port), Handler).serve_forever()
    '''
)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tracing_stand_in") / "stand_in.py"
    path.write_text(STAND_IN)
    return path


def test_spans_join_the_callers_trace_and_their_context_reaches_the_launcher(stand_in):
    caller = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01", "authorization": "Bearer k"}
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 3, "details": True}}

    async def scenario(collector_url: str) -> list[dict]:
        cfg = ModelConfig(name="stand-in", model_id="org/stand-in")
        server = TGIServer.__new__(TGIServer)
        await server.__init__(cfg, command=[sys.executable, str(stand_in)],
                              tracing=TracingOptions(otlp_endpoint=collector_url))  # fmt: skip
        try:
            await server.call("POST", "/generate", body, caller)
            events = [e async for e in server.stream("/generate_stream", body, caller)]
            assert len(events) == 4  # the headers, then 3 token events
            with pytest.raises(TGIError):
                await server.call("POST", "/generate", {"inputs": "invalid"}, caller)
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{server._launcher.url}/seen")).json()
        finally:
            server.__del__()  # exports what is left

    with otlp_collector() as (url, collector):
        seen = asyncio.run(scenario(url))
        spans = collector.wait_for(lambda s: len(s) == 3, 10, "three spans exported")
    generate, stream, invalid = spans
    assert [s.name for s in spans] == ["POST /generate", "POST /generate_stream", "POST /generate"]
    for span in spans:
        assert span.kind == "CLIENT" and span.trace_id == TRACE_ID
        assert span.parent_span_id == CALLER_SPAN_ID
        assert span.attributes["inference.backend"] == "embedded"
        assert span.attributes["model_id"] == "org/stand-in"
        assert span.resource["service.name"] == "ray-tgi"
        assert span.resource["ray_tgi.component"] == "TGIServer:stand-in"
    for span in (generate, stream):
        assert span.attributes["gen_ai.usage.input_tokens"] == 5
        assert span.attributes["gen_ai.usage.output_tokens"] == 3
        assert span.attributes["gen_ai.response.finish_reasons"] == ("length",)
        assert span.status_code == 0
    assert invalid.attributes["error.type"] == "validation" and invalid.status_code == 2
    # The launcher got each span's own context (so a real TGI's spans are its children),
    # and the caller's credentials, as before.
    assert [h["traceparent"] for h in seen] == [f"00-{TRACE_ID}-{s.span_id}-01" for s in spans]
    assert all(h["authorization"] == "Bearer k" for h in seen)


def test_tracing_off_passes_the_callers_context_on_unchanged(stand_in):
    traceparent = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"

    async def scenario() -> list[dict]:
        server = TGIServer.__new__(TGIServer)
        await server.__init__(ModelConfig(name="s", model_id="s"),
                              command=[sys.executable, str(stand_in)])  # fmt: skip
        try:
            await server.call("POST", "/generate", {"inputs": "hi"}, {"traceparent": traceparent})
            await server.call("POST", "/generate", {"inputs": "hi"})
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{server._launcher.url}/seen")).json()
        finally:
            server.__del__()

    with_context, without = asyncio.run(scenario())
    # No span of ours: a traced launcher's spans join the caller's trace directly.
    assert with_context["traceparent"] == traceparent
    assert "traceparent" not in without
