"""Deployment options come from pure classmethods: asserted here without a cluster."""

import pytest
from ray.serve.deployment import Application

from deployments.ingress import Ingress
from deployments.tgi_server import TGIServer
from serve_app.app import build_app
from serve_app.config import IngressOptions, ModelConfig


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "model_id": "org/m", **overrides})


def test_tgi_server_defaults():
    assert TGIServer.get_deployment_options(_cfg()) == {
        "name": "TGIServer:m",
        "num_replicas": 1,
        "max_ongoing_requests": 128,  # TGI's default max_concurrent_requests
        "ray_actor_options": {"num_cpus": 1.0},
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 20,
    }


def test_tgi_server_max_ongoing_follows_the_launcher_unless_set():
    cfg = _cfg(launcher_args={"max_concurrent_requests": 32})
    assert TGIServer.get_deployment_options(cfg)["max_ongoing_requests"] == 32
    cfg = _cfg(
        launcher_args={"max_concurrent_requests": 32}, deployment={"max_ongoing_requests": 8}
    )
    assert TGIServer.get_deployment_options(cfg)["max_ongoing_requests"] == 8


def test_tgi_server_reserves_every_shard_gpu_on_the_replica():
    cfg = _cfg(
        num_shard=4,
        resources={"num_cpus": 2, "num_gpus": 1},
        deployment={"num_replicas": 3, "health_check_period_s": 5},
    )
    options = TGIServer.get_deployment_options(cfg)
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 4}
    assert options["num_replicas"] == 3
    assert options["health_check_period_s"] == 5


def test_ingress_options():
    assert Ingress.get_deployment_options(IngressOptions(num_cpus=0.1)) == {
        "name": "Ingress",
        "num_replicas": 1,
        "max_ongoing_requests": 1024,
        "ray_actor_options": {"num_cpus": 0.1},
    }


def test_build_app_composes_without_a_cluster():
    app = build_app(
        {"models": [{"name": "a", "model_id": "org/a"}, {"name": "b", "model_id": "b"}]}
    )
    assert isinstance(app, Application)


def test_build_app_rejects_bad_args():
    with pytest.raises(ValueError, match="launcher_args.port"):
        build_app({"models": [{"name": "a", "model_id": "x", "launcher_args": {"port": 1}}]})
