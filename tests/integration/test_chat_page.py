"""The chat page at `GET /`, in headless Chromium (Playwright, Debian's chromium), against a
real cluster and the real engine: a streamed answer with its timings, the app's /stats, and
a Stop button that ends the engine's request.

Screenshots go to tests/integration/artifacts/ (ignored by git).
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect
from serve_cluster import FIRST, QUESTION, TINY, engines_idle, model_stats, wait_until

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts"
LONG_QUESTION = "Write a very long story about a dragon who learns to sail across the sea."
ANSWER_TIMEOUT_MS = 60_000


@pytest.fixture
def page(browser: Browser, two_model_app: str) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{two_model_app}/")
    expect(page.locator("#model option")).to_have_count(2)
    yield page
    page.close()
    assert errors == []
    outside = [url for url in requested if not url.startswith((two_model_app, "data:"))]
    assert outside == []  # the page fetches nothing from anywhere else


def _ask(page: Page, question: str, max_tokens: int, temperature: float) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.fill("#prompt", question)
    page.click("#send")


def test_a_question_gets_a_streamed_answer_with_its_timings(page: Page, two_model_app: str):
    assert page.locator("#model option").all_inner_texts() == [FIRST, TINY]
    # Count every change to the conversation's DOM: a streamed answer arrives in pieces.
    page.evaluate("""() => {
        window.numUpdates = 0;
        new MutationObserver(() => window.numUpdates++).observe(
            document.getElementById("messages"),
            {childList: true, characterData: true, subtree: true});
    }""")
    page.select_option("#model", TINY)
    _ask(page, QUESTION, max_tokens=32, temperature=0)
    expect(page.locator("#status")).to_have_text("done", timeout=ANSWER_TIMEOUT_MS)
    answer = page.locator(".message.assistant").last
    expect(answer).to_contain_text("Paris")
    num_tokens = int(page.inner_text("#num-tokens"))
    assert num_tokens > 1
    assert page.evaluate("window.numUpdates") >= num_tokens  # one DOM update per token
    assert page.inner_text("#ttft").endswith(" ms")
    assert float(page.inner_text("#tok-per-s")) > 0
    # The app's /stats, in the side table: one row per model, one running replica each.
    expect(page.locator("#stats tbody tr")).to_have_count(2)
    tiny_row = page.locator(f'#stats tr[data-model="{TINY}"] td')
    expect(tiny_row.nth(1)).to_have_text("1")
    expect(tiny_row.nth(2)).to_have_text("0")  # nothing queued
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_answer.png"), full_page=True)


def test_stop_ends_the_generation_in_the_engine(page: Page, two_model_app: str):
    wait_until(lambda: engines_idle(two_model_app), 30, "no request running before")
    page.select_option("#model", FIRST)
    max_tokens = 600
    _ask(page, LONG_QUESTION, max_tokens=max_tokens, temperature=0.8)
    wait_until(lambda: int(page.inner_text("#num-tokens")) >= 5, 60, "the answer streams")
    assert page.inner_text("#status") == "streaming"
    assert model_stats(two_model_app)[FIRST]["running_requests"] == 1

    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped")
    # The aborted fetch closed the connection; the ingress cancelled the call and the
    # engine dropped the request (600 tokens would take far longer than this wait).
    wait_until(lambda: engines_idle(two_model_app), 10, "the engine's request ended")
    num_tokens = int(page.inner_text("#num-tokens"))
    assert num_tokens < max_tokens
    page.wait_for_timeout(500)
    assert int(page.inner_text("#num-tokens")) == num_tokens  # nothing arrives after Stop
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_stopped.png"), full_page=True)


def test_static_files_and_the_compat_route_share_the_root(two_model_app: str):
    page = httpx.get(f"{two_model_app}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    script = httpx.get(f"{two_model_app}/static/chat.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{two_model_app}/static/nope.js").status_code == 404
    # TGI's compat route is still `POST /`.
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    answer = httpx.post(f"{two_model_app}/", json=body, timeout=60)
    assert answer.status_code == 200 and "generated_text" in answer.json()[0]
