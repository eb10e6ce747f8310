"""`LLMEngine`: the embedded engine's core loop, schedule -> run -> postprocess.

Single-threaded by design: the HTTP layer drives it from one loop thread, adding and aborting
requests between steps. It works in token ids only (see engine/protocol.py).
"""

from dataclasses import dataclass, replace

from transformers import AutoConfig, PretrainedConfig

from engine.config import EngineConfig
from engine.forecast import num_step_tokens
from engine.model_runner import ModelRunner
from engine.protocol import SamplingParams, TokenStep
from engine.scheduler import Scheduler
from engine.sequence import Sequence


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for metrics and the router."""

    num_waiting: int
    num_running: int
    num_batch_tokens: int  # tokens held by running sequences
    num_batch_max_tokens: int  # tokens they may grow to (prompt + max_new_tokens each)
    num_free_blocks: int
    num_total_blocks: int
    num_prefix_lookups: int  # full prompt blocks looked up in the prefix cache, since start
    num_prefix_hits: int  # ... and found there
    max_batch_total_tokens: int


def scheduler_stats(scheduler: Scheduler, max_batch_total_tokens: int) -> EngineStats:
    """The load of a scheduler's queues and KV cache (benchmarks.routing_sim reads it too)."""
    batch = [*scheduler.running, *scheduler.prefilling]
    return EngineStats(
        num_waiting=len(scheduler.waiting),
        num_running=len(batch),
        num_batch_tokens=sum(seq.num_tokens for seq in batch),
        num_batch_max_tokens=sum(seq.max_num_tokens for seq in batch),
        num_free_blocks=scheduler.block_manager.num_free_blocks,
        num_total_blocks=scheduler.block_manager.num_total_blocks,
        num_prefix_lookups=scheduler.block_manager.num_prefix_lookups,
        num_prefix_hits=scheduler.block_manager.num_prefix_hits,
        max_batch_total_tokens=max_batch_total_tokens,
    )


class LLMEngine:
    """Continuous-batching generation over a paged KV cache, one `step()` at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.model_config: PretrainedConfig = AutoConfig.from_pretrained(config.model_dir)
        self.model_runner = ModelRunner(config, self.model_config)
        if config.max_batch_total_tokens is None:  # sized from GPU memory by the runner
            num_tokens = self.model_runner.num_kv_blocks * config.block_size
            config = replace(config, max_batch_total_tokens=num_tokens)
        self.config = config
        # A step run ahead writes one position past each sequence's newest token.
        self.scheduler = Scheduler(config, num_lookahead_slots=int(self.model_runner.decode_ahead))
        self.last_step_was_prefill = False
        self.last_step_num_tokens = 0  # tokens its forward pass computed

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. ValueError if the id is in use or it can never fit the KV cache."""
        self.scheduler.add(Sequence(request_id, prompt_ids, params, self.config.block_size))

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown or finished ids are ignored."""
        if self.scheduler.abort(request_id) is not None:
            self.model_runner.release(request_id)

    def shutdown(self) -> None:
        """Release what outlives the object: the other shards' processes, when sharded."""
        self.model_runner.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_seqs()

    def step(self) -> list[TokenStep]:
        """Run one prefill or decode step; one TokenStep per sequence that produced a token
        in it (a prompt chunk short of the prompt's end produces none); [] when idle."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        self.last_step_was_prefill = is_prefill  # for metrics: TGI's {method} label
        self.last_step_num_tokens = num_step_tokens(seqs, is_prefill)
        out = self.model_runner.run(seqs, is_prefill, steady=self.scheduler.is_steady())
        if is_prefill:
            seqs = self.scheduler.finish_prefill(seqs)
        self.scheduler.postprocess(seqs, out.token_ids)
        steps = []
        for i, seq in enumerate(seqs):
            if seq.is_finished:
                self.model_runner.release(seq.request_id)
            steps.append(
                TokenStep(
                    seq.request_id,
                    out.token_ids[i],
                    out.logprobs[i],
                    seq.finish_reason,
                    top_tokens=out.top_tokens[i],
                    prefill_logprobs=out.prefill_logprobs[i],
                )
            )
        return steps

    def stats(self) -> EngineStats:
        return scheduler_stats(self.scheduler, self.config.max_batch_total_tokens)
