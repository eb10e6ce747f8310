"""`engine: tgi` end to end on a simulated GPU cluster, with the weights prefetched from a Hub.

- The Hub is tests/deployments/local_hub.py on 127.0.0.1 (HF_ENDPOINT), serving the default
  model's converted files under a Hub id. HF_TOKEN reaches the replicas the way a Kubernetes
  Secret does: in the nodes' environment.
- `text-generation-launcher` is a stand-in on PATH that records its argv and environment,
  then execs the embedded engine with the same flags (`python -m engine` takes TGI's), so the
  whole request path answers for real.
- Two worker nodes with 4 fake GPUs and their own Hub cache each; 4 replicas of 2 shards start
  at once, two per node.

What it proves: the launcher's command line and environment are what TGI expects (flags, one
GPU per shard in CUDA_VISIBLE_DEVICES, distinct ports and socket paths per replica, the token
in the environment only, offline from the prefetched cache), each node downloaded each file
once, the token is in no log, and requests work.
"""

import asyncio
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import ray
from local_hub import LocalHub
from ray import serve
from ray.cluster_utils import Cluster

from deployments.launcher import free_port
from serve_app.app import build_app

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
APP, SERVER = "tgi", "TGIServer:llm"
HUB_ID = "ray-tgi-test/SmolLM2-135M-Instruct"
TOKEN = "hf_tgiEngineTestToken0123456789"
NUM_REPLICAS, NUM_SHARD, GPUS_PER_NODE = 4, 2, 4
OTLP = "http://127.0.0.1:4317"
MODEL_FILES = ["chat_template.jinja", "config.json", "generation_config.json",
               "model.safetensors", "special_tokens_map.json", "tokenizer.json",
               "tokenizer_config.json"]  # fmt: skip
LAUNCHER_ARGS = {
    "max_concurrent_requests": 16,
    "max_input_tokens": 256,
    "max_total_tokens": 512,
    "max_batch_prefill_tokens": 512,
    "max_batch_total_tokens": 1024,
    "quantize": "eetq",  # TGI's int8 weight-only; the embedded engine has it too
    "otlp_endpoint": OTLP,
}
EXPECTED_FLAGS = {
    "--model-id": HUB_ID,
    "--num-shard": str(NUM_SHARD),
    "--max-concurrent-requests": "16",
    "--max-input-tokens": "256",
    "--max-total-tokens": "512",
    "--max-batch-prefill-tokens": "512",
    "--max-batch-total-tokens": "1024",
    "--quantize": "eetq",
    "--otlp-endpoint": OTLP,
    "--hostname": "127.0.0.1",
}
PER_REPLICA_FLAGS = {"--port", "--master-port", "--shard-uds-path", "--huggingface-hub-cache"}

STAND_IN = textwrap.dedent(
    '''\
    #!{python}
    """Stand-in text-generation-launcher: record argv and environment, then become the
    embedded engine with the same flags (same pid, so the replica's process is this one)."""
    import json, os, sys
    record = {{"pid": os.getpid(), "argv": sys.argv[1:], "env": dict(os.environ)}}
    path = os.path.join({records!r}, f"{{os.getpid()}}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.rename(path + ".tmp", path)
    os.execv(sys.executable, [sys.executable, "-m", "engine", *sys.argv[1:]])
    '''
)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> tuple[Path, Path]:
    """(bin dir holding `text-generation-launcher`, dir of its records)."""
    root = tmp_path_factory.mktemp("tgi")
    bin_dir, records = root / "bin", root / "records"
    bin_dir.mkdir()
    records.mkdir()
    launcher = bin_dir / "text-generation-launcher"
    launcher.write_text(STAND_IN.format(python=sys.executable, records=str(records)))
    launcher.chmod(0o755)
    return bin_dir, records


@pytest.fixture(scope="module")
def hub(default_model_dir):
    with LocalHub({HUB_ID: {name: default_model_dir / name for name in MODEL_FILES}}) as hub:
        yield hub


@pytest.fixture(scope="module")
def cluster(stand_in, hub, tmp_path_factory):
    bin_dir, _ = stand_in
    caches = [tmp_path_factory.mktemp(f"node{i}") / "hub" for i in range(2)]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    # What a Kubernetes pod's env (HF_TOKEN from a Secret, its own disk's cache) gives a node.
    workers = [
        cluster.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE,
                         env_vars={"HF_TOKEN": TOKEN, "HF_HUB_CACHE": str(cache)})
        for cache in caches
    ]  # fmt: skip
    env = {
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",  # eight shard processes on two cores
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_ENDPOINT": hub.url,
    }
    ray.init(address=cluster.address, runtime_env={"env_vars": env})
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        yield cluster, dict(zip((w.node_id for w in workers), caches, strict=True)), port
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def app(cluster):
    _, caches, port = cluster
    args = {
        "models": [
            {
                "name": "llm",
                "model_id": HUB_ID,
                "engine": "tgi",
                "num_shard": NUM_SHARD,
                "resources": {"num_cpus": 0.25, "num_gpus": 1},
                "deployment": {"num_replicas": NUM_REPLICAS, "startup_timeout_s": 300},
                "launcher_args": LAUNCHER_ARGS,
            }
        ],
        "ingress": {"num_cpus": 0.1},
    }
    serve.run(build_app(args), name=APP, route_prefix="/")
    return caches, f"http://127.0.0.1:{port}"


