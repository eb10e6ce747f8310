"""`serve run serve_config.yaml` as a user runs it: real Ray, real engine, real clients.

One `serve run` (one Ray cluster) for the whole module, in each of two modes:
  - proxy: Serve's defaults; clients go through Serve's HTTP proxy on port 8000;
  - direct: `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` for the whole run, and clients go straight to
    the ingress replica, which then serves HTTP itself on port 30000 (README "Lowest
    latency"); the proxy keeps serving port 8000.
The tests run in file order; the last one stops the run with SIGINT and checks that nothing
it started is left running.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI
from text_generation import Client

from benchmarks.serve_vs_direct import serve_url

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE = Path(sys.executable).with_name("serve")
PROXY_URL = "http://127.0.0.1:8000"
DIRECT_INGRESS_PORT = 30000  # RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT's default
MODES = {  # mode -> (environment of the run, where clients send requests)
    "proxy": ({}, PROXY_URL),
    "direct": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, f"http://127.0.0.1:{DIRECT_INGRESS_PORT}"),
}
MODEL = "smollm2"
QUESTION = "What is the capital of France?"
# The chat template applied by hand, for the TGI routes (they take a raw prompt).
CHAT_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
STARTUP_TIMEOUT_S = 240
# Every process this run starts inherits it (Ray passes the driver's environment on).
RUN_MARKER = "RAY_TGI_TEST_SERVE_RUN"


@dataclass
class ServeRun:
    process: subprocess.Popen
    url: str  # where clients send requests in this mode
    run_id: str
    log_path: Path
    started_at: float
    seconds_to_first_answer: float = 0.0
    descendants: list[psutil.Process] = field(default_factory=list)

    def log_tail(self, num_lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])


def _processes_of_run(run_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(RUN_MARKER) == run_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _is_engine(proc: psutil.Process) -> bool:
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    return any(a == "-m" and b == "engine" for a, b in zip(cmdline, cmdline[1:], strict=False))


def _first_answer(run: ServeRun) -> None:
    """Wait (bounded) until /health answers 200 and a chat completion succeeds."""
    deadline = run.started_at + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            if run.process.poll() is not None:
                pytest.fail(f"serve run exited with {run.process.returncode}:\n{run.log_tail()}")
            try:
                if client.get(f"{run.url}/health").status_code == 200:
                    request = {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": QUESTION}],
                        "max_tokens": 16,
                    }
                    answer = client.post(f"{run.url}/v1/chat/completions", json=request)
                    if answer.status_code == 200:
                        run.seconds_to_first_answer = time.monotonic() - run.started_at
                        return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(1)
    pytest.fail(f"no answer within {STARTUP_TIMEOUT_S} s:\n{run.log_tail()}")


@pytest.fixture(scope="module", params=list(MODES))
def serve_run(request, tmp_path_factory) -> Iterator[ServeRun]:
    for port in (8000, DIRECT_INGRESS_PORT):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is already in use; stop the other server first")
    mode_env, url = MODES[request.param]
    run_id = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster
    env.update(mode_env, **{RUN_MARKER: run_id})
    log_path = tmp_path_factory.mktemp("serve_run") / "serve_run.log"
    with open(log_path, "wb") as log:
        run = ServeRun(
            process=subprocess.Popen(
                [str(SERVE), "run", "serve_config.yaml"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # out of reach of the terminal's Ctrl-C
            ),
            url=url,
            run_id=run_id,
            log_path=log_path,
            started_at=time.monotonic(),
        )
    try:
        _first_answer(run)
        yield run
    finally:
        if run.process.poll() is None:  # a test failed before the shutdown test
            run.process.send_signal(signal.SIGINT)
            try:
                run.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.process.kill()
        for proc in _processes_of_run(run_id):
            proc.kill()


def test_time_to_first_answer(serve_run, capsys):
    with capsys.disabled():
        print(f"\nserve run -> first answer: {serve_run.seconds_to_first_answer:.1f} s")
    assert serve_run.seconds_to_first_answer < STARTUP_TIMEOUT_S


def _listener(port: int) -> str:
    """The command line of the process listening on `port` ("" if none)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return " ".join(psutil.Process(conn.pid).cmdline())
    return ""


def test_who_answers_the_clients(serve_run):
    assert httpx.get(f"{PROXY_URL}/health").status_code == 200  # in both modes
    assert "ProxyActor" in _listener(8000)
    if serve_run.url == PROXY_URL:
        assert _listener(DIRECT_INGRESS_PORT) == ""
    else:  # nothing between the client and the ingress replica
        assert "ServeReplica:ray-tgi:Ingress" in _listener(DIRECT_INGRESS_PORT)
        # ... and the benchmarks' --direct-ingress finds that port
        assert serve_url(serve_run.process, direct_ingress=True) == serve_run.url


