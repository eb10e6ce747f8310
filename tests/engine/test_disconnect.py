"""A client that disconnects stops its generation at once, whatever it was waiting for: a
non-streaming /generate (before any response byte), a stream, or a body never finished.
Checked on a real engine process through its metrics: the request leaves the batch and every
KV block is free again, long before max_new_tokens would have been generated."""

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from benchmarks.common import engine_process

pytestmark = pytest.mark.slow

LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 900}}


@pytest.fixture(scope="module")
def engine_url(default_model_dir) -> Iterator[str]:
    flags = ["--model-id", str(default_model_dir), "--max-input-tokens", "64",
             "--max-total-tokens", "1024", "--max-batch-total-tokens", "2048"]  # fmt: skip
    with engine_process(flags) as url:
        yield url


def _metrics(url: str) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def _wait(url: str, predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate(_metrics(url)):
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def _drained(m: dict[str, float]) -> bool:
    return (m["tgi_batch_current_size"] == 0 and m["tgi_queue_size"] == 0
            and m["ray_tgi_kv_blocks_free"] == m["ray_tgi_kv_blocks_total"])  # fmt: skip


def _raw_request(url: str, path: str, body: bytes, declared_length: int | None = None):
    host, port = urlsplit(url).hostname, urlsplit(url).port
    sock = socket.create_connection((host, port), timeout=10)
    length = len(body) if declared_length is None else declared_length
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + body)
    return sock


def test_a_non_streaming_client_that_leaves_stops_its_generation(engine_url):
    sock = _raw_request(engine_url, "/generate", json.dumps(LONG).encode())
    _wait(engine_url, lambda m: m["tgi_batch_current_size"] == 1, 30, "the request runs")
    time.sleep(0.5)  # well into decoding; no response byte has been sent yet
    sock.settimeout(0)
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    sock.close()
    took = _wait(engine_url, _drained, 5, "the generation stopped and freed its blocks")
    print(f"\nnon-streaming request dropped {took:.2f} s after its client left")
    m = _metrics(engine_url)
    assert m["tgi_request_success"] == 0  # it was not run to the end


def test_a_stream_whose_client_leaves_stops(engine_url):
    with httpx.stream("POST", f"{engine_url}/generate_stream", json=LONG, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
    _wait(engine_url, _drained, 5, "the stream's generation stopped")


def test_a_body_never_finished_is_not_served_and_the_engine_goes_on(engine_url):
    before = _metrics(engine_url)["tgi_request_count"]
    sock = _raw_request(engine_url, "/generate", b'{"inputs": "Hel', declared_length=200)
    time.sleep(0.3)
    sock.close()
    time.sleep(0.3)
    assert _metrics(engine_url)["tgi_request_count"] == before
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    assert httpx.post(f"{engine_url}/generate", json=body, timeout=30).status_code == 200
    _wait(engine_url, _drained, 5, "the engine is idle")
