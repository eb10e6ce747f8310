"""Tensor-parallel sharding (`--num-shard N`): the split arithmetic, the flag rules, greedy
output equal to one shard's, and failures that end the launcher instead of hanging it.

The process tests run real shard processes (gloo on CPU) of the real default model.
"""

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from deployments.launcher import Launcher, embedded_env, free_port, launcher_command
from engine.args import resolve_num_shard
from engine.attention import AttentionMetadata
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.llama import rank_slices
from engine.protocol import SamplingParams
from engine.tensor_parallel import TensorParallel, check_shardable, split_evenly

PARIS = "The capital of France is Paris."
WAIT_S = 30  # the bound on noticing a dead shard (or rank 0) and cleaning up


# --- split arithmetic and flag rules ------------------------------------------------------


@pytest.mark.parametrize(
    "total, parts, sizes",
    [(3, 2, [2, 1]), (9, 2, [5, 4]), (1536, 2, [768, 768]), (7, 3, [3, 2, 2]), (4, 4, [1] * 4)],
)
def test_split_evenly_gives_the_first_parts_the_remainder(total, parts, sizes):
    assert split_evenly(total, parts) == sizes
    starts = [TensorParallel(rank, parts).part(total)[0] for rank in range(parts)]
    assert starts == [sum(sizes[:rank]) for rank in range(parts)]


def test_uneven_head_split_of_the_default_model(default_model_dir):
    config = AutoConfig.from_pretrained(default_model_dir)  # 9 query / 3 KV heads of 64
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    rank0, rank1 = (rank_slices(config, TensorParallel(rank, 2)) for rank in (0, 1))
    # (dim, start, size): rank 0 has KV heads 0-1 and query heads 0-5, rank 1 the rest
    assert (rank0["k_proj"], rank1["k_proj"]) == ((0, 0, 128), (0, 128, 64))
    assert (rank0["q_proj"], rank1["q_proj"]) == ((0, 0, 384), (0, 384, 192))
    assert (rank0["o_proj"], rank1["o_proj"]) == ((1, 0, 384), (1, 384, 192))
    assert (rank0["gate_proj"], rank1["down_proj"]) == ((0, 0, 768), (1, 768, 768))


def test_more_shards_than_kv_heads_are_refused_before_spawning(default_model_dir):
    check_shardable(num_kv_heads=3, num_shard=3)
    with pytest.raises(ValueError, match="only 3 KV heads"):
        check_shardable(num_kv_heads=3, num_shard=4)
    config = EngineConfig(model_dir=str(default_model_dir), device="cpu", num_shard=4)
    with pytest.raises(ValueError, match=r"--num-shard <= 3"):
        LLMEngine(config)


@pytest.mark.parametrize(
    "sharded, num_shard, num_gpus, expected",
    [(None, None, 0, 1), (None, 3, 0, 3), (False, None, 8, 1), (False, 1, 0, 1),
     (True, None, 4, 4), (True, 2, 0, 2), (None, 2, 2, 2)],
)  # fmt: skip
def test_num_shard_follows_tgis_rule(sharded, num_shard, num_gpus, expected):
    assert resolve_num_shard(sharded, num_shard, num_gpus) == expected


@pytest.mark.parametrize(
    "sharded, num_shard, num_gpus, message",
    [
        (False, 2, 0, "`--sharded false` contradicts `--num-shard 2`"),
        (True, None, 0, "needs --num-shard or more than one GPU"),
        (True, None, 1, "found 1 CUDA devices"),
        (True, 1, 0, "contradicts `--num-shard 1`"),
        (None, 0, 0, "must be >= 1"),
        (None, 4, 2, "needs one GPU per shard; found 2"),
    ],
)
def test_contradictory_shard_flags_are_refused(sharded, num_shard, num_gpus, message):
    with pytest.raises(ValueError, match=message):
        resolve_num_shard(sharded, num_shard, num_gpus)