def test_models_and_info(serve_run):
    models = httpx.get(f"{serve_run.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(f"{serve_run.url}/info").json()["max_total_tokens"] == 2048


def test_openai_client(serve_run):
    client = OpenAI(base_url=f"{serve_run.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=32
    )
    assert "Paris" in answer.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=32, stream=True
    )
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 1
    assert "Paris" in "".join(chunks)
    completion = client.completions.create(
        model=MODEL, prompt=CHAT_PROMPT, temperature=0, max_tokens=32
    )
    assert "Paris" in completion.choices[0].text
    stream = client.completions.create(
        model=MODEL, prompt=CHAT_PROMPT, temperature=0, max_tokens=32, stream=True
    )
    assert "Paris" in "".join(c.choices[0].text for c in stream)


def test_text_generation_client(serve_run):
    client = Client(serve_run.url, timeout=120)
    answer = client.generate(CHAT_PROMPT, max_new_tokens=32)
    assert "Paris" in answer.generated_text
    tokens = [r.token.text for r in client.generate_stream(CHAT_PROMPT, max_new_tokens=32)]
    assert len(tokens) > 1
    assert "Paris" in "".join(tokens)


def test_tgi_routes_stream_and_errors(serve_run):
    request = {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 32}}
    answer = httpx.post(f"{serve_run.url}/generate", json=request, timeout=120)
    assert answer.status_code == 200 and "Paris" in answer.json()["generated_text"]
    with httpx.stream("POST", f"{serve_run.url}/generate_stream", json=request, timeout=120) as r:
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data:{") for e in events)  # TGI's framing; no [DONE]
    assert r.headers["x-compute-type"] == "cpu"  # the engine's headers pass through
    assert '"generated_text":' in events[-1] and "Paris" in events[-1]
    too_long = {"inputs": "x " * 5000, "parameters": {"max_new_tokens": 8}}
    error = httpx.post(f"{serve_run.url}/generate", json=too_long, timeout=60)
    assert error.status_code == 422
    assert error.json()["error_type"] == "validation"


def test_the_ingress_passes_tgis_contract_through(serve_run):
    body = {"inputs": CHAT_PROMPT, "parameters": {
        "max_new_tokens": 20, "details": True, "decoder_input_details": True,
        "top_n_tokens": 2}}  # fmt: skip
    answer = httpx.post(f"{serve_run.url}/generate", json=body, timeout=120)
    details = answer.json()["details"]
    assert answer.json()["generated_text"] == "The capital of France is Paris."
    assert len(details["prefill"]) == 16 and len(details["top_tokens"]) == 8
    assert answer.headers["x-generated-tokens"] == "8"  # TGI's headers survive the hops
    bad = httpx.post(f"{serve_run.url}/generate", json={"inputs": "Hi", "parameters": {"top_k": 0}})
    assert bad.status_code == 422
    assert bad.json() == {"error": "Input validation error: `top_k` must be strictly positive",
                          "error_type": "validation"}  # fmt: skip
    tokens = httpx.post(f"{serve_run.url}/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["text"] for t in tokens] == ["Hello", " world"]
    chat = {"messages": [{"role": "user", "content": QUESTION}]}
    templated = httpx.post(f"{serve_run.url}/chat_tokenize", json=chat).json()["templated_text"]
    assert templated.endswith(CHAT_PROMPT)  # after the template's default system prompt
    assert httpx.get(f"{serve_run.url}/docs").status_code == 200
    assert "/generate_stream" in httpx.get(f"{serve_run.url}/api-doc/openapi.json").json()["paths"]
    # The app's /metrics: the engine's TGI metrics (TGI's names) labelled with model and
    # replica, and the ingress's own; tests/integration/test_observability.py counts them.
    metrics = httpx.get(f"{serve_run.url}/metrics").text.splitlines()
    assert "# TYPE tgi_request_count counter" in metrics
    assert any(line.startswith('tgi_batch_inference_count{model="smollm2",replica="')
               for line in metrics)  # fmt: skip
    series = 'ray_tgi_ingress_requests_total{model="smollm2",route="/generate",status="%s"} '
    assert any(line.startswith(series % "200") for line in metrics)
    assert any(line.startswith(series % "422") for line in metrics)


def test_huggingface_hub_client_through_the_ingress(serve_run):
    from huggingface_hub import InferenceClient

    client = InferenceClient(serve_run.url)
    assert "Paris" in client.text_generation(CHAT_PROMPT, max_new_tokens=20)
    chat = client.chat_completion([{"role": "user", "content": QUESTION}], max_tokens=20,
                                  temperature=0)  # fmt: skip
    assert "Paris" in chat.choices[0].message.content


def test_sigint_stops_everything(serve_run):
    root = psutil.Process(serve_run.process.pid)
    descendants = root.children(recursive=True)
    engines = [p for p in descendants if _is_engine(p)]
    assert len(engines) == 1, [p.cmdline() for p in descendants]
    assert _processes_of_run(serve_run.run_id)  # the marker check below sees this run

    serve_run.process.send_signal(signal.SIGINT)  # what `kill -INT` does; Ctrl-C would
    serve_run.process.wait(timeout=120)  # also reach the Ray processes in its group
    _, alive = psutil.wait_procs(descendants, timeout=30)
    leftovers = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == [], [p.cmdline() for p in leftovers]
    leftovers = _processes_of_run(serve_run.run_id)
    assert leftovers == [], [p.cmdline() for p in leftovers]
    assert not any(_is_engine(p) for p in leftovers)
