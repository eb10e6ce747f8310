import pytest

from engine.args import parse_launcher_args, resolve_token_limits


def test_flags_override_environment_and_environment_overrides_defaults():
    env = {"MAX_TOTAL_TOKENS": "512", "PORT": "9000", "JSON_OUTPUT": "true"}
    args = parse_launcher_args(["--port", "8080"], env)
    assert args.port == 8080  # flag wins
    assert args.max_total_tokens == 512  # from the environment
    assert args.json_output is True
    assert args.max_concurrent_requests == 128  # TGI's default


def test_max_input_length_is_an_alias_of_max_input_tokens():
    assert parse_launcher_args(["--max-input-length", "100"], {}).max_input_tokens == 100
    assert parse_launcher_args([], {"MAX_INPUT_LENGTH": "7"}).max_input_tokens == 7


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit):
        parse_launcher_args(["--no-such-flag", "1"], {})


def test_token_limits_are_derived_like_tgi():
    args = parse_launcher_args([], {})
    resolve_token_limits(args, max_position_embeddings=8192)
    assert args.max_total_tokens == 8192
    assert args.max_input_tokens == 8191
    assert args.max_batch_prefill_tokens == 8191 + 50
    assert args.max_batch_total_tokens >= 8192


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-input-tokens", "100", "--max-total-tokens", "100"], "max_input_tokens"),
        (["--max-total-tokens", "4096", "--max-batch-total-tokens", "1024"], "batch_total"),
    ],
)
def test_inconsistent_token_limits_are_rejected(argv, message):
    args = parse_launcher_args(argv, {})
    with pytest.raises(ValueError, match=message):
        resolve_token_limits(args, max_position_embeddings=8192)


def test_prompts_longer_than_the_prefill_budget_are_allowed_they_are_chunked():
    args = parse_launcher_args(
        ["--max-input-tokens", "100", "--max-batch-prefill-tokens", "50"], {}
    )
    resolve_token_limits(args, max_position_embeddings=8192)
    assert (args.max_input_tokens, args.max_batch_prefill_tokens) == (100, 50)


def test_gpu_sizing_leaves_the_kv_cache_size_to_the_engine():
    args = parse_launcher_args(["--max-total-tokens", "4096"], {})
    resolve_token_limits(args, max_position_embeddings=8192, size_from_memory=True)
    assert args.max_batch_total_tokens is None
    explicit = parse_launcher_args(["--max-batch-total-tokens", "9000"], {})
    resolve_token_limits(explicit, max_position_embeddings=8192, size_from_memory=True)
    assert explicit.max_batch_total_tokens == 9000


def test_sizing_from_memory_is_refused_on_cpu(default_model_dir):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    config = EngineConfig(model_dir=str(default_model_dir), max_batch_total_tokens=None,
                          device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match="give --max-batch-total-tokens"):
        LLMEngine(config)


def test_disable_grammar_support_is_a_switch_and_an_environment_variable():
    assert parse_launcher_args([], {}).disable_grammar_support is False
    assert parse_launcher_args(["--disable-grammar-support"], {}).disable_grammar_support
    environ = {"DISABLE_GRAMMAR_SUPPORT": "true"}
    assert parse_launcher_args([], environ).disable_grammar_support is True
