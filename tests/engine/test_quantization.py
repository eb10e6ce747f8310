"""`--quantize eetq`: int8 weight-only linear layers, wired through the flags to a real model;
every other method refused at start-up with the supported list."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, LlamaConfig

from deployments.launcher import free_port
from engine.args import SUPPORTED_QUANTIZATIONS, parse_launcher_args
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.llama import LlamaForCausalLM
from engine.protocol import SamplingParams
from engine.quantization import (
    DEQUANTIZE_FROM_ROWS,
    QUANTIZED_PROJECTIONS,
    QUANTIZERS,
    SCALE_DTYPE,
    Int8Linear,
    quantize_model,
    quantize_weight,
    weight_bytes,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PARIS = "The capital of France is Paris."


def test_the_flag_parser_and_the_quantizers_agree_on_the_supported_methods():
    assert set(SUPPORTED_QUANTIZATIONS) == set(QUANTIZERS) == {"eetq"}


def test_each_output_channel_is_within_half_a_step_of_its_weights():
    weight = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of every scale
    q, scales = quantize_weight(weight)
    assert (q.dtype, scales.dtype, q.shape, scales.shape) == (torch.int8, SCALE_DTYPE,
                                                              (64, 96), (64,))  # fmt: skip
    assert q.abs().max() <= 127
    assert (q.abs().amax(dim=1) >= 126).all()  # each row uses (almost) the whole int8 range
    error = (weight - scales.float()[:, None] * q.float()).abs()
    assert (error <= scales.float()[:, None] / 2 + 1e-12).all()


def test_a_zero_row_stays_zero():
    q, scales = quantize_weight(torch.zeros(3, 8))
    assert q.abs().sum() == 0 and torch.isfinite(scales.float()).all()


@pytest.mark.parametrize("num_tokens", [1, 7, DEQUANTIZE_FROM_ROWS - 1, DEQUANTIZE_FROM_ROWS, 300])
def test_int8_linear_computes_x_times_the_dequantized_weight(num_tokens):
    # Below DEQUANTIZE_FROM_ROWS the int8 kernel, from it on a bf16 matmul: the same numbers.
    torch.manual_seed(0)
    linear = nn.Linear(576, 960, bias=True)
    quantized = Int8Linear.from_linear(linear)
    x = torch.randn(num_tokens, 576)
    dequantized = quantized.scales.float()[:, None] * quantized.weight.float()
    # The CPU kernel takes bf16 activations: the reference rounds x the same way.
    expected = F.linear(x.to(SCALE_DTYPE).float(), dequantized) + linear.bias
    got = quantized(x)
    assert got.dtype == x.dtype and got.shape == (num_tokens, 960)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    # ... and stays close to the unquantized layer.
    assert (got - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def test_only_the_decoder_projections_are_quantized():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config, max_positions=64)
    before = weight_bytes(model)
    quantize_model(model, "eetq")
    int8 = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert int8 == {f"layers.{i}.{part}.{proj}" for i in range(2)
                    for part, proj in [("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                                       ("mlp", "gate_up_proj"), ("mlp", "down_proj")]}  # fmt: skip
    assert {name.rsplit(".", 1)[1] for name in int8} == set(QUANTIZED_PROJECTIONS)
    assert not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    assert model.embed_tokens.weight.dtype == torch.float32  # embedding / LM head kept
    assert weight_bytes(model) < before


def test_an_unknown_method_is_refused_by_the_loader_too():
    with pytest.raises(ValueError, match=r"supported: \['eetq'\]"):
        quantize_model(nn.Linear(2, 2), "awq")


# --- flags and start-up ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8", "bitsandbytes", "int8"])
def test_other_methods_are_refused_with_the_supported_list(method, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_launcher_args(["--quantize", method], {})
    assert exit_info.value.code == 2
    assert (f"--quantize {method!r} is not supported by the embedded engine; supported: eetq"
            in capsys.readouterr().err)  # fmt: skip


def test_the_method_may_come_from_the_environment_as_in_tgi():
    assert parse_launcher_args([], {"QUANTIZE": "eetq"}).quantize == "eetq"
    with pytest.raises(SystemExit):
        parse_launcher_args([], {"QUANTIZE": "awq"})


def test_the_engine_process_refuses_an_unsupported_method_before_loading(default_model_dir):
    started = subprocess.run(
        [sys.executable, "-m", "engine", "--model-id", str(default_model_dir),
         "--quantize", "awq", "--port", str(free_port()), "--hostname", "127.0.0.1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 2
    assert "'awq' is not supported by the embedded engine; supported: eetq" in started.stderr
    assert "engine: tgi" in started.stderr  # where to go for TGI's other methods


# --- the real model ---------------------------------------------------------------------------


def _greedy(engine: LLMEngine, prompt: list[int], max_new_tokens: int) -> list[int]:
    engine.add_request("r", prompt, SamplingParams(max_new_tokens=max_new_tokens))
    tokens = []
    for _ in range(4 * max_new_tokens):  # bounded
        if not engine.has_unfinished_requests():
            break
        tokens += [step.token_id for step in engine.step()]
    assert not engine.has_unfinished_requests()
    return tokens


@pytest.fixture(scope="module")
def paris_prompt(default_model_dir) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.parametrize("num_shard", [1, 2])
def test_the_quantized_default_model_still_answers_paris(
    default_model_dir, paris_prompt, num_shard, tmp_path
):
    config = EngineConfig(
        model_dir=str(default_model_dir),
        device="cpu",
        quantize="eetq",
        max_batch_total_tokens=1024,
        num_shard=num_shard,
        master_port=free_port(),
        shard_uds_path=str(tmp_path / "shard"),
    )
    engine = LLMEngine(config)
    try:
        model = engine.model_runner.model
        assert isinstance(model.layers[0].mlp.down_proj, Int8Linear)
        assert model.layers[0].mlp.down_proj.all_reduce == (num_shard > 1)
        if num_shard == 1:  # int8 projections, fp32 embedding: 0.41 of the fp32 bytes
            assert (
                weight_bytes(model)
                < 0.45 * (default_model_dir / "model.safetensors").stat().st_size
            )
        tokens = _greedy(engine, paris_prompt, max_new_tokens=8)
        stats = engine.stats()
    finally:
        engine.shutdown()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.decode(tokens, skip_special_tokens=True) == PARIS
    assert stats.num_free_blocks == stats.num_total_blocks  # no KV block leaked
