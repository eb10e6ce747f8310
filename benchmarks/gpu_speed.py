"""GPU speed of the embedded engine against the hardware limit and HF transformers, one run.

Llama-3-8B-shaped model, random bf16 weights, fixed output lengths (no EOS), engine API
in-process (no HTTP). Measured:
- the HBM copy bandwidth, and from it the batch-1 decode floor (weight bytes / bandwidth);
- batch-1 decode ms/token (engine, and HF `generate`);
- the engine's figures again with decode ahead off (each step launched only after the host
  read the last one's tokens: the engine before engine/decode_ahead.py);
- 64 x (512 in, 256 out) output tok/s (engine, HF static `generate`, HF continuous batching);
- N chat-like requests (long-tailed lengths, all submitted at once) output tok/s (engine;
  over the first --hf-chat-requests: HF static `generate` in arrival-order batches of 64,
  each batch running to its longest output, counting only the tokens each request asked for,
  and HF continuous batching, each request with its own max_new_tokens).
The report is rewritten after each measurement, so a run cut short keeps what it measured.

    python -m benchmarks.gpu_speed --out results/gpu_speed.json [--skip-hf]
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch

from benchmarks.gpu_engine import LLAMA3_8B, random_model_dir
from benchmarks.workload import LengthDist
from engine.args import parse_cuda_graphs
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

VOCAB = LLAMA3_8B["vocab_size"]


def copy_bandwidth() -> float:
    """Bytes moved per second by a device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * reps / (time.perf_counter() - start)


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB - 1, (n,), generator=gen).tolist() for n in lengths]


def chat_lengths(num: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    inputs, outputs = LengthDist.parse("chat:200:2048"), LengthDist.parse("chat:200:1024")
    return [(inputs.sample(rng), outputs.sample(rng)) for _ in range(num)]


def new_engine(model_dir: Path, cuda_graphs: tuple[int, ...] | None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model_dir=str(model_dir), dtype="bfloat16", device="cuda",
                     max_batch_total_tokens=None, cuda_memory_fraction=0.9,
                     max_batch_prefill_tokens=8192, cuda_graphs=cuda_graphs)
    )  # fmt: skip


def engine_run(engine: LLMEngine, prompts: list[list[int]], outputs: list[int]) -> dict:
    """Submit every request at once, run to the end; output tok/s over the wall time."""
    for i, (prompt, num_new) in enumerate(zip(prompts, outputs, strict=True)):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=num_new))
    runner = engine.model_runner
    run_ahead, taken = runner.num_steps_run_ahead, runner.num_steps_ahead_taken
    torch.cuda.synchronize()
    start, num_tokens, steps = time.perf_counter(), 0, []
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        num_sampled = len(engine.step())  # returns once its tokens are on the host
        steps.append((engine.last_step_was_prefill, num_sampled, time.perf_counter() - step_start))
        num_tokens += num_sampled
    wall = time.perf_counter() - start
    assert num_tokens == sum(outputs), (num_tokens, sum(outputs))
    return {"output_tokens": num_tokens, "wall_s": round(wall, 3),
            "output_tok_s": round(num_tokens / wall, 1), "steps": len(steps),
            "decode_steps_run_ahead": runner.num_steps_run_ahead - run_ahead,
            "of_them_taken": runner.num_steps_ahead_taken - taken,
            "time_by_step_kind": step_breakdown(steps)}  # fmt: skip


def step_breakdown(steps: list[tuple[bool, int, float]]) -> dict:
    """Seconds and step counts of prefill steps, and of decode steps by batch size range:
    where the wall time goes."""
    buckets: dict[str, list[float]] = {}
    for is_prefill, batch, seconds in steps:
        if is_prefill:
            key = "prefill"
        else:
            low = next(b for b in (512, 256, 128, 64, 1) if batch >= b)
            key = f"decode_batch_{low}+"
        entry = buckets.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
    return {k: {"steps": n, "seconds": round(s, 3), "ms_per_step": round(1000 * s / n, 2)}
            for k, (n, s) in sorted(buckets.items())}  # fmt: skip


def engine_batch1_ms(engine: LLMEngine) -> float:
    """ms per token of one request decoding alone, as its stream sees them: the wall time of
    its decode steps over their number. No synchronisation between steps, which would stop
    the engine from launching one step ahead (engine/decode_ahead.py)."""
    engine.add_request("b1", random_prompts([128], 5)[0], SamplingParams(max_new_tokens=128))
    engine.step()  # prefill
    engine.step()  # the first decode, launched alone
    torch.cuda.synchronize()
    start, num_steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / num_steps


def hf_static(model, prompts: list[list[int]], outputs: list[int], batch: int = 64) -> dict:
    """HF `generate` over arrival-order batches, each padded left and run to its longest
    output; only the tokens each request asked for count."""
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk, wants = prompts[i : i + batch], outputs[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                            device="cuda")  # fmt: skip
        longest = max(wants)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                       do_sample=False, pad_token_id=0)  # fmt: skip
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "output_tokens": sum(outputs), "wall_s": round(wall, 3),
            "output_tok_s": round(sum(outputs) / wall, 1)}  # fmt: skip


def hf_batch1_ms(model) -> float:
    ids = torch.tensor(random_prompts([128], 5), device="cuda")
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / 128


