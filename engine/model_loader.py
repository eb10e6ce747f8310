"""Loading a model for the `ModelRunner`: device and dtype, architecture registry, weights.

With tensor parallelism each rank builds only its share of the layers (engine/tensor_parallel.py)
and narrows the checkpoint's tensors to it while loading.
"""

import glob
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from engine.config import EngineConfig
from engine.gemv_linear import can_use_gemv, use_gemv_for_one_row
from engine.models.llama import LlamaForCausalLM
from engine.packed_linear import can_pack, pack_linear_layers
from engine.quantization import quantize_model
from engine.tensor_parallel import TensorParallel

# config.json "architectures" entry -> model class
MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {"LlamaForCausalLM": LlamaForCausalLM}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(config: EngineConfig, rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """Default to CUDA in bf16 when available, else CPU in fp32. Shard `rank` of a sharded
    engine takes the rank-th visible GPU."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and config.num_shard > 1:
        device = torch.device("cuda", rank)
    if config.dtype is None:
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {config.dtype!r}; choose from {sorted(DTYPES)}")
    return device, DTYPES[config.dtype]


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every *.safetensors file in model_dir, on CPU."""
    paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def load_model(
    model_config: PretrainedConfig,
    model_dir: str,
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
    tp: TensorParallel,
    quantize: str | None = None,
) -> LlamaForCausalLM:
    """Build the model without initialising it (meta device), fill it from safetensors, then
    quantize it in place when `quantize` names a method (engine/quantization.py), and on the
    CPU pack its linear layers for oneDNN (engine/packed_linear.py), or on CUDA give them a
    GEMV for one-row inputs (engine/gemv_linear.py)."""
    architectures = getattr(model_config, "architectures", None) or ["LlamaForCausalLM"]
    model_cls = MODEL_REGISTRY.get(architectures[0])
    if model_cls is None:
        raise ValueError(
            f"unsupported architecture {architectures[0]!r}; have {list(MODEL_REGISTRY)}"
        )
    with torch.device("meta"):
        model = model_cls(model_config, max_positions, tp)
    model = model.to(dtype).to_empty(device=device)
    model.rotary_emb.reset_parameters()  # buffers are recomputed, not loaded
    model.load_weights(iter_safetensors(model_dir))
    if quantize is not None:
        quantize_model(model, quantize)
    if can_pack(device, dtype):
        pack_linear_layers(model, quantized=quantize is not None)
    elif can_use_gemv(device, dtype, quantized=quantize is not None):
        use_gemv_for_one_row(model)
    return model.eval()
