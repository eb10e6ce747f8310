"""Autoscaling TGIServer on the engines' queues: a custom Serve autoscaling policy.

Wiring (Ray Serve 2.60):

    AutoscalingConfig(
        min_replicas=0, max_replicas=4, upscale_delay_s=30, downscale_delay_s=600,
        policy=AutoscalingPolicy(
            policy_function="deployments.autoscaling:EngineQueuePolicy",
            policy_kwargs={"target_queued_per_replica": 2, "target_batch_token_usage": 0.75},
        ),
    )

- `policy_kwargs` reach a policy only when `policy_function` names a *class*: the
  controller instantiates it once with them and calls the instance every control-loop
  tick. A plain function gets no kwargs, hence the class.
- Serve wraps every custom policy in the same steps as its default one: the cold start
  (0 replicas and a request waiting → `ceil(upscaling_factor)` replicas at once, the policy
  not even asked), upscaling/downscaling factors, `upscale_delay_s` / `downscale_delay_s` /
  `downscale_to_zero_delay_s`, and finally the min/max bounds (capacity-adjusted). So the
  policy returns the replica count it wants *now* and must not delay anything itself.
- `AutoscalingConfig.policy` is cloudpickled *by value* into the Serve controller, which
  does not have this project on its path: this module may import only ray and the
  standard library. The metric names below are imported from here by the replica side.
"""

import math
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

# Custom metrics each TGIServer replica returns from `record_autoscaling_stats`.
ENGINE_QUEUED_REQUESTS = "engine_queued_requests"  # requests waiting for the engine's batch
ENGINE_BATCH_TOKEN_USAGE = "engine_batch_token_usage"  # batch reserved tokens / KV capacity


class EngineQueuePolicy:
    """Desired replicas = the more of
    - queue:  replicas * (engine-queued per replica / target_queued_per_replica), with
      requests still queued at the handles (waiting for any replica) counted too;
    - batch:  sum of the replicas' batch token usage / target_batch_token_usage, the
      replicas the running batches would keep busy, so an empty queue does not scale
      away replicas whose batches are full.
    Both are Serve's proportional rule (its default policy is replicas * ongoing /
    target_ongoing_requests) on engine signals instead of request counts. Until any
    replica has reported the engine metrics, Serve's default policy decides.
    """

    def __init__(
        self, target_queued_per_replica: float = 2.0, target_batch_token_usage: float = 0.75
    ):
        if target_queued_per_replica <= 0 or not 0 < target_batch_token_usage <= 1:
            raise ValueError(
                "target_queued_per_replica must be > 0 and target_batch_token_usage in (0, 1]"
            )
        self.target_queued_per_replica = target_queued_per_replica
        self.target_batch_token_usage = target_batch_token_usage

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        queued_by_replica = metrics.get(ENGINE_QUEUED_REQUESTS, {})
        usage_by_replica = metrics.get(ENGINE_BATCH_TOKEN_USAGE, {})
        handle_queued = ctx.total_queued_requests or 0.0
        num_replicas = ctx.current_num_replicas
        if num_replicas == 0:
            # Serve's cold start answers first when anything waits; this covers a direct call.
            desired = math.ceil(handle_queued / self.target_queued_per_replica)
            if ctx.total_num_requests > 0:
                desired = max(desired, 1)
            return _clamp(desired, ctx), {}
        if not queued_by_replica:
            desired, _ = replica_queue_length_autoscaling_policy(ctx)
            return _clamp(desired, ctx), {}
        # Replicas that have not reported yet (just started) count as the average.
        mean_queued = sum(queued_by_replica.values()) / len(queued_by_replica)
        queued_per_replica = mean_queued + handle_queued / num_replicas
        by_queue = num_replicas * queued_per_replica / self.target_queued_per_replica
        by_batch = 0.0
        if usage_by_replica:
            mean_usage = sum(usage_by_replica.values()) / len(usage_by_replica)
            by_batch = num_replicas * mean_usage / self.target_batch_token_usage
        return _clamp(max(by_queue, by_batch), ctx), {}


def _clamp(desired: float, ctx: AutoscalingContext) -> float:
    # Serve clamps again after its delay logic; clamping first keeps that logic from
    # timing a move it could never make (e.g. "up" while already at max_replicas).
    return min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
