"""Fixtures of the integration tests: a real cluster serving the real engine."""

from collections.abc import Iterator

import pytest
from serve_cluster import deploy_two_models, serve_cluster


@pytest.fixture(scope="module")
def two_model_app(default_model_dir) -> Iterator[str]:
    """One local Ray cluster per test module, serving examples/serve_config_two_models.yaml
    (whose model id resolves to `default_model_dir`, fetched first); yields its URL."""
    with serve_cluster() as url:
        deploy_two_models()
        yield url
