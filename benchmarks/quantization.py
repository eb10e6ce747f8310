"""`--quantize eetq` (int8 weight-only) against the unquantized fp32 engine, on CPU.

Engine only (no HTTP), same model, same prompts, one process, one after the other:
  1. weight memory: bytes of the loaded model's weights (state_dict);
  2. greedy answers: chat prompts, up to --max-new-tokens each, text compared side by side
     ("What is the capital of France?" -> "... Paris."); and, since one differing token sends
     two greedy answers apart, the fp32 answers scored by both models (teacher forcing): the
     mean negative log-likelihood per answer token (exp of it is the perplexity);
  3. decode speed: --batch-sizes requests of --prompt-len random tokens, --decode-len new
     tokens each; the median decode step after two warm-up steps, as output tok/s;
     prefill time of the whole batch too.
Ratios are eetq / fp32. Writes results/quantization.json.

    python -m benchmarks.quantization
"""

import argparse
import json
import math
import sys
import time

import torch
from transformers import AutoTokenizer

from benchmarks.common import RESULTS_DIR, machine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams
from engine.quantization import weight_bytes
from engine.weights import DEFAULT_MODEL_ID, resolve_model_dir

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "Name the largest planet in the solar system.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Give me three tips for sleeping well.",
]


def chat_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def greedy_answers(engine: LLMEngine, tokenizer, eos_ids: frozenset[int], max_new: int):
    """Each question alone (batch 1), greedy; returns (texts, token id lists)."""
    texts, token_lists = [], []
    for i, ids in enumerate(chat_prompts(tokenizer)):
        engine.add_request(f"q{i}", ids, SamplingParams(max_new_tokens=max_new,
                                                        eos_token_ids=eos_ids))  # fmt: skip
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            tokens += [step.token_id for step in engine.step()]
        token_lists.append(tokens)
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts, token_lists


def answer_nll(engine: LLMEngine, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """Mean negative log-likelihood of each answer's tokens after its prompt, in nats/token."""
    total, count = 0.0, 0
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        params = SamplingParams(max_new_tokens=1, prefill_logprobs=True)
        engine.add_request(f"nll{i}", prompt + answer, params)
        steps = []
        while engine.has_unfinished_requests():
            steps += engine.step()
        logprobs = steps[0].prefill_logprobs[len(prompt) :]  # those of the answer's tokens
        total -= sum(logprobs)
        count += len(logprobs)
    return total / count


def decode_speed(engine: LLMEngine, batch: int, prompt_len: int, decode_len: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(100, 49000, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"b{batch}-{i}", prompt, SamplingParams(max_new_tokens=decode_len))
    start = time.perf_counter()
    engine.step()  # the whole batch's prefill (it fits one step)
    prefill_s = time.perf_counter() - start
    step_times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
    steady = sorted(step_times[2:])
    ms = 1000 * steady[len(steady) // 2]
    return {
        "batch_size": batch,
        "prefill_ms": round(1000 * prefill_s, 1),
        "decode_ms_per_step_p50": round(ms, 2),
        "output_tok_s": round(batch * 1000 / ms, 2),
    }


def run_side(model_dir, quantize: str | None, args, tokenizer, eos_ids) -> dict:
    config = EngineConfig(
        model_dir=str(model_dir),
        quantize=quantize,
        device="cpu",
        max_batch_total_tokens=16384,
        max_batch_prefill_tokens=max(args.batch_sizes) * args.prompt_len,
    )
    start = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - start
    side = {
        "quantize": quantize,
        "load_s": round(load_s, 2),
        "weight_bytes": weight_bytes(engine.model_runner.model),
    }
    side["answers"], side["answer_token_ids"] = greedy_answers(
        engine, tokenizer, eos_ids, args.max_new_tokens
    )
    side["engine"] = engine  # scores the other side's answers later
    side["decode"] = [decode_speed(engine, b, args.prompt_len, args.decode_len)
                      for b in args.batch_sizes]  # fmt: skip
    print(json.dumps(_public(side), indent=1), flush=True)
    return side


def _public(side: dict) -> dict:
    return {k: v for k, v in side.items() if k not in ("answer_token_ids", "engine")}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default=str(RESULTS_DIR / "quantization.json"))
    args = p.parse_args(argv)
    model_dir = resolve_model_dir(DEFAULT_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from engine.__main__ import eos_token_ids

    eos_ids = eos_token_ids(model_dir)
    fp32 = run_side(model_dir, None, args, tokenizer, eos_ids)
    # One engine at a time in memory: fp32's is dropped before eetq's loads, and its answers'
    # likelihood under fp32 is taken first.
    prompts = chat_prompts(tokenizer)
    fp32["answer_nll"] = answer_nll(fp32.pop("engine"), prompts, fp32["answer_token_ids"])
    eetq = run_side(model_dir, "eetq", args, tokenizer, eos_ids)
    eetq["answer_nll"] = answer_nll(eetq.pop("engine"), prompts, fp32["answer_token_ids"])
    pairs = zip(fp32["answer_token_ids"], eetq["answer_token_ids"], strict=True)
    same = [first_difference(a, b) for a, b in pairs]
    report = {
        "name": "quantization",
        "command": "python -m benchmarks.quantization " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "answers": [
            {"question": q, "fp32": a, "eetq": b, "first_differing_token": d}
            for q, a, b, d in zip(QUESTIONS, fp32["answers"], eetq["answers"], same, strict=True)
        ],
        "identical_answers": sum(d is None for d in same),
        # The fp32 answers' mean NLL (nats/token) under each model; exp(difference) is the
        # perplexity ratio.
        "fp32_answers_nll": {
            "fp32": round(fp32["answer_nll"], 4),
            "eetq": round(eetq["answer_nll"], 4),
        },  # fmt: skip
        "ratios": {
            "weight_bytes": round(eetq["weight_bytes"] / fp32["weight_bytes"], 4),
            "fp32_answers_perplexity": round(math.exp(eetq["answer_nll"] - fp32["answer_nll"]), 4),
            **{
                f"decode_tok_s_batch_{a['batch_size']}": round(
                    b["output_tok_s"] / a["output_tok_s"], 4
                )
                for a, b in zip(fp32["decode"], eetq["decode"], strict=True)
            },
            **{
                f"prefill_ms_batch_{a['batch_size']}": round(b["prefill_ms"] / a["prefill_ms"], 4)
                for a, b in zip(fp32["decode"], eetq["decode"], strict=True)
            },
        },
        "sides": {side["quantize"] or "fp32": _public(side) for side in (fp32, eetq)},
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({"ratios": report["ratios"], "answers": report["answers"]}, indent=1))


if __name__ == "__main__":
    main()
