"""Deployment options come from pure classmethods: asserted here without a cluster."""

import pytest
from ray.serve.config import AutoscalingConfig
from ray.serve.deployment import Application

from deployments.ingress import Ingress
from deployments.placement import launcher_env, unplaceable_models
from deployments.tgi_server import TGIServer
from serve_app.app import build_app
from serve_app.config import IngressOptions, ModelConfig


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "model_id": "org/m", **overrides})


def test_tgi_server_defaults():
    options = TGIServer.get_deployment_options(_cfg())
    router = options.pop("request_router_config")
    assert router.request_router_class == "deployments.router:TGIRequestRouter"
    assert router.request_routing_stats_period_s == 2.0
    assert router.request_router_kwargs == {"waiting_served_ratio": 0.3}  # TGI's default
    assert options == {
        "name": "TGIServer:m",
        "num_replicas": 1,
        "max_ongoing_requests": 128,  # TGI's default max_concurrent_requests
        "ray_actor_options": {"num_cpus": 1.0},
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 20,
    }


def test_the_router_is_told_the_engines_waiting_served_ratio():
    options = TGIServer.get_deployment_options(_cfg(launcher_args={"waiting_served_ratio": 1.2}))
    assert options["request_router_config"].request_router_kwargs == {"waiting_served_ratio": 1.2}


def test_autoscaling_on_engine_queues_replaces_a_fixed_replica_count():
    cfg = _cfg(
        deployment={
            "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_queued_per_replica": 4},
            "request_router": "power_of_two",
        }
    )
    options = TGIServer.get_deployment_options(cfg)
    assert "num_replicas" not in options
    assert "request_router_config" not in options  # Serve's default router
    autoscaling = options["autoscaling_config"]
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (0, 3)
    assert autoscaling.policy.policy_function == "deployments.autoscaling:EngineQueuePolicy"
    assert autoscaling.policy.policy_kwargs == {
        "target_queued_per_replica": 4,
        "target_batch_token_usage": 0.75,
    }
    with pytest.raises(ValueError, match="num_replicas or autoscaling"):
        _cfg(deployment={"num_replicas": 2, "autoscaling": {"max_replicas": 3}})
    with pytest.raises(ValueError, match="min_replicas"):
        _cfg(deployment={"autoscaling": {"min_replicas": 4, "max_replicas": 3}})


def test_autoscaling_delays_and_metric_windows_reach_serve():
    autoscaling = {"min_replicas": 0, "max_replicas": 2, "upscale_delay_s": 1,
                   "downscale_delay_s": 5, "downscale_to_zero_delay_s": 30,
                   "metrics_interval_s": 0.5, "look_back_period_s": 2}  # fmt: skip
    cfg = _cfg(deployment={"autoscaling": autoscaling})
    autoscaling = TGIServer.get_deployment_options(cfg)["autoscaling_config"]
    assert (autoscaling.upscale_delay_s, autoscaling.downscale_delay_s) == (1, 5)
    assert autoscaling.downscale_to_zero_delay_s == 30
    assert (autoscaling.metrics_interval_s, autoscaling.look_back_period_s) == (0.5, 2)
    # Unset, they are Serve's own defaults (to zero: the downscale delay).
    default = TGIServer.get_deployment_options(
        _cfg(deployment={"autoscaling": {"max_replicas": 2}})
    )["autoscaling_config"]
    serve_default = AutoscalingConfig()
    for name in ("upscale_delay_s", "downscale_delay_s", "downscale_to_zero_delay_s",
                 "metrics_interval_s", "look_back_period_s"):  # fmt: skip
        assert getattr(default, name) == getattr(serve_default, name), name
    with pytest.raises(ValueError, match="look_back_period_s"):
        _cfg(deployment={"autoscaling": {"max_replicas": 2, "metrics_interval_s": 5,
                                         "look_back_period_s": 5}})  # fmt: skip


def test_tgi_server_max_ongoing_follows_the_launcher_unless_set():
    cfg = _cfg(launcher_args={"max_concurrent_requests": 32})
    assert TGIServer.get_deployment_options(cfg)["max_ongoing_requests"] == 32
    cfg = _cfg(
        launcher_args={"max_concurrent_requests": 32}, deployment={"max_ongoing_requests": 8}
    )
    assert TGIServer.get_deployment_options(cfg)["max_ongoing_requests"] == 8


def test_a_sharded_replica_is_one_strict_pack_group_of_one_gpu_bundle_per_shard():
    cfg = _cfg(
        num_shard=4,
        resources={"num_cpus": 2, "num_gpus": 1},
        deployment={"num_replicas": 3, "health_check_period_s": 5},
    )
    options = TGIServer.get_deployment_options(cfg)
    # The replica actor fits in the first bundle, as Serve requires.
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert options["placement_group_bundles"] == [{"CPU": 2, "GPU": 1}] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["num_replicas"] == 3
    assert options["health_check_period_s"] == 5


def test_cpu_only_shards_get_cpu_bundles_and_one_shard_gets_no_group():
    options = TGIServer.get_deployment_options(_cfg(num_shard=2, resources={"num_cpus": 0.5}))
    assert options["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert options["ray_actor_options"] == {"num_cpus": 0.5}
    assert "placement_group_bundles" not in TGIServer.get_deployment_options(_cfg())


def test_unplaceable_models_names_what_one_replica_needs():
    nodes = [{"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}, {"CPU": 4}]
    fits = _cfg(name="fits", num_shard=4, resources={"num_gpus": 1})
    assert unplaceable_models([fits], nodes) == []
    too_big = _cfg(name="big", num_shard=8, resources={"num_gpus": 1})
    [message] = unplaceable_models([fits, too_big], nodes)
    assert message == (
        "model 'big' cannot be placed: one replica needs 8 CPU, 8 GPU on a single node "
        "(num_shard=8, STRICT_PACK), but the largest node has 4 GPUs (3 nodes alive)"
    )
    # One node with 8 GPUs holds it.
    assert unplaceable_models([too_big], [{"CPU": 16, "GPU": 8}]) == []


def test_the_launcher_sees_exactly_the_replica_gpus():
    env = launcher_env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, ["2", "3"])
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert launcher_env({"PATH": "/bin"}, []) == {"PATH": "/bin"}  # CPU: nothing to pin


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


def test_max_surge_reaches_serve_for_blue_green_updates():
    assert "max_surge_percent" not in TGIServer.get_deployment_options(_cfg())
    options = TGIServer.get_deployment_options(_cfg(deployment={"max_surge_percent": 100}))
    assert options["max_surge_percent"] == 100
    with pytest.raises(ValueError, match="less than or equal to 100"):
        _cfg(deployment={"max_surge_percent": 101})


def test_ingress_rollout_options_reach_serve_when_set():
    options = IngressOptions(graceful_shutdown_timeout_s=600, max_surge_percent=100)
    chosen = Ingress.get_deployment_options(options)
    assert (chosen["graceful_shutdown_timeout_s"], chosen["max_surge_percent"]) == (600, 100)
