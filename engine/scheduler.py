"""`Scheduler`: continuous batching over a paged KV cache (plain Python, no torch).

Each step is either a prefill or one decode token for every running sequence. A prefill step
computes up to --max-batch-prefill-tokens prompt tokens: long prompts are split into chunks
over several prefill steps, with a decode step of the running sequences between two chunks,
so decodes keep flowing while a long prompt is read. Waiting sequences join between decode
steps by TGI's rule (see EngineConfig.waiting_served_ratio); finished sequences leave at
once. When a decode step cannot get a block, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later from its
prompt plus the tokens it has generated so far.
"""

import math
from collections import deque

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.protocol import FinishReason
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Owns the waiting and running queues and the block manager."""

    def __init__(self, config: EngineConfig, num_lookahead_slots: int = 0) -> None:
        self.block_size = config.block_size
        self.max_batch_prefill_tokens = config.max_batch_prefill_tokens
        self.max_batch_size = config.max_batch_size
        self.waiting_served_ratio = config.waiting_served_ratio
        self.max_waiting_tokens = config.max_waiting_tokens
        # TGI's waiting_tokens: steps since requests last joined the batch, the prefill that
        # let them in counted as one.
        self.num_steps_since_join = 0
        self.block_manager = BlockManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching,
            num_lookahead_slots,
        )  # fmt: skip
        self.waiting: deque[Sequence] = deque()  # FIFO; preempted sequences go to the front
        self.running: deque[Sequence] = deque()  # oldest first, so the newest is running[-1]
        self.prefilling: deque[Sequence] = deque()  # hold all their blocks, prompt partly read
        self.last_step_was_prefill = False
        self._seqs: dict[str, Sequence] = {}  # every unfinished sequence, by request id

    @property
    def num_cache_tokens(self) -> int:
        return self.block_manager.num_total_blocks * self.block_size

    def has_unfinished_seqs(self) -> bool:
        return bool(self._seqs)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ValueError if it could never be served."""
        if seq.request_id in self._seqs:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if seq.params.prefill_logprobs and seq.num_prompt_tokens > self.max_batch_prefill_tokens:
            raise ValueError(  # their logprobs come from one prefill step, never chunked
                f"decoder_input_details needs the whole prompt in one prefill: it has "
                f"{seq.num_prompt_tokens} tokens, max_batch_prefill_tokens is "
                f"{self.max_batch_prefill_tokens}"
            )
        if seq.max_num_tokens > self.num_cache_tokens:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_new_tokens "
                f"({seq.params.max_new_tokens}) exceeds the KV cache capacity of "
                f"{self.num_cache_tokens} tokens"
            )
        self._seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def restore(self, seq: Sequence, queue: str, num_blocks: int = 0) -> None:
        """Put a sequence rebuilt from a snapshot (engine/forecast.py) at the end of its
        queue, "waiting", "prefilling" or "running"; the last two get the `num_blocks` it
        held. Its num_cached_tokens says how much of it was read (a scheduler without a
        prefix cache leaves that as it is)."""
        self._seqs[seq.request_id] = seq
        if queue == "waiting":
            self.waiting.append(seq)
            return
        self.block_manager.allocate(seq, num_blocks)
        seq.status = SequenceStatus.RUNNING
        (self.prefilling if queue == "prefilling" else self.running).append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a sequence wherever it is and free its blocks; None if unknown or finished."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        else:
            self.running.remove(seq)
        self._release(seq)
        return seq

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Pick the next batch: (sequences, is_prefill); ([], False) when there is no work."""
        # Between two chunks of a long prompt, the running sequences decode once.
        decode_first = self.prefilling and self.running and self.last_step_was_prefill
        if not decode_first and (prefill := self._schedule_prefill(self._may_join())):
            self.num_steps_since_join = 1
            self.last_step_was_prefill = True
            return prefill, True
        self.last_step_was_prefill = False
        if decode := self._schedule_decode():
            self.num_steps_since_join += 1
            return decode, False
        # A lone sequence that preempted itself fits the now empty cache: recompute it.
        if prefill := self._schedule_prefill(admit_waiting=True):
            self.last_step_was_prefill = True
            return prefill, True
        return [], False

    def is_steady(self) -> bool:
        """Whether the next schedule decodes the running batch again, as long as no request
        arrives, ends or is aborted meanwhile: nothing waits and no prompt is half read."""
        return not self.waiting and not self.prefilling

    def _may_join(self) -> bool:
        """TGI's admission rule (see EngineConfig.waiting_served_ratio), as its batching
        loop computes it: the least number of waiting requests is floor(running x ratio)."""
        return (
            not self.running
            or self.num_steps_since_join >= self.max_waiting_tokens
            or len(self.waiting) >= math.floor(len(self.running) * self.waiting_served_ratio)
        )

    def _has_batch_slot(self, num_seqs: int) -> bool:
        return self.max_batch_size is None or num_seqs < self.max_batch_size

    def _schedule_prefill(self, admit_waiting: bool) -> list[Sequence]:
        """Chunks of partly read prompts first, then waiting sequences, within the budget."""
        scheduled: list[Sequence] = []
        budget = self.max_batch_prefill_tokens
        for seq in self.prefilling:
            if budget == 0:
                break
            seq.prefill_chunk = min(seq.num_uncomputed_tokens, budget)
            budget -= seq.prefill_chunk
            scheduled.append(seq)
        num_admitted = 0
        while admit_waiting and budget and self.waiting:
            if not self._has_batch_slot(len(self.running) + len(self.prefilling)):
                break
            seq = self.waiting[0]
            if seq.params.prefill_logprobs and scheduled and seq.num_tokens > budget:
                break  # its prompt must fit one step (see add)
            # Keep one block per running sequence free for its next decode token, so that
            # admitting a request does not immediately force a preemption.
            num_reserved = len(self.running) + num_admitted
            if not self.block_manager.can_allocate(seq, num_reserved):
                break
            self.block_manager.allocate(seq)  # all its blocks; a prefix hit fills some
            seq.status = SequenceStatus.RUNNING
            seq.prefill_chunk = min(seq.num_uncomputed_tokens, budget)
            budget -= seq.prefill_chunk
            self.waiting.popleft()
            self.prefilling.append(seq)
            scheduled.append(seq)
            num_admitted += 1
        return scheduled

    def finish_prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        """Account a prefill step: its chunks are in the cache now. Returns the sequences
        whose whole prompt is read, which have sampled a token and now decode."""
        completed = []
        for seq in seqs:
            seq.num_cached_tokens += seq.prefill_chunk
            seq.prefill_chunk = 0
            self.block_manager.register_computed_blocks(seq)
            if seq.num_cached_tokens == seq.num_tokens:
                self.prefilling.remove(seq)
                self.running.append(seq)
                completed.append(seq)
        return completed

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())  # the newest unscheduled sequence
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> None:
        """Append each sequence's new token; finish (and free) those that are done."""
        for seq, token_id in zip(seqs, token_ids, strict=True):
            seq.append_token(token_id)
            reason: FinishReason
            if token_id in seq.params.eos_token_ids:
                reason = "eos_token"
            elif seq.num_completion_tokens >= seq.params.max_new_tokens:
                reason = "length"
            else:
                continue
            seq.finish_reason = reason
            self.running.remove(seq)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.grammar = None  # frees its matcher now, not whenever the sequence is collected
        seq.status = SequenceStatus.FINISHED
        del self._seqs[seq.request_id]
