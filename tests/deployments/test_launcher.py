"""Launcher and TGIServer against a real child process: a small stand-in TGI server.

The stand-in speaks the part of TGI's HTTP API the Serve layer uses, so these tests run in
seconds with no model and no Ray.
"""

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from deployments.errors import TGIError
from deployments.launcher import Launcher, LauncherError, embedded_env, launcher_command
from deployments.tgi_server import TGIServer
from serve_app.config import ModelConfig

STAND_IN = textwrap.dedent(
    '''
    """A stand-in TGI server: canned answers, TGI's error shapes, disconnect counting."""
    import argparse, json, os, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--hostname")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mode", default="ok")  # ok | crash | unhealthy | stubborn
    args, _ = parser.parse_known_args()
    print("stand-in starting", " ".join(sys.argv[1:]), flush=True)
    if args.mode == "crash":
        for i in range(40):
            print(f"loading line {i}", flush=True)
        print("fatal: no such model", flush=True)
        sys.exit(3)
    if args.mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A grandchild in the same process group, like a shard process.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    TOKENS = ["The", " capital", " of", " France", " is", " Paris", "."]
    STATS = {"disconnects": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _json(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self):
            return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

        def do_GET(self):
            if self.path == "/health":
                self._json(503 if args.mode == "unhealthy" else 200, {})
            elif self.path == "/info":
                self._json(200, {"model_id": "stand-in", "max_total_tokens": 2048})
            elif self.path == "/stats":
                self._json(200, STATS)
            else:
                self._json(404, {"error": "not found", "error_type": "not_found"})

        def do_POST(self):
            body = self._body()
            prompt = body.get("inputs") or body["messages"][-1]["content"]
            if prompt == "invalid":
                return self._json(422, {"error": "bad input", "error_type": "validation"})
            if prompt == "busy":
                return self._json(429, {"error": "busy", "error_type": "overloaded"})
            if self.path == "/generate":
                return self._json(200, {"generated_text": "".join(TOKENS)})
            if self.path == "/v1/chat/completions" and not body.get("stream"):
                message = {"role": "assistant", "content": "".join(TOKENS)}
                return self._json(200, {"object": "chat.completion",
                                        "choices": [{"index": 0, "message": message}]})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chat = self.path == "/v1/chat/completions"
            n = 10_000 if prompt == "endless" else len(TOKENS)
            try:
                for i in range(n):
                    if prompt == "fail-mid-stream" and i == 2:
                        err = {"error": "oom", "error_type": "generation"}
                        self.wfile.write(f"data:{json.dumps(err)}\\n\\n".encode())
                        break
                    text = TOKENS[i % len(TOKENS)]
                    if chat:
                        event = {"choices": [{"index": 0, "delta": {"content": text}}]}
                        line = f"data: {json.dumps(event)}\\n\\n"
                    else:
                        event = {"index": i, "token": {"id": i, "text": text,
                                                       "logprob": 0.0, "special": False}}
                        if i == n - 1:  # "long": a last event longer than read buffers
                            long = prompt == "long"
                            event["generated_text"] = "x" * 300_000 if long else "".join(TOKENS)
                        line = f"data:{json.dumps(event)}\\n\\n"
                    self.wfile.write(line.encode())
                    self.wfile.flush()
                    time.sleep(0.05 if prompt == "endless" else 0)
                if chat:
                    self.wfile.write(b"data: [DONE]\\n\\n")
                self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):
                STATS["disconnects"] += 1
                self.close_connection = True

    ThreadingHTTPServer((args.hostname, args.port), Handler).serve_forever()
    '''
)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stand_in") / "stand_in.py"
    path.write_text(STAND_IN)
    return path


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


# --- Launcher ---------------------------------------------------------------------------


def test_launcher_command_for_each_engine():
    assert launcher_command("embedded", ["--num-shard", "1"]) == [
        sys.executable,
        "-m",
        "engine",
        "--num-shard",
        "1",
    ]
    assert launcher_command("tgi", ["--num-shard", "2"])[0] == "text-generation-launcher"
    root = str(Path(__file__).resolve().parents[2])
    assert embedded_env({"PYTHONPATH": "/x"})["PYTHONPATH"].split(os.pathsep) == [root, "/x"]


def test_start_healthy_then_stop_leaves_no_process(stand_in):
    launcher = Launcher([sys.executable, str(stand_in)])
    launcher.start()
    try:
        launcher.wait_until_healthy(timeout_s=30)
        assert httpx.get(f"{launcher.url}/info").json()["model_id"] == "stand-in"
        pgid = launcher.pid
        assert len(_group_members(pgid)) == 2  # the server and its "shard" grandchild
        assert "stand-in starting" in launcher.tail()
    finally:
        launcher.stop(grace_s=5)
    assert launcher.returncode is not None
    assert _group_members(pgid) == []
    assert "--port" in launcher.log_path.read_text()


def test_exit_before_healthy_raises_with_last_log_lines(stand_in):
    launcher = Launcher([sys.executable, str(stand_in), "--mode", "crash"])
    launcher.start()
    with pytest.raises(LauncherError) as info:
        launcher.wait_until_healthy(timeout_s=30)
    message = str(info.value)
    assert "exited with status 3" in message
    assert "fatal: no such model" in message
    assert "loading line 39" in message and "loading line 5\n" not in message  # ~30 lines
    launcher.stop()


