"""CUDA graphs of the decode step: the whole forward plus the LM head, replayed per step.
Short prefills replay them too, a row per new token (BatchInputBuilder.prepare_prefill_rows).

Eager decode launches ~10 kernels per layer from Python, which on a fast GPU costs more than
the kernels themselves. A graph records the launches once per batch-size bucket and replays
them with one call. Graphs need fixed shapes and addresses, so each step's inputs are copied
into static buffers sized for the largest bucket; a batch runs in the smallest bucket that
holds it, its padding rows writing their K/V into a scratch block no sequence owns. Buckets
are captured largest first, all sharing one memory pool (the largest's activations cover the
smaller ones).

This is TGI's `--cuda-graphs` (batch sizes to capture; `0` turns graphs off).
"""

from collections.abc import Sequence

import torch

from engine.attention import AttentionMetadata
from engine.models.llama import KVCache, LlamaForCausalLM

# Finer than TGI's default (1..128): at unlimited rate a big GPU's batch runs to hundreds of
# sequences, and an eager step there costs more in Python than the graph's kernels.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32))


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
        self.block_size = kv_caches[0][0].shape[1]  # [num_blocks, block_size, heads, dim]
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

    def can_run(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def run(
        self,
        input_ids: torch.Tensor,  # [b]
        positions: torch.Tensor,  # [b]
        meta: AttentionMetadata,  # decode metadata with block_tables and context_lens
    ) -> torch.Tensor:  # [b, vocab] logits (a view into the graph's output: use before next run)
        batch = input_ids.shape[0]
        assert meta.block_tables is not None and meta.context_lens is not None
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.context_lens[:batch].copy_(meta.context_lens)
        self._set_block_tables_and_padding(meta.block_tables)
        return self.replay(batch)

    def replay(self, batch: int) -> torch.Tensor:  # [batch, vocab], as `run`
        """Run the graph on the inputs the static buffers hold."""
        bucket = self._bucket(batch)
        self.graphs[bucket].replay()
        return self.logits[bucket][:batch]

    def advance(
        self,
        token_ids: torch.Tensor,  # [b] the last step's samples, on the GPU
        block_tables: torch.Tensor,  # [k, max_blocks] int32, the sequences that go on
        keep_rows: list[int] | None = None,  # their rows in the last step; None: all b
    ) -> None:
        """Set the inputs of the step after the last one, on the GPU: each sequence fed the
        token it sampled at its next position, whose block must be in `block_tables` (the
        scheduler's lookahead slot, decode_ahead.py). Rows not kept are dropped, the others
        packed in order."""
        if keep_rows is not None:
            keep = torch.tensor(keep_rows, device=token_ids.device)  # [k]
            token_ids = token_ids[keep]
            for buffer in (self.positions, self.context_lens):
                buffer[: len(keep_rows)] = buffer[keep]
        batch = token_ids.shape[0]
        # Host block tables may have grown since the buffers were last filled.
        self._set_block_tables_and_padding(block_tables)
        self.input_ids[:batch].copy_(token_ids)
        positions = self.positions[:batch]
        positions += 1
        self.context_lens[:batch] += 1
        blocks = self.block_tables[:batch].gather(1, (positions // self.block_size)[:, None])
        self.slot_mapping[:batch] = blocks[:, 0] * self.block_size + positions % self.block_size

    def _set_block_tables_and_padding(self, block_tables: torch.Tensor) -> None:
        """Write the batch's block tables ([b, width]) and make the rows up to its bucket
        padding: K/V to the scratch slot, a context of one."""
        batch, width = block_tables.shape
        bucket = self._bucket(batch)
        self.block_tables[:batch, :width].copy_(block_tables)
        self.slot_mapping[batch:bucket].fill_(self.scratch_slot)
        self.context_lens[batch:bucket].fill_(1)

    def _bucket(self, batch: int) -> int:
        return next(size for size in self.batch_sizes if size >= batch)
