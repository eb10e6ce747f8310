"""The engine on a CUDA GPU, from the same code as on CPU (engine only: no Ray, no HTTP).

1. Agreement with HF transformers on CUDA: random SmolLM2-shaped weights, 8 prompts of
   different lengths submitted staggered to the engine (fp32, then bf16) vs HF `generate` one
   prompt at a time in the same dtype; greedy tokens compared.
2. Decode speed in bf16 on random Llama-3-8B-shaped weights: ms per decode step and output
   tok/s at several batch sizes, against the HBM-bandwidth floor of reading the weights once.

Writes one JSON to --out. Random weights are written to --work-dir as safetensors.

    python -m benchmarks.gpu_engine --out results/gpu_engine.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    max_position_embeddings=8192,
)


def random_model_dir(shape: dict, path: Path, dtype: torch.dtype) -> tuple[Path, int]:
    """Random weights (std 0.02, norms 1) of `shape` as safetensors; (dir, weight bytes).
    Drawn on the GPU when there is one (an 8B model's 16 GB in seconds), else on the CPU."""
    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"], eos_token_id=None)
    with torch.device("meta"):
        names = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    tensors, num_bytes = {}, 0
    for name, shp in names.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=dtype)
        else:
            t = (torch.randn(shp, device=device, generator=gen) * 0.02).to(dtype).cpu()
        tensors[name] = t
        num_bytes += t.numel() * t.element_size()
    save_file(tensors, str(path / "model.safetensors"))
    return path, num_bytes


def agreement(model_dir: Path, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist()
               for n in (5, 17, 33, 64, 100, 129, 200, 257)]  # fmt: skip
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device="cuda")
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              do_sample=False, pad_token_id=0)  # fmt: skip
            expected.append(out[0, len(prompt) :].tolist())
    del hf
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), dtype=dtype_name, device="cuda"))
    got = {i: [] for i in range(len(prompts))}
    pending, step = list(range(len(prompts))), 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # staggered: one more request every 3 steps
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], SamplingParams(max_new_tokens=32))
        for token in engine.step():
            got[int(token.request_id)].append(token.token_id)
        step += 1
    stats = engine.stats()
    first_diffs = [
        next((j for j, (a, b) in enumerate(zip(e, got[i], strict=True)) if a != b), None)
        for i, e in enumerate(expected)
    ]
    return {
        "dtype": dtype_name,
        "identical_requests": sum(d is None for d in first_diffs),
        "num_requests": len(prompts),
        "first_differing_token": first_diffs,
        "kv_blocks_free_after": f"{stats.num_free_blocks}/{stats.num_total_blocks}",
    }


def decode_speed(model_dir: Path, weight_bytes: int, batch_sizes: list[int]) -> list[dict]:
    num_prompt, num_new = 128, 64
    engine = LLMEngine(
        EngineConfig(
            model_dir=str(model_dir),
            dtype="bfloat16",
            device="cuda",
            max_batch_total_tokens=max(batch_sizes) * (num_prompt + num_new + 16),
            max_batch_prefill_tokens=max(batch_sizes) * num_prompt,
        )  # fmt: skip
    )
    gen = torch.Generator().manual_seed(2)
    rows = []
    for batch in batch_sizes:
        for i in range(batch):
            prompt = torch.randint(3, 128000, (num_prompt,), generator=gen).tolist()
            engine.add_request(f"{batch}-{i}", prompt, SamplingParams(max_new_tokens=num_new))
        engine.step()  # the whole batch's prefill
        torch.cuda.synchronize()
        step_times = []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            step_times.append(time.perf_counter() - start)
        steady = sorted(step_times[2:])  # drop warm-up steps
        ms = 1000 * steady[len(steady) // 2]
        rows.append({
            "batch_size": batch,
            "decode_ms_per_step_p50": round(ms, 3),
            "output_tok_s": round(batch * 1000 / ms, 1),
            "hbm_floor_ms": round(weight_bytes / 3.0e12 * 1000, 3),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def memory_sizing(model_dir: Path, fraction: float) -> dict:
    """KV cache sized from GPU memory (no max_batch_total_tokens), then a full batch run."""
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), dtype="bfloat16", device="cuda",
                                    max_batch_total_tokens=None, cuda_memory_fraction=fraction,
                                    max_batch_prefill_tokens=4096))  # fmt: skip
    total = torch.cuda.get_device_properties(0).total_memory
    after_alloc = torch.cuda.memory_allocated()
    gen = torch.Generator().manual_seed(3)
    for i in range(64):  # 64 x (1024 + 32) tokens through the sized cache
        prompt = torch.randint(3, 128000, (1024,), generator=gen).tolist()
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=32))
    while engine.has_unfinished_requests():
        engine.step()
    return {
        "cuda_memory_fraction": fraction,
        "max_batch_total_tokens": engine.config.max_batch_total_tokens,
        "allocated_after_kv_cache_gib": round(after_alloc / 2**30, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "total_gib": round(total / 2**30, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ray-tgi-gpu"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--memory-sizing-only", action="store_true")
    args = p.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    if args.memory_sizing_only:
        big, _ = random_model_dir(LLAMA3_8B, args.work_dir / "llama3-8b", torch.bfloat16)
        report["memory_sizing"] = memory_sizing(big, 0.9)
        args.out.write_text(json.dumps(report, indent=1))
        print(report, flush=True)
        return
    small, _ = random_model_dir(SMOLLM2, args.work_dir / "smollm2", torch.float32)
    report["agreement"] = [agreement(small, "float32"), agreement(small, "bfloat16")]
    print(report["agreement"], flush=True)
    big, num_bytes = random_model_dir(LLAMA3_8B, args.work_dir / "llama3-8b", torch.bfloat16)
    report["llama3_8b_bf16_decode"] = decode_speed(big, num_bytes, args.batch_sizes)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