def test_not_healthy_in_time_raises(stand_in):
    launcher = Launcher([sys.executable, str(stand_in), "--mode", "unhealthy"])
    launcher.start()
    try:
        start = time.monotonic()
        with pytest.raises(LauncherError, match="not healthy after 2 s"):
            launcher.wait_until_healthy(timeout_s=2, poll_s=0.2)
        assert time.monotonic() - start < 10
    finally:
        launcher.stop(grace_s=5)


def test_stop_kills_a_group_that_ignores_sigterm(stand_in):
    launcher = Launcher([sys.executable, str(stand_in), "--mode", "stubborn"])
    launcher.start()
    launcher.wait_until_healthy(timeout_s=30)
    pgid = launcher.pid
    start = time.monotonic()
    launcher.stop(grace_s=1)
    assert 1 <= time.monotonic() - start < 10
    assert launcher.returncode == -signal.SIGKILL
    assert _group_members(pgid) == []


# --- TGIServer over a real child process (no Ray: the plain class) ------------------------


def _run(coro):
    return asyncio.run(coro)


async def _server(stand_in: Path) -> TGIServer:
    cfg = ModelConfig(name="stand-in", model_id="stand-in")
    server = TGIServer.__new__(TGIServer)
    await server.__init__(cfg, command=[sys.executable, str(stand_in)])
    return server


def test_tgi_server_routes_and_errors(stand_in):
    async def scenario():
        server = await _server(stand_in)
        try:
            await server.check_health()
            reply = await server.call("POST", "/generate", {"inputs": "hi"})
            assert json.loads(reply.body)["generated_text"].endswith("Paris.")
            assert reply.content_type.startswith("application/json")
            headers, *events = [e async for e in server.stream("/generate_stream",
                                                               {"inputs": "hi"})]  # fmt: skip
            assert isinstance(headers, dict)  # the launcher's x-* headers come first
            assert all(e.startswith("data:") and e.endswith("\n\n") for e in events)
            tokens = [json.loads(e[5:])["token"]["text"] for e in events]
            assert "".join(tokens) == "The capital of France is Paris."
            _, *events = [e async for e in server.stream("/generate_stream", {"inputs": "long"})]
            assert len(json.loads(events[-1][5:])["generated_text"]) == 300_000  # one line
            chat = {"messages": [{"role": "user", "content": "hi"}]}
            answer = json.loads((await server.call("POST", "/v1/chat/completions", chat)).body)
            assert "Paris" in answer["choices"][0]["message"]["content"]
            stream = server.stream("/v1/chat/completions", {**chat, "stream": True})
            _, *events = [e async for e in stream]
            assert events[-1] == "data: [DONE]\n\n" and events[0].startswith("data: {")
            info = json.loads((await server.call("GET", "/info")).body)
            assert info["model_id"] == "stand-in"

            with pytest.raises(TGIError) as error:
                await server.call("POST", "/shutdown", {})
            assert error.value.status_code == 404  # only the launcher's API is forwarded
            with pytest.raises(TGIError) as error:
                await server.call("POST", "/generate", {"inputs": "invalid"})
            assert (error.value.status_code, error.value.error_type) == (422, "validation")
            with pytest.raises(TGIError) as error:
                async for _ in server.stream("/generate_stream", {"inputs": "busy"}):
                    pass
            assert (error.value.status_code, error.value.error_type) == (429, "overloaded")
            # An error after the stream started arrives as an event, passed through as is.
            failing = server.stream("/generate_stream", {"inputs": "fail-mid-stream"})
            _, *events = [e async for e in failing]
            assert len(events) == 3
            assert json.loads(events[-1][5:])["error_type"] == "generation"
        finally:
            server.__del__()
        with pytest.raises(LauncherError, match="exited"):
            await server.check_health()

    _run(scenario())


def test_tgi_server_closing_a_stream_disconnects_the_engine(stand_in):
    async def scenario():
        server = await _server(stand_in)
        try:
            stream = server.stream("/generate_stream", {"inputs": "endless"})
            await anext(stream)  # the headers
            assert json.loads((await anext(stream))[5:])["index"] == 0
            await stream.aclose()  # what Serve does when the caller cancels
            for _ in range(50):  # the engine notices at its next write
                stats = httpx.get(f"{server._launcher.url}/stats").json()
                if stats["disconnects"] == 1:
                    break
                await asyncio.sleep(0.1)
            assert stats["disconnects"] == 1
        finally:
            server.__del__()

    _run(scenario())


def test_a_missing_tgi_launcher_is_a_clear_error(tmp_path):
    launcher = Launcher(launcher_command("tgi", ["--model-id", "x"]), env={"PATH": str(tmp_path)})
    with pytest.raises(
        LauncherError, match=rf"text-generation-launcher is not on PATH \({tmp_path}\)"
    ):
        launcher.start()
    launcher.stop()  # nothing started: a no-op
