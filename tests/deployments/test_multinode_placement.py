"""Sharded replicas on a simulated multi-node cluster (ray.cluster_utils.Cluster, fake GPUs).

Two worker nodes with 4 fake GPUs each; a num_shard=2 model with 4 replicas must fill both,
one distinct GPU pair per replica, and keep answering when a node goes away. The launchers
are the real embedded engine with 2 shards, over gloo on this CPU machine.
"""

import asyncio
import time
from pathlib import Path

import httpx
import psutil
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from deployments.launcher import free_port
from serve_app.app import build_app

pytestmark = pytest.mark.slow

APP = "tp"
SERVER = "TGIServer:tp2"
GPUS_PER_NODE = 4
NUM_REPLICAS = 4
REPO_ROOT = Path(__file__).resolve().parents[2]


def _args(model_dir: Path, num_shard: int = 2) -> dict:
    return {
        "models": [
            {
                "name": "tp2",
                "model_id": str(model_dir),
                "num_shard": num_shard,
                "resources": {"num_cpus": 0.25, "num_gpus": 1},
                "deployment": {"num_replicas": NUM_REPLICAS, "startup_timeout_s": 300},
                "launcher_args": {
                    "max_input_tokens": 256,
                    "max_total_tokens": 512,
                    "max_batch_prefill_tokens": 512,
                    "max_batch_total_tokens": 1024,
                },
            }
        ],
        "ingress": {"num_cpus": 0.1},
    }


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE) for _ in range(2)]
    # Eight shard processes share two cores: one thread each.
    env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    ray.init(address=cluster.address, runtime_env={"env_vars": env})
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        yield cluster, workers, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def app(cluster, default_model_dir):
    serve.run(build_app(_args(default_model_dir)), name=APP, route_prefix="/")
    return cluster


def _placements(timeout_s: float = 60) -> dict[str, dict]:
    """Every running replica's placement, by replica id (calls spread until all seen)."""
    handle = serve.get_deployment_handle(SERVER, APP)

    async def gather() -> dict[str, dict]:
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(seen) < NUM_REPLICAS and time.monotonic() < deadline:
            replies = await asyncio.gather(*(handle.placement.remote() for _ in range(16)))
            seen.update((p["replica_id"], p) for p in replies)
        return seen

    return asyncio.run(gather())


def _launcher_visible_gpus(pid: int) -> str:
    return psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES", "")


def _ask_paris(url: str) -> httpx.Response:
    body = {
        "model": "tp2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[SERVER]
    return deployment.replica_states.get("RUNNING", 0)


def test_each_replica_gets_its_own_gpu_pair_on_one_node_and_both_nodes_are_used(app):
    cluster, workers, url = app
    placements = list(_placements().values())
    assert len(placements) == NUM_REPLICAS
    pairs = {(p["node_id"], frozenset(p["gpu_ids"])) for p in placements}
    assert len(pairs) == NUM_REPLICAS  # no GPU handed to two replicas
    assert all(len(p["gpu_ids"]) == 2 for p in placements)
    assert {p["node_id"] for p in placements} == {w.node_id for w in workers}
    for p in placements:  # the launcher process itself sees exactly its pair
        assert _launcher_visible_gpus(p["launcher_pid"]) == ",".join(p["gpu_ids"])
    # The sharded model answers through proxy -> ingress -> TGIServer -> 2 shards.
    response = _ask_paris(url)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["message"]["content"]


def test_a_model_no_node_can_hold_is_refused_with_a_clear_message(cluster, default_model_dir):
    with pytest.raises(ValueError) as error:
        build_app(_args(default_model_dir, num_shard=8))
    assert str(error.value).startswith(
        "model 'tp2' cannot be placed: one replica needs 2 CPU, 8 GPU on a single node "
        "(num_shard=8, STRICT_PACK), but the largest node has 4 GPUs (3 nodes alive)"
    )


def test_removing_a_node_reschedules_its_replicas_and_the_app_keeps_answering(app):
    cluster, workers, url = app
    placements = _placements()
    ingress_nodes = {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")])
                     if "Ingress" in a.class_name}  # fmt: skip
    gone = next(w for w in workers if w.node_id not in ingress_nodes)
    gone_launchers = [p["launcher_pid"] for p in placements.values()
                      if p["node_id"] == gone.node_id]  # fmt: skip
    assert len(gone_launchers) == 2
    cluster.remove_node(gone, allow_graceful=False)

    # The replicas left keep answering while Serve notices the loss.
    statuses = [_ask_paris(url).status_code for _ in range(4)]
    assert statuses[-1] == 200, statuses
    # The dead node's launchers (and their shards) did not outlive their replicas.
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(pid) for pid in gone_launchers) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(psutil.pid_exists(pid) for pid in gone_launchers)

    # A new node takes the two lost replicas.
    new = cluster.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE)
    deadline = time.monotonic() + 300
    while _running_replicas() < NUM_REPLICAS and time.monotonic() < deadline:
        time.sleep(2)
    assert _running_replicas() == NUM_REPLICAS
    # A fresh handle learns of the new replicas from the controller a little after they
    # show RUNNING in serve.status(), so ask until it has seen all four.
    expected = {new.node_id} | ({w.node_id for w in workers} - {gone.node_id})
    deadline = time.monotonic() + 120
    placements = _placements()
    while len(placements) < NUM_REPLICAS and time.monotonic() < deadline:
        placements = _placements()
    assert {p["node_id"] for p in placements.values()} == expected, placements
    assert _ask_paris(url).status_code == 200