def placements() -> list[dict]:
    """Every running replica's placement (calls spread until all are seen)."""
    handle = serve.get_deployment_handle(SERVER, APP)

    async def gather() -> dict[str, dict]:
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + 60
        while len(seen) < NUM_REPLICAS and time.monotonic() < deadline:
            replies = await asyncio.gather(*(handle.placement.remote() for _ in range(16)))
            seen.update((p["replica_id"], p) for p in replies)
        return seen

    return list(asyncio.run(gather()).values())


def records(records_dir: Path) -> dict[int, dict]:
    """The stand-in's records, by launcher pid."""
    return {int(p.stem): json.loads(p.read_text()) for p in records_dir.glob("*.json")}


def flag_values(argv: list[str]) -> dict[str, str]:
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    values = dict(zip(argv[::2], argv[1::2], strict=True))
    assert len(values) == len(argv) // 2, "a flag given twice"
    return values


def test_the_launcher_gets_tgis_flags_and_environment_on_its_replicas_gpus(app, stand_in):
    caches, _ = app
    by_pid = records(stand_in[1])
    replicas = placements()
    assert len(replicas) == NUM_REPLICAS and len(by_pid) == NUM_REPLICAS
    for replica in replicas:
        record = by_pid[replica["launcher_pid"]]  # exec kept the pid: this replica's launcher
        flags = flag_values(record["argv"])
        assert set(flags) == set(EXPECTED_FLAGS) | PER_REPLICA_FLAGS
        assert {k: flags[k] for k in EXPECTED_FLAGS} == EXPECTED_FLAGS
        assert replica["launcher_url"] == f"http://127.0.0.1:{flags['--port']}"
        cache = str(caches[replica["node_id"]])
        assert flags["--huggingface-hub-cache"] == cache  # the node's own cache
        env = record["env"]
        assert len(replica["gpu_ids"]) == NUM_SHARD  # one GPU per shard, as TGI counts them
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(replica["gpu_ids"])
        assert env["HF_TOKEN"] == TOKEN  # the environment, never the command line
        assert not any(TOKEN in arg for arg in record["argv"])
        assert (env["HF_HUB_OFFLINE"], env["HF_HUB_CACHE"], env["HUGGINGFACE_HUB_CACHE"]) == (
            "1", cache, cache)  # fmt: skip
    # Replicas sharing a node share nothing else: GPUs, ports, sockets.
    for node in caches:
        mine = [r for r in replicas if r["node_id"] == node]
        assert len(mine) == NUM_REPLICAS // 2
        gpus = [g for r in mine for g in r["gpu_ids"]]
        assert len(set(gpus)) == len(gpus) == GPUS_PER_NODE
        for flag in ("--port", "--master-port", "--shard-uds-path"):
            values = {flag_values(by_pid[r["launcher_pid"]]["argv"])[flag] for r in mine}
            assert len(values) == len(mine), flag


def test_each_node_downloaded_each_file_once(app, hub):
    assert hub.file_gets() == {name: 2 for name in MODEL_FILES}  # 2 nodes, 4 replicas
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}


def test_requests_go_through_the_whole_path(app):
    _, url = app
    chat = {"model": "llm", "messages": [{"role": "user", "content": "What is the capital of "
            "France?"}], "max_tokens": 12, "temperature": 0}  # fmt: skip
    answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert httpx.get(f"{url}/info", timeout=30).json()["model_id"] == HUB_ID
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert len(events) == 8 and events[-1]["generated_text"]


def test_progress_is_in_the_replica_logs_and_the_token_in_no_log(app, cluster):
    ray_cluster, _, _ = cluster
    logs_dirs = {Path(node.get_logs_dir_path())
                 for node in [ray_cluster.head_node, *ray_cluster.worker_nodes]}  # fmt: skip
    files = [p for d in logs_dirs for p in d.rglob("*") if p.is_file()]
    text = {p: p.read_bytes().decode("utf-8", errors="replace") for p in files}
    replica_logs = [t for p, t in text.items() if p.name.startswith("replica_tgi_TGIServer")]
    assert len(replica_logs) == NUM_REPLICAS
    for log in replica_logs:
        assert f"weights {HUB_ID}@main: fetching into" in log
        assert f"weights {HUB_ID}@main: 7 files, 541.6 MB" in log  # ..., ready after N s
    assert any(f"weights {HUB_ID}@main: 7/7 files" in t for t in replica_logs)
    assert [p for p, t in text.items() if TOKEN in t] == []