def test_attention_metadata_moves_every_tensor_to_the_shards_device():
    slots = torch.arange(4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    prefill = AttentionMetadata(is_prefill=True, slot_mapping=slots, seq_lens=[2, 4],
                                prefill_context_slots=[slots, slots],
                                prefill_masks=[mask, None])  # fmt: skip
    decode = AttentionMetadata(is_prefill=False, slot_mapping=slots[:2], context_slots=slots,
                               context_mask=torch.ones(2, 1, 1, 2, dtype=torch.bool))  # fmt: skip
    assert prefill.to(slots.device) is prefill  # already there: no copy
    meta = torch.device("meta")
    moved = [prefill.to(meta), decode.to(meta)]
    tensors = [moved[0].slot_mapping, *moved[0].prefill_context_slots, moved[0].prefill_masks[0],
               moved[1].slot_mapping, moved[1].context_slots, moved[1].context_mask]  # fmt: skip
    assert all(t.device == meta for t in tensors)
    assert (moved[0].seq_lens, moved[0].prefill_masks[1]) == ([2, 4], None)


# --- real shards -------------------------------------------------------------------------


def generate_together(
    engine: LLMEngine, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Submit every prompt at once, run to the end; the greedy token ids of each."""
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for request_id, prompt in zip(outputs, prompts, strict=True):
        engine.add_request(request_id, prompt, SamplingParams(max_new_tokens=max_new_tokens))
    for _ in range(10 * max_new_tokens):  # bounded: prefill steps + one decode step per token
        if not engine.has_unfinished_requests():
            break
        for step in engine.step():
            outputs[step.request_id].append(step.token_id)
    assert not engine.has_unfinished_requests()
    return list(outputs.values())


@pytest.mark.slow
def test_two_shards_generate_the_same_greedy_tokens_as_one(default_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True),
        tokenizer("Hello")["input_ids"],
        tokenizer("def fibonacci(n):")["input_ids"],
        tokenizer("Once upon a time, in a small village nestled between rolling hills and a "
                  "quiet river, there lived an old clockmaker named Elias.")["input_ids"],
        tokenizer("1, 2, 3, 4, 5,")["input_ids"],
    ]  # fmt: skip
    assert len({len(p) for p in prompts}) == len(prompts)
    outputs = {}
    for num_shard in (1, 2):
        config = EngineConfig(model_dir=str(default_model_dir), max_batch_total_tokens=2048,
                              device="cpu", num_shard=num_shard, master_port=free_port(),
                              shard_uds_path=str(tmp_path / "shard"))  # fmt: skip
        engine = LLMEngine(config)
        shards = engine.model_runner.shards
        worker_pids = shards.pids if shards is not None else []
        try:
            outputs[num_shard] = generate_together(engine, prompts, max_new_tokens=32)
            # Again: the prompts' full blocks now come from the prefix cache, so the shards
            # also attend through cached contexts (prefill_context_slots).
            again = generate_together(engine, prompts, max_new_tokens=32)
            assert engine.stats().num_prefix_hits > 0
        finally:
            engine.shutdown()
        assert again == outputs[num_shard]
        assert not any(psutil.pid_exists(pid) for pid in worker_pids)  # reaped by shutdown
    assert outputs[2] == outputs[1]
    assert all(len(tokens) == 32 for tokens in outputs[2])
    assert tokenizer.decode(outputs[2][0]).startswith(PARIS)


@contextmanager
def sharded_launcher(model_dir: Path, tmp_path: Path, num_shard: int) -> Iterator[Launcher]:
    """`python -m engine --num-shard N` on free ports, healthy; killed (group) on exit."""
    flags = ["--model-id", str(model_dir), "--num-shard", str(num_shard),
             "--max-total-tokens", "512", "--max-batch-total-tokens", "2048",
             "--master-port", str(free_port()),
             "--shard-uds-path", str(tmp_path / "shard")]  # fmt: skip
    launcher = Launcher(launcher_command("embedded", flags), env=embedded_env())
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop(grace_s=5)


def shard_processes(launcher: Launcher) -> list[psutil.Process]:
    """Ranks 1..N-1, in rank order (each is named PATH-RANK on its command line)."""
    children = psutil.Process(launcher.pid).children()
    shards = [c for c in children if "engine.shard" in " ".join(c.cmdline())]
    return sorted(shards, key=lambda c: c.cmdline()[-1])


def wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `processes` (not our children: psutil would reap them behind Popen's back)
    still running after `timeout_s`; zombies count as gone."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def wait_exit(launcher: Launcher, timeout_s: float) -> int | None:
    """The launcher's exit status, or None if it still runs after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while launcher.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # for the log pump to read its last lines
    return launcher.returncode


@pytest.mark.slow
def test_two_shard_server_answers_the_chat(default_model_dir, tmp_path):
    with sharded_launcher(default_model_dir, tmp_path, num_shard=2) as launcher:
        launcher.wait_until_healthy(timeout_s=120)
        assert len(shard_processes(launcher)) == 1
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"messages": messages, "max_tokens": 20, "temperature": 0}
        reply = httpx.post(f"{launcher.url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == PARIS
        (shard,) = shard_processes(launcher)
        # SIGTERM to the process group, as a supervisor stops it: the shard ignores it and
        # goes with rank 0; rank 0 does not take that for a shard failure.
        launcher.stop()
        assert not wait_gone([shard], timeout_s=WAIT_S)
        assert "exited with code" not in launcher.tail()


@pytest.mark.slow
def test_a_killed_shard_stops_the_launcher_and_the_other_shards(default_model_dir, tmp_path):
    with sharded_launcher(default_model_dir, tmp_path, num_shard=3) as launcher:
        launcher.wait_until_healthy(timeout_s=180)
        shard1, shard2 = shard_processes(launcher)
        serving = threading.Thread(target=long_request, args=(launcher.url,), daemon=True)
        serving.start()
        time.sleep(1.0)  # the request is being decoded
        shard2.send_signal(signal.SIGKILL)
        assert wait_exit(launcher, timeout_s=WAIT_S) not in (None, 0)
        assert "shard 2 exited with code -9; stopping" in launcher.tail()
        assert not wait_gone([shard1], timeout_s=WAIT_S)
        serving.join(timeout=WAIT_S)


def long_request(url: str) -> None:
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 400}}
    with contextlib.suppress(httpx.HTTPError):  # expected: the server goes away mid-request
        httpx.post(f"{url}/generate", json=body, timeout=WAIT_S)


@pytest.mark.slow
def test_a_shard_dying_during_start_up_ends_the_launcher(default_model_dir, tmp_path):
    with sharded_launcher(default_model_dir, tmp_path, num_shard=2) as launcher:
        deadline = time.monotonic() + WAIT_S
        while not (shards := shard_processes(launcher)) and time.monotonic() < deadline:
            time.sleep(0.05)
        shards[0].send_signal(signal.SIGKILL)  # rank 0 is still waiting for it to join
        assert wait_exit(launcher, timeout_s=WAIT_S) not in (None, 0)
        assert "shard 1 exited with code -9; stopping" in launcher.tail()


@pytest.mark.slow
def test_shards_exit_when_rank_0_is_killed(default_model_dir, tmp_path):
    with sharded_launcher(default_model_dir, tmp_path, num_shard=3) as launcher:
        launcher.wait_until_healthy(timeout_s=180)
        shards = shard_processes(launcher)
        assert len(shards) == 2
        psutil.Process(launcher.pid).send_signal(signal.SIGKILL)
        assert not wait_gone(shards, timeout_s=WAIT_S)
