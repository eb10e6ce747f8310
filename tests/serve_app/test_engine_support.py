"""What each engine supports, checked at deploy time: the embedded engine's quantization methods
and TGI's dtypes; and the Serve side staying free of torch while it reads those lists."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def model(**fields) -> ModelConfig:
    return ModelConfig(name="m", model_id="org/name", **fields)


def test_the_embedded_engine_takes_eetq_and_tgi_takes_all_its_methods():
    assert model(launcher_args={"quantize": "eetq"}).launcher_argv()[-2:] == ["--quantize", "eetq"]
    for method in ("awq", "gptq", "fp8", "bitsandbytes-nf4", "eetq"):
        argv = model(engine="tgi", launcher_args={"quantize": method}).launcher_argv()
        assert argv[-2:] == ["--quantize", method]  # passed through unchanged


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8", "marlin"])
def test_other_methods_on_the_embedded_engine_are_refused_at_deploy_time(method):
    with pytest.raises(ValidationError, match=f"quantize '{method}' needs engine: tgi; the "
                       "embedded engine supports eetq"):  # fmt: skip
        model(launcher_args={"quantize": method})


def test_tgi_refuses_float32_and_takes_16_bit_dtypes():
    with pytest.raises(ValidationError, match="float16 or bfloat16"):
        model(engine="tgi", launcher_args={"dtype": "float32"})
    assert "bfloat16" in model(engine="tgi", launcher_args={"dtype": "bfloat16"}).launcher_argv()
    assert "float32" in model(launcher_args={"dtype": "float32"}).launcher_argv()


def test_weights_are_prefetched_unless_turned_off():
    assert model().prefetch_weights is True
    assert model(prefetch_weights=False).prefetch_weights is False


def test_the_serve_side_imports_no_torch():
    # serve_app.config reads engine.args and deployments.weights_prefetch engine.weights: both
    # must stay torch-free for Serve's processes (and the TGI image's Ray side) to stay light.
    code = ("import sys, serve_app.app, deployments.tgi_server, deployments.weights_prefetch; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_the_api_key_goes_to_the_environment_not_the_command_line():
    cfg = model(engine="tgi", launcher_args={"api_key": "s3cret", "max_total_tokens": 512})
    assert cfg.launcher_argv() == ["--model-id", "org/name", "--num-shard", "1",
                                   "--max-total-tokens", "512"]  # fmt: skip
    assert cfg.launcher_args.secret_env() == {"API_KEY": "s3cret"}  # read by both launchers
    assert model().launcher_args.secret_env() == {}


def test_origins_are_one_flag_each_for_tgi_and_one_list_for_the_embedded_engine():
    origins = {"cors_allow_origin": ["https://a.example", "https://b.example"]}
    tgi = model(engine="tgi", launcher_args=origins).launcher_argv()
    assert tgi[-4:] == ["--cors-allow-origin", "https://a.example",
                        "--cors-allow-origin", "https://b.example"]  # fmt: skip
    embedded = model(launcher_args=origins).launcher_argv()
    assert embedded[-2:] == ["--cors-allow-origin", "https://a.example,https://b.example"]
