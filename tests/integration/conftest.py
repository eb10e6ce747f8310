"""Fixtures of the integration tests: a real cluster serving the real engine."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright
from serve_cluster import deploy_two_models, serve_cluster

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `make setup` installs it


@pytest.fixture(scope="module")
def two_model_app(default_model_dir) -> Iterator[str]:
    """One local Ray cluster per test module, serving examples/serve_config_two_models.yaml
    (whose model id resolves to `default_model_dir`, fetched first); yields its URL."""
    with serve_cluster() as url:
        deploy_two_models()
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, driven by Playwright (never a downloaded browser)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless"]
        )
        yield browser
        browser.close()