def hf_continuous(model, prompts: list[list[int]], outputs: list[int]) -> dict:
    """HF's own continuous batching (transformers' `continuous_batching_context_manager`):
    every request submitted at once with its own max_new_tokens. Its warm-up (CUDA graph
    capture) runs before the clock starts, as the engine's does at start-up."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    config = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=None,
                              pad_token_id=0)  # fmt: skip
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                          max_generated_length=max(outputs), num_requests=len(prompts))  # fmt: skip
    # No inference_mode here: the manager's thread updates tensors made in this one, which
    # inference_mode forbids ("Inplace update to inference tensor outside InferenceMode").
    with (
        torch.no_grad(),
        model.continuous_batching_context_manager(
            generation_config=config, block=True, timeout=600, workload_hints=hints
        ) as manager,
    ):
        start = time.perf_counter()
        for i, (prompt, num_new) in enumerate(zip(prompts, outputs, strict=True)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=num_new)
        results = [manager.get_result(timeout=600) for _ in prompts]
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    assert all(r is not None for r in results), "a request did not come back within 600 s"
    # Counted from what came back, not assumed from what was asked.
    total = sum(len(r.generated_tokens) for r in results)
    return {"requests": len(prompts), "output_tokens": total, "wanted_tokens": sum(outputs),
            "wall_s": round(wall, 3), "output_tok_s": round(total / wall, 1)}  # fmt: skip


def run_hf(model_dir: Path, fixed, chat, num_chat: int, report: dict, save) -> None:
    from transformers import LlamaForCausalLM

    chat_head = (chat[0][:num_chat], chat[1][:num_chat])
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.inference_mode():
        report["hf_batch1_ms_per_token"] = round(hf_batch1_ms(hf), 3)
        report["hf_static_64x512x256"] = hf_static(hf, *fixed)
        save()
        report["hf_static_chat"] = hf_static(hf, *chat_head)
        save()
    del hf
    torch.cuda.empty_cache()
    paged = "paged|sdpa"  # transformers 5's name for its paged attention
    cb = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                          attn_implementation=paged).cuda().eval()  # fmt: skip
    for key, workload in (("hf_continuous_64x512x256", fixed), ("hf_continuous_chat", chat_head)):
        try:
            report[key] = hf_continuous(cb, *workload)
        except Exception as exc:  # noqa: BLE001 - a baseline's failure is reported, not fatal
            report[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        save()


def ratio(report: dict, ours: str, theirs: str) -> float | None:
    """Our output tok/s over the baseline's, when both ran."""
    mine, base = report.get(ours, {}), report.get(theirs, {})
    if not mine.get("output_tok_s") or not base.get("output_tok_s"):
        return None
    return round(mine["output_tok_s"] / base["output_tok_s"], 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ray-tgi-gpu"))
    p.add_argument("--chat-requests", type=int, default=1000)
    p.add_argument("--hf-chat-requests", type=int, default=128)
    p.add_argument("--cuda-graphs", type=str, default=None,
                   help="decode batch sizes to capture, e.g. 1,2,4; 0: none")  # fmt: skip
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    model_dir, weight_bytes = random_model_dir(LLAMA3_8B, args.work_dir / "llama3-8b",
                                               torch.bfloat16)  # fmt: skip
    bandwidth = copy_bandwidth()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "weight_bytes": weight_bytes, "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
                    "batch1_floor_ms": round(1000 * weight_bytes / bandwidth, 3)}  # fmt: skip
    fixed = (random_prompts([512] * 64, 6), [256] * 64)
    lengths = chat_lengths(args.chat_requests, 7)
    chat = (random_prompts([n for n, _ in lengths], 8), [m for _, m in lengths])
    engine = new_engine(model_dir, parse_cuda_graphs(args.cuda_graphs))
    report["engine_batch1_ms_per_token"] = round(engine_batch1_ms(engine), 3)
    report["engine_batch1_fraction_of_roofline"] = round(
        report["batch1_floor_ms"] / report["engine_batch1_ms_per_token"], 3
    )

    def save() -> None:
        print(report, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    report["engine_64x512x256"] = engine_run(engine, *fixed)
    save()
    report["engine_chat"] = engine_run(engine, *chat)
    save()
    engine.model_runner.decode_ahead = False  # the same engine, one step at a time
    # Same lengths, other tokens: the prefix cache must not serve the prompts run above.
    report["one_step_at_a_time"] = {
        "engine_batch1_ms_per_token": round(engine_batch1_ms(engine), 3),
        "engine_64x512x256": engine_run(engine, random_prompts([512] * 64, 16), fixed[1]),
        "engine_chat": engine_run(engine, random_prompts(list(map(len, chat[0])), 18), chat[1]),
    }  # fmt: skip
    save()
    del engine
    torch.cuda.empty_cache()
    if not args.skip_hf:
        run_hf(model_dir, fixed, chat, args.hf_chat_requests, report, save)
        for workload in ("64x512x256", "chat"):
            for baseline in ("hf_static", "hf_continuous"):
                report[f"ratio_{workload}_vs_{baseline}"] = ratio(
                    report, f"engine_{workload}", f"{baseline}_{workload}"
                )
    save()


if __name__ == "__main__":
    main()
