"""The decoder's linear layers: `linear` is F.linear for every row count and dtype, whichever
way round it asks BLAS for the product."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from engine.linear import FEW_ROWS, Linear, linear
from engine.models.llama import LlamaForCausalLM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 2, 16, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_f_linear(dtype: torch.dtype, num_rows: int, with_bias: bool) -> None:
    torch.manual_seed(num_rows)
    x = torch.randn(num_rows, 576, dtype=dtype)
    weight = torch.randn(960, 576, dtype=dtype)
    bias = torch.randn(960, dtype=dtype) if with_bias else None
    y = linear(x, weight, bias)
    assert y.shape == (num_rows, 960) and y.dtype == dtype
    # The ops after it (rope, norms, views into heads) take it as a plain [n, out] tensor.
    assert y.is_contiguous()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=tolerance, atol=tolerance)


def test_the_decoder_projections_and_lm_head_go_through_linear() -> None:
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config, max_positions=32)
    layer = model.layers[0]
    projections = [
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
        layer.mlp.down_proj, model.lm_head,
    ]  # fmt: skip
    assert all(type(p) is Linear for p in projections)
