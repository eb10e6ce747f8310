"""Linear layers over oneDNN's packed weights on the CPU: the same products as F.linear, and
every linear layer of a model loaded on the CPU packed (a sharded model's too:
test_sharded.py checks its greedy tokens against one shard's)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from engine.model_loader import load_model
from engine.packed_linear import ON_X86_64, PackedLinear, can_pack
from engine.tensor_parallel import TensorParallel

CPU = torch.device("cpu")


@pytest.mark.skipif(not ON_X86_64, reason="packing is for x86-64 CPUs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [0, 1, 2, 16, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_computes_what_the_linear_layer_does(dtype, num_rows, with_bias):
    torch.manual_seed(num_rows)
    linear = nn.Linear(576, 960, bias=with_bias, dtype=dtype)
    x = torch.randn(num_rows, 576, dtype=dtype)
    packed = PackedLinear.from_linear(linear)
    got = packed(x)
    assert got.shape == (num_rows, 960) and got.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, linear(x), rtol=tolerance, atol=tolerance)
    # A strided input (a slice of hidden states, as the logits of a prefill's last rows).
    strided = torch.randn(576, num_rows, dtype=dtype).t()
    torch.testing.assert_close(packed(strided), linear(strided), rtol=tolerance, atol=tolerance)


def test_packing_is_for_x86_cpu_models_in_fp32_and_bf16():
    assert can_pack(CPU, torch.float32) == can_pack(CPU, torch.bfloat16) == ON_X86_64
    assert not can_pack(CPU, torch.float16)
    assert not can_pack(torch.device("cuda"), torch.bfloat16)


def _tiny_model_dir(tmp_path, tied: bool) -> str:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=64, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.skipif(not ON_X86_64, reason="packing is for x86-64 CPUs")
@pytest.mark.parametrize("tied", [True, False])
def test_a_model_loaded_on_the_cpu_has_every_linear_layer_packed(tmp_path, tied):
    model_dir = _tiny_model_dir(tmp_path, tied)
    model = load_model(LlamaConfig.from_pretrained(model_dir), model_dir, 64, CPU,
                       torch.float32, TensorParallel())  # fmt: skip
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    packed = {name for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    projections = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    # A tied head gets a packed copy; the embedding keeps its table for the lookups.
    assert packed == {f"layers.{i}.{p}" for i in range(2) for p in projections} | {"lm_head"}
    hidden = torch.randn(5, 64)
    head = LlamaForCausalLM.from_pretrained(model_dir).lm_head.weight  # the embedding if tied
    expected = F.linear(model.norm(hidden)[0], head)
    torch.testing.assert_close(model.compute_logits(hidden), expected, rtol=1e-4, atol=1e-4)


def test_a_quantized_model_keeps_one_copy_of_a_tied_head(tmp_path):
    model_dir = _tiny_model_dir(tmp_path, tied=True)
    model = load_model(LlamaConfig.from_pretrained(model_dir), model_dir, 64, CPU,
                       torch.float32, TensorParallel(), quantize="eetq")  # fmt: skip
    assert model.lm_head is None
