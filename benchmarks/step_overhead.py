"""What an engine step costs besides the arithmetic: step times of a Llama-shaped model so
small (hidden 64) that its compute is negligible, so what is measured is the host's work and
the kernel launches of each path — a prefill and a decode step, both through CUDA graphs on a
GPU (a short prefill runs as decode rows) and eager on CPU — with as many layers as the real
model has. Every request sends the same prompt, so after the first its full blocks but the
last come from the prefix cache: the prefill of a chat turn behind a shared system prompt.

    python -m benchmarks.step_overhead [--device cuda] [--num-layers 30] [--prompt-len 64]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_engine import random_model_dir
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

# Llama-shaped, hidden 64: negligible arithmetic. The layer count comes from the command line.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, vocab_size=512, tie_word_embeddings=True)  # fmt: skip


def step_ms(engine: LLMEngine, sync) -> float:
    start = time.perf_counter()
    engine.step()
    sync()
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-layers", type=int, default=30)  # SmolLM2's
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = "bfloat16" if cuda else "float32"
    with tempfile.TemporaryDirectory() as work:
        shape = {**TINY, "num_hidden_layers": args.num_layers}
        model_dir, _ = random_model_dir(shape, Path(work), getattr(torch, dtype))
        engine = LLMEngine(
            EngineConfig(
                model_dir=str(model_dir),
                device=args.device,
                dtype=dtype,
                max_batch_total_tokens=4096,
                max_batch_prefill_tokens=1024,
            )
        )
        prefill, decode = [], []
        prompt = [3 + i % 500 for i in range(args.prompt_len)]
        for i in range(args.num_requests + 2):  # the first two warm up
            engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=args.max_new_tokens))
            prefill.append(step_ms(engine, sync))
            while engine.has_unfinished_requests():
                decode.append(step_ms(engine, sync))
        engine.shutdown()
    steps_per_request = len(decode) // (args.num_requests + 2)
    decode = decode[2 * steps_per_request :]
    print(f"{args.device}, {args.num_layers} layers, {args.prompt_len}-token prompts, "
          f"medians of {args.num_requests}: prefill step {statistics.median(prefill[2:]):.3f} ms, "
          f"decode step {statistics.median(decode):.3f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
