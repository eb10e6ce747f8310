"""Where a TGIServer replica and its shards run: one placement group per replica.

A replica of a model with `num_shard` shards asks Serve for a STRICT_PACK placement group of
`num_shard` bundles, one per shard, so every shard of a replica lands on one node (NCCL
between shards stays inside a machine). The replica actor itself sits in bundle 0 and starts
the launcher; the launcher starts the shards as its own child processes, outside Ray. To hand
the launcher the GPUs of the other bundles, the replica places one tiny `ShardDevices` actor
in each of them: Ray gives that actor its bundle's GPU ids, and the actor lives as long as
the replica that owns it.
"""

import asyncio
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ray
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve_app.config import ModelConfig

Bundle = dict[str, float]


def shard_bundles(model_cfg: ModelConfig) -> list[Bundle]:
    """One bundle per shard: num_cpus (+ num_gpus) each; CPU-only bundles on CPU clusters."""
    bundle: Bundle = {"CPU": model_cfg.resources.num_cpus}
    if model_cfg.resources.num_gpus:
        bundle["GPU"] = model_cfg.resources.num_gpus
    return [dict(bundle) for _ in range(model_cfg.num_shard)]


def placement_options(model_cfg: ModelConfig) -> dict[str, Any]:
    """Serve deployment options that reserve a replica's shards (pure, for tests)."""
    if model_cfg.num_shard == 1:
        return {}  # the replica actor's own resources are the whole reservation
    return {
        "placement_group_bundles": shard_bundles(model_cfg),
        "placement_group_strategy": "STRICT_PACK",
    }


def unplaceable_models(
    models: Iterable[ModelConfig], node_resources: Iterable[Mapping[str, float]]
) -> list[str]:
    """One message per model whose replica fits on none of the nodes (a STRICT_PACK group
    needs all its bundles on one node); [] when every model fits somewhere."""
    nodes = list(node_resources)
    messages = []
    for model_cfg in models:
        need: dict[str, float] = {}
        for bundle in shard_bundles(model_cfg):
            for name, amount in bundle.items():
                need[name] = need.get(name, 0) + amount
        if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
            largest = max((node.get("GPU", 0) for node in nodes), default=0)
            messages.append(
                f"model {model_cfg.name!r} cannot be placed: one replica needs "
                f"{_describe(need)} on a single node (num_shard={model_cfg.num_shard}, "
                f"STRICT_PACK), but the largest node has {largest:g} GPUs "
                f"({len(nodes)} nodes alive)"
            )
    return messages


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def _describe(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items()))


@ray.remote(num_cpus=0)
class ShardDevices:
    """Holds one bundle's GPUs for as long as the replica that created it lives."""

    def gpu_ids(self) -> list[str]:
        return [str(gpu_id) for gpu_id in ray.get_gpu_ids()]


async def reserve_shard_gpus(model_cfg: ModelConfig) -> tuple[list[str], list[Any]]:
    """Inside a replica: the GPU ids of all its shards, in bundle order, and the actors
    that hold bundles 1..n-1 (keep them referenced: they die with their handles).

    The replica's own GPUs come first: Ray already put them in its CUDA_VISIBLE_DEVICES.
    """
    if not ray.is_initialized():  # the plain class, outside Serve (tests)
        return [], []
    own = [str(gpu_id) for gpu_id in ray.get_gpu_ids()]
    group = get_current_placement_group()
    if group is None or not model_cfg.resources.num_gpus:
        return own, []
    holders = [
        ShardDevices.options(
            num_gpus=model_cfg.resources.num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index
            ),
        ).remote()
        for index in range(1, model_cfg.num_shard)
    ]
    others = await asyncio.gather(*(holder.gpu_ids.remote() for holder in holders))
    return own + [gpu_id for ids in others for gpu_id in ids], holders


def launcher_env(base: Mapping[str, str] | None, gpu_ids: list[str]) -> dict[str, str]:
    """The launcher's environment: `base` (default os.environ) with exactly the replica's
    GPUs visible, so its shards use those and no others."""
    env = dict(os.environ if base is None else base)
    if gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    return env
