"""Where a batch-1 decode step's time goes on the GPU: wall time per step against the GPU's
own time for the same step, and the kernels that take it.

Same Llama-3-8B-shaped random model as benchmarks/gpu_speed.py. Measured, one run:
- step wall time (engine.step(), host included): benchmarks/gpu_speed.py's batch-1 median;
- the CUDA-graph replay alone (the forward and LM head), by CUDA events;
- a torch profile of --steps engine steps: GPU kernel time per step, host time the GPU sat
  idle, and the kernels by total time. "Per step" is per forward pass the profile recorded,
  counted by the rotary kernel (one launch per layer per forward): with decode ahead the
  window holds one forward more than it has engine steps (65 for 64).

    python -m benchmarks.gpu_decode_profile --out results/gpu_decode_profile.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu_engine import LLAMA3_8B, random_model_dir
from benchmarks.gpu_speed import engine_batch1_ms, new_engine, random_prompts
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams


def start_one(engine: LLMEngine, max_new_tokens: int) -> None:
    """One 128-token prompt, prefilled: the next steps are batch-1 decodes."""
    prompt = random_prompts([128], 5)[0]
    engine.add_request(
        f"b1-{time.monotonic_ns()}", prompt, SamplingParams(max_new_tokens=max_new_tokens)
    )
    engine.step()


def replay_ms(engine: LLMEngine, reps: int) -> float:
    graphs = engine.model_runner.graphs
    assert graphs is not None, "CUDA graphs are off"
    graph = graphs.graphs[1]
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


# Launched once per layer in every forward pass on CUDA (engine/triton_fused.py).
ROTARY_KERNEL = "_rope_and_store_kv_kernel"


def kernel_profile(engine: LLMEngine, steps: int) -> dict:
    start_one(engine, steps + 1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    gpu_us = sum(e.self_device_time_total for e in kernels)
    rotary = next(e.count for e in kernels if e.key == ROTARY_KERNEL)
    forwards = rotary / engine.model_runner.model.config.num_hidden_layers
    return {
        "forwards_recorded": forwards,
        "gpu_ms_per_step": round(gpu_us / forwards / 1000, 3),
        "top_kernels": [
            {
                "name": e.key[:120],
                "calls_per_step": round(e.count / forwards, 1),
                "us_per_step": round(e.self_device_time_total / forwards, 1),
            }
            for e in kernels[:20]
        ],  # fmt: skip
        "host_ops_ms_per_step": [  # per engine step
            {"name": e.key[:80], "cpu_ms_per_step": round(e.cpu_time_total / steps / 1000, 3)}
            for e in sorted(prof.key_averages(), key=lambda e: e.cpu_time_total, reverse=True)[:15]
        ],  # fmt: skip
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ray-tgi-gpu"))
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    model_dir, weight_bytes = random_model_dir(LLAMA3_8B, args.work_dir / "llama3-8b",
                                               torch.bfloat16)  # fmt: skip
    engine = new_engine(model_dir, None)
    report = {"device": torch.cuda.get_device_name(), "weight_bytes": weight_bytes,
              "step_wall_ms": round(engine_batch1_ms(engine), 3),
              "graph_replay_ms": round(replay_ms(engine, args.steps), 3)}  # fmt: skip
    report.update(kernel_profile(engine, args.steps))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
