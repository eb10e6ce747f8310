"""EngineQueuePolicy, run the way Serve's controller runs a custom policy.

`Controller` below does what Serve 2.60's DeploymentAutoscalingState does each tick:
instantiate the policy class from `AutoscalingPolicy` with its `policy_kwargs`, wrap it in
Serve's own cold-start / scaling-factor / delay logic, keep the policy state, clamp to
min/max. Serve's delay logic reads `time.time()`, so the clock is patched there.
"""

from types import SimpleNamespace

import pytest
import ray.serve.autoscaling_policy as serve_autoscaling_policy
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from deployments.autoscaling import (
    ENGINE_BATCH_TOKEN_USAGE,
    ENGINE_QUEUED_REQUESTS,
    EngineQueuePolicy,
)

DEPLOYMENT = DeploymentID(name="TGIServer:m", app_name="default")


def config(**overrides) -> AutoscalingConfig:
    options = {
        "min_replicas": 1,
        "max_replicas": 4,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
        "policy": AutoscalingPolicy(
            policy_function="deployments.autoscaling:EngineQueuePolicy",
            policy_kwargs={"target_queued_per_replica": 2, "target_batch_token_usage": 0.75},
        ),
    }
    return AutoscalingConfig(**{**options, **overrides})


def context(
    cfg: AutoscalingConfig,
    num_replicas: int,
    queued: list[float] | None = None,  # engine-queued requests, one per reporting replica
    usage: list[float] | None = None,  # batch token usage, one per reporting replica
    handle_queued: float = 0.0,
    ongoing: float | None = None,  # Serve's ongoing requests; default: everything queued
    policy_state: dict | None = None,
    now: float = 0.0,
) -> AutoscalingContext:
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(num_replicas)]
    metrics = {}
    if queued is not None:
        metrics[ENGINE_QUEUED_REQUESTS] = dict(zip(replicas, queued, strict=False))
    if usage is not None:
        metrics[ENGINE_BATCH_TOKEN_USAGE] = dict(zip(replicas, usage, strict=False))
    if ongoing is None:
        ongoing = handle_queued + sum(queued or [])
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=num_replicas,
        target_num_replicas=num_replicas,
        running_replicas=replicas,
        total_num_requests=ongoing,
        total_queued_requests=handle_queued,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=cfg.min_replicas,
        capacity_adjusted_max_replicas=cfg.max_replicas,
        policy_state=policy_state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=cfg,
    )


class Controller:
    """One deployment's autoscaling loop, ticking on a fake clock; replicas start at once."""

    def __init__(self, cfg: AutoscalingConfig, num_replicas: int, monkeypatch):
        self.cfg = cfg
        self.num_replicas = num_replicas
        self.now = 0.0
        self._policy = _apply_autoscaling_config(_resolve_policy_callable(cfg.policy))
        self._state: dict = {}
        monkeypatch.setattr(serve_autoscaling_policy, "time", SimpleNamespace(time=self._time))

    def _time(self) -> float:
        return self.now

    def tick(self, seconds: float = 10.0, **signals) -> int:
        """Advance the clock, run the policy on these signals, return the new target."""
        self.now += seconds
        ctx = context(
            self.cfg, self.num_replicas, policy_state=self._state, now=self.now, **signals
        )
        desired, self._state = self._policy(ctx)
        self.num_replicas = max(self.cfg.min_replicas, min(self.cfg.max_replicas, desired))
        return self.num_replicas


def test_a_sustained_queue_scales_1_to_2_after_the_upscale_delay(monkeypatch):
    controller = Controller(config(), num_replicas=1, monkeypatch=monkeypatch)
    # 3 waiting on one replica, target 2: 1.5 replicas wanted, so 2.
    assert [controller.tick(queued=[3]) for _ in range(3)] == [1, 1, 1]  # t = 10..30 s
    assert controller.tick(queued=[3]) == 2  # 30 s after the first "up" decision


def test_a_queue_that_drains_before_the_delay_scales_nothing(monkeypatch):
    controller = Controller(config(), num_replicas=1, monkeypatch=monkeypatch)
    assert controller.tick(queued=[3]) == 1
    assert controller.tick(queued=[1], usage=[0.7]) == 1  # hold: the timer resets
    assert [controller.tick(queued=[3]) for _ in range(3)] == [1, 1, 1]


def test_idle_replicas_scale_down_after_the_downscale_delay(monkeypatch):
    controller = Controller(config(), num_replicas=2, monkeypatch=monkeypatch)
    targets = [controller.tick(seconds=100, queued=[0, 0], usage=[0, 0]) for _ in range(7)]
    assert targets == [2, 2, 2, 2, 2, 2, 1]  # first "down" at 100 s, taken at 700 s


def test_full_batches_keep_their_replicas_with_an_empty_queue(monkeypatch):
    controller = Controller(config(), num_replicas=2, monkeypatch=monkeypatch)
    # 2 x 0.6 of the KV budget = 1.6 replicas at the 0.75 target: still 2.
    for _ in range(10):
        assert controller.tick(seconds=100, queued=[0, 0], usage=[0.6, 0.6]) == 2


def test_a_request_waiting_at_zero_replicas_starts_one_at_once(monkeypatch):
    controller = Controller(config(min_replicas=0), num_replicas=0, monkeypatch=monkeypatch)
    assert controller.tick(handle_queued=0) == 0
    assert controller.tick(handle_queued=1) == 1
    # The policy agrees when asked directly (Serve's cold start answers before it).
    policy = EngineQueuePolicy(target_queued_per_replica=2)
    assert policy(context(config(min_replicas=0), 0, handle_queued=1))[0] == 1


def test_the_last_replica_goes_after_the_downscale_to_zero_delay(monkeypatch):
    cfg = config(min_replicas=0, downscale_to_zero_delay_s=60.0)
    controller = Controller(cfg, num_replicas=1, monkeypatch=monkeypatch)
    assert [controller.tick(seconds=30, queued=[0], usage=[0]) for _ in range(3)] == [1, 1, 0]


def test_desired_replicas_stay_within_min_and_max(monkeypatch):
    policy = EngineQueuePolicy(target_queued_per_replica=2)
    flooded = context(config(), 2, queued=[50, 50], handle_queued=20)
    assert policy(flooded)[0] == 4  # max_replicas
    idle = context(config(min_replicas=2), 3, queued=[0, 0, 0], usage=[0, 0, 0])
    assert policy(idle)[0] == 2  # min_replicas
    controller = Controller(config(upscale_delay_s=0), num_replicas=2, monkeypatch=monkeypatch)
    assert controller.tick(queued=[50, 50]) == 4


def test_requests_queued_at_the_handles_count_as_queued():
    policy = EngineQueuePolicy(target_queued_per_replica=2)
    # 1 per replica in the engines + 6 waiting for any replica: 4 per replica, twice target.
    assert policy(context(config(), 2, queued=[1, 1], handle_queued=6))[0] == 4


def test_serves_default_policy_decides_until_engines_report():
    cfg = config(target_ongoing_requests=2)
    policy = EngineQueuePolicy()
    # No engine metrics yet: Serve's rule, 1 replica * 6 ongoing / 2 target = 3.
    assert policy(context(cfg, 1, ongoing=6))[0] == 3


def test_policy_kwargs_reach_the_policy_and_are_checked():
    policy = _resolve_policy_callable(config().policy)
    assert isinstance(policy, EngineQueuePolicy)
    assert (policy.target_queued_per_replica, policy.target_batch_token_usage) == (2, 0.75)
    with pytest.raises(ValueError):
        EngineQueuePolicy(target_queued_per_replica=0)
