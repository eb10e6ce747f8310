"""CUDA graphs of the decode step: the whole forward plus the LM head, replayed per step.

Eager decode launches ~10 kernels per layer from Python, which on a fast GPU costs more than
the kernels themselves. A graph records the launches once per batch-size bucket and replays
them with one call. Graphs need fixed shapes and addresses, so each step's inputs are copied
into static buffers sized for the largest bucket; a batch runs in the smallest bucket that
holds it, its padding rows writing their K/V into a scratch block no sequence owns. Buckets
are captured largest first, all sharing one memory pool (the largest's activations cover the
smaller ones). A batch larger than the largest bucket runs as several replays: each reads the
weights again, which still costs far less than an eager step (~86 ms on an H100 for an 8B
model, launch-bound).

This is TGI's `--cuda-graphs` (batch sizes to capture; `0` turns graphs off).
"""

from collections.abc import Sequence
from dataclasses import replace

import torch

from engine.attention import AttentionMetadata
from engine.models.llama import KVCache, LlamaForCausalLM

# Finer and larger than TGI's default (1..128): at unlimited rate a big GPU's batch runs to
# hundreds of sequences (1,000 chat requests reach ~900 on an H200).
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32),
                       *range(576, 1025, 64))  # fmt: skip


class DecodeGraphs:
    """Captured decode steps for a set of batch sizes; `run` replays the right one."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        batch_sizes: Sequence[int],
        max_blocks_per_seq: int,
        scratch_slot: int,  # a cache slot outside every sequence's blocks
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = sorted(set(batch_sizes))
        self.scratch_slot = scratch_slot
        device = kv_caches[0][0].device
        n = self.batch_sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)  # [n]
        self.positions = torch.zeros(n, dtype=torch.long, device=device)  # [n]
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)  # [n]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # per bucket: [bucket, vocab], static
        self._capture()

    def _forward(self, batch: int) -> torch.Tensor:  # [batch, vocab]
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            context_lens=self.context_lens[:batch],
        )
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for batch in reversed(self.batch_sizes):
            self._forward(batch)  # compiles the Triton kernels, warms cuBLAS up
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def run(
        self,
        input_ids: torch.Tensor,  # [b]
        positions: torch.Tensor,  # [b]
        meta: AttentionMetadata,  # decode metadata with block_tables and context_lens
    ) -> torch.Tensor:  # [b, vocab] logits (a view into a graph's output: use before next run)
        assert meta.block_tables is not None and meta.context_lens is not None
        largest = self.batch_sizes[-1]
        if input_ids.shape[0] <= largest:
            return self._replay(input_ids, positions, meta)
        chunks = []
        for start in range(0, input_ids.shape[0], largest):
            rows = slice(start, start + largest)
            chunk_meta = replace(meta, slot_mapping=meta.slot_mapping[rows],
                                 block_tables=meta.block_tables[rows],
                                 context_lens=meta.context_lens[rows])  # fmt: skip
            # The graphs share one memory pool: copy each chunk's logits out before the next.
            chunks.append(self._replay(input_ids[rows], positions[rows], chunk_meta).clone())
        return torch.cat(chunks)

    def _replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [b, vocab], b <= the largest bucket
        batch = input_ids.shape[0]
        bucket = next(size for size in self.batch_sizes if size >= batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.slot_mapping[batch:bucket].fill_(self.scratch_slot)
        self.context_lens[:batch].copy_(meta.context_lens)
        self.context_lens[batch:bucket].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        self.graphs[bucket].replay()
        return self.logits[bucket][:batch]
