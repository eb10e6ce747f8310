"""AppArgs / ModelConfig / LauncherArgs validation and launcher argv rendering."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.app import with_launcher_tracing
from serve_app.config import AppArgs, LauncherArgs, ModelConfig, TracingOptions

REPO_ROOT = Path(__file__).resolve().parents[2]


def _model(**overrides) -> dict:
    return {"name": "smollm2", "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", **overrides}


def test_serve_config_yaml_args_are_valid():
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "serve_app.app:build_app"
    args = AppArgs.model_validate(application["args"])
    (model,) = args.models
    assert (model.name, model.engine, model.num_shard) == ("smollm2", "embedded", 1)
    assert model.resources.num_cpus + args.ingress.num_cpus <= 2  # fits a 2-core machine


def test_defaults():
    model = ModelConfig.model_validate(_model())
    assert model.engine == "embedded"
    assert model.num_shard == 1
    assert model.revision is None
    assert model.resources.num_cpus == 1.0 and model.resources.num_gpus == 0
    assert model.deployment.num_replicas is None  # one replica, unless autoscaled
    assert model.deployment.request_router == "batching_aware"
    assert model.launcher_args.to_argv() == []


def test_launcher_argv_is_kebab_case_and_skips_unset_flags():
    model = ModelConfig.model_validate(
        _model(
            revision="main",
            num_shard=2,
            launcher_args={
                "max_input_tokens": 1024,
                "max_total_tokens": 2048,
                "max_batch_total_tokens": 16384,
                "dtype": "bfloat16",
                "sharded": True,
                "json_output": True,
                "disable_grammar_support": True,
                "cuda_graphs": [1, 2, 4],
            },
        )
    )
    assert model.launcher_argv() == [
        "--model-id", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--revision", "main",
        "--num-shard", "2",
        "--max-input-tokens", "1024",
        "--max-total-tokens", "2048",
        "--max-batch-total-tokens", "16384",
        "--dtype", "bfloat16",
        "--sharded", "true",
        "--cuda-graphs", "1,2,4",
        "--json-output",
        "--disable-grammar-support",
    ]  # fmt: skip


@pytest.mark.parametrize("flag", ["max_input_lenght", "port", "hostname", "model_id"])
def test_unknown_or_replica_owned_launcher_arg_is_rejected_by_name(flag):
    with pytest.raises(ValidationError, match=flag):
        ModelConfig.model_validate(_model(launcher_args={flag: 1}))


def test_unknown_model_key_is_rejected():
    with pytest.raises(ValidationError, match="num_shards"):
        ModelConfig.model_validate(_model(num_shards=2))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_input_tokens": 2048, "max_total_tokens": 2048}, "max_input_tokens .* < max_total"),
        ({"max_input_tokens": 4096, "max_total_tokens": 2048}, "max_input_tokens"),
        ({"max_input_tokens": 1024, "max_batch_prefill_tokens": 512}, "max_batch_prefill"),
        ({"max_total_tokens": 4096, "max_batch_total_tokens": 2048}, "max_batch_total"),
        ({"max_batch_prefill_tokens": 8192, "max_batch_total_tokens": 4096}, "max_batch_total"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests"),
        ({"dtype": "float8"}, "dtype"),
        ({"quantize": "int3"}, "quantize"),
    ],
)
def test_bad_launcher_values_are_rejected(args, message):
    with pytest.raises(ValidationError, match=message):
        LauncherArgs.model_validate(args)


def test_consistent_budgets_are_accepted():
    args = LauncherArgs(
        max_input_tokens=1024,
        max_total_tokens=2048,
        max_batch_prefill_tokens=1024,
        max_batch_total_tokens=2048,
    )
    assert args.max_batch_total_tokens == 2048


@pytest.mark.parametrize(
    "bad",
    [
        {"name": ""},
        {"name": "a/b"},
        {"num_shard": 0},
        {"engine": "vllm"},
        {"resources": {"num_cpus": 0}},
        {"resources": {"num_gpus": -1}},
        {"deployment": {"num_replicas": 0}},
    ],
)
def test_bad_model_values_are_rejected(bad):
    with pytest.raises(ValidationError):
        ModelConfig.model_validate(_model(**bad))


def test_app_needs_a_model_and_unique_names():
    with pytest.raises(ValidationError, match="at least 1"):
        AppArgs.model_validate({"models": []})
    with pytest.raises(ValidationError, match="unique.*smollm2"):
        AppArgs.model_validate({"models": [_model(), _model(model_id="other")]})
    args = AppArgs.model_validate({"models": [_model(), _model(name="second")]})
    assert [m.name for m in args.models] == ["smollm2", "second"]
    assert args.ingress.num_cpus == 0.1


def test_tracing_is_off_unless_an_otlp_endpoint_is_given():
    assert AppArgs.model_validate({"models": [_model()]}).tracing is None
    tracing = AppArgs.model_validate(
        {"models": [_model()], "tracing": {"otlp_endpoint": "http://collector:4318"}}
    ).tracing
    assert (tracing.service_name, tracing.sampling_ratio) == ("ray-tgi", 1.0)
    assert tracing.launcher_otlp_endpoint is None
    for bad in ({}, {"otlp_endpoint": "collector:4318"}, {"otlp_endpoint": "http://c",
                "sampling_ratio": 2}, {"otlp_endpoint": "http://c", "endpoint": "x"}):  # fmt: skip
        with pytest.raises(ValidationError):
            AppArgs.model_validate({"models": [_model()], "tracing": bad})


def test_the_launchers_get_the_apps_otlp_endpoint_unless_their_own_is_set():
    tracing = TracingOptions(otlp_endpoint="http://c:4318", launcher_otlp_endpoint="http://c:4317")
    plain = ModelConfig.model_validate(_model())
    own = ModelConfig.model_validate(_model(launcher_args={"otlp_endpoint": "http://mine:4317"}))
    argv = with_launcher_tracing(plain, tracing).launcher_argv()
    assert argv[argv.index("--otlp-endpoint") + 1] == "http://c:4317"
    argv = with_launcher_tracing(own, tracing).launcher_argv()
    assert argv[argv.index("--otlp-endpoint") + 1] == "http://mine:4317"
    assert with_launcher_tracing(plain, None) is plain
    assert "--otlp-endpoint" not in with_launcher_tracing(
        plain, TracingOptions(otlp_endpoint="http://c:4318")
    ).launcher_argv()  # fmt: skip
    assert plain.launcher_args.otlp_endpoint is None  # the original is left as it was
