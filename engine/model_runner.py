"""`ModelRunner`: the only engine piece that touches devices.

It loads the model, owns the paged KV cache tensors, turns a scheduled batch of sequences into
flat input tensors plus `AttentionMetadata` (prepare_prefill / prepare_decode), runs one
forward pass for the whole batch and samples one token per sequence (plus, on prefill, prompt
logprobs for the sequences that ask).
"""

import itertools
import math
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from engine.attention import AttentionMetadata, use_prefill_backends
from engine.batch_inputs import BatchInputBuilder
from engine.config import EngineConfig
from engine.decode_ahead import DeviceStep, can_run_ahead
from engine.distributed import ShardGroup, init_process_group
from engine.model_loader import load_model, resolve_device_dtype
from engine.models.llama import KVCache
from engine.prefill_logprobs import compute_prefill_logprobs
from engine.sampling import Sampler, SamplerOutput, TopTokens
from engine.sequence import Sequence
from engine.tensor_parallel import TensorParallel, check_shardable

if torch.cuda.is_available():
    from engine.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs

# Prefill steps run through the decode graphs, a row per new token (BatchInputBuilder.
# prepare_prefill_rows), while their matmuls are small next to an eager step's host work: up
# to this many tokens x parameters (Llama-3-8B: 249 tokens; SmolLM2-135M: as many as the
# largest graph holds). H200, one prompt, eager / graphed step (benchmarks/gpu_prefill.py):
# SmolLM2-shaped 7.1x at 16 tokens, 4.0x at 512; 8B-shaped 2.07x at 16, 1.02-1.24x at 256,
# 0.79x at 512 (eager has flash attention, and an LM head over last positions only).
GRAPHED_PREFILL_TOKEN_PARAMS = 2.0e12

# Share of GPU memory left out of the KV cache when it is sized from memory.
CUDA_HEADROOM_FRACTION = 0.03


@dataclass(frozen=True)
class RunOutput:
    """What one step produced, one entry per sequence that sampled (every decoding one; a
    prefilling one only when its chunk ends its prompt), in order."""

    token_ids: list[int]
    logprobs: list[float]  # of token_ids under the processed distribution
    top_tokens: list[TopTokens]
    prefill_logprobs: list[tuple[float | None, ...] | None]  # set where needs_prefill_logprobs


class ModelRunner:
    """Runs one scheduled batch: prepare inputs, forward, logits of last positions, sample.

    Sharded (config.num_shard > 1), rank 0's runner spawns the other ranks and sends them each
    step's inputs; theirs only run `forward` on what they receive (engine/shard.py).
    """

    def __init__(self, config: EngineConfig, model_config: PretrainedConfig, rank: int = 0) -> None:
        self.block_size = config.block_size
        self.device, self.dtype = resolve_device_dtype(config, rank)
        self.tp = TensorParallel(rank, config.num_shard)
        self.shards: ShardGroup | None = None  # rank 0's handle on the others, when sharded
        if config.num_shard > 1:
            check_shardable(model_config.num_key_value_heads, config.num_shard)
            if rank == 0:
                self.shards = ShardGroup(config)
        if self.device.type == "cuda":
            use_prefill_backends()
        try:
            self._load(config, model_config)
        except BaseException:
            self.shutdown()  # no shard outlives a failed start
            raise
        self.sampler = Sampler()
        self.inputs = BatchInputBuilder(self.block_size, self.device, self.device.type == "cuda")
        self.graphs = self._capture_graphs(config) if self._use_graphs else None
        self.decode_ahead = config.decode_ahead and self.graphs is not None
        num_params = sum(p.numel() for p in self.model.parameters())
        graphed_prefill_tokens = int(GRAPHED_PREFILL_TOKEN_PARAMS // num_params)
        self.max_graphed_prefill_tokens = graphed_prefill_tokens if self.graphs else 0
        self._ahead: DeviceStep | None = None  # a decode step launched before it was asked for
        self.num_steps_run_ahead = 0  # launched early, and of those, taken by the next step:
        self.num_steps_ahead_taken = 0  # for tests and benchmarks
        self.num_prefills_graphed = 0  # likewise: prefill steps run through the graphs

    def _load(self, config: EngineConfig, model_config: PretrainedConfig) -> None:
        """Join the other shards, if any, load this rank's weights and allocate its cache."""
        if config.num_shard > 1:
            init_process_group(config, self.tp.rank, self.device)
        max_positions = max(
            getattr(model_config, "max_position_embeddings", 0), config.max_batch_total_tokens or 0
        )
        self.model = load_model(
            model_config,
            config.model_dir,
            max_positions,
            self.device,
            self.dtype,
            self.tp,
            config.quantize,
        )
        if config.max_batch_total_tokens is None:
            num_kv_blocks = self._blocks_that_fit(model_config, config)
        else:
            num_kv_blocks = config.num_kv_blocks
        # Shards size their caches alike; when sharded this is also the start-up handshake
        # that waits for every shard to have loaded its weights.
        self.num_kv_blocks = self.tp.min_over_ranks(num_kv_blocks, self.device)
        # CUDA graphs pad batches with rows that write their K/V to one extra block, which
        # the block manager never hands out.
        self._use_graphs = (self.device.type == "cuda" and config.num_shard == 1
                            and config.cuda_graphs != ())  # fmt: skip
        num_blocks = self.num_kv_blocks + (1 if self._use_graphs else 0)
        self.kv_caches = self._allocate_kv_cache(model_config, num_blocks)

    def _capture_graphs(self, config: EngineConfig) -> "DecodeGraphs":
        max_positions = self.model.rotary_emb.max_positions
        return DecodeGraphs(
            self.model,
            self.kv_caches,
            config.cuda_graphs or DEFAULT_BATCH_SIZES,
            max_blocks_per_seq=-(-max_positions // self.block_size),
            scratch_slot=self.num_kv_blocks * self.block_size,
        )

    def shutdown(self) -> None:
        """Stop the other shards (nothing to do unsharded)."""
        if self.shards is not None:
            self.shards.stop()

    @torch.inference_mode()
    def _blocks_that_fit(self, model_config: PretrainedConfig, config: EngineConfig) -> int:
        """KV blocks that fit in cuda_memory_fraction of the GPU next to the weights and the
        activations of the largest prefill, measured by running one (as TGI's warm-up)."""
        if self.device.type != "cuda":
            raise ValueError("give --max-batch-total-tokens: KV cache sizing from memory is "
                             "for CUDA devices")  # fmt: skip
        num_tokens = config.max_batch_prefill_tokens
        warmup_cache = self._allocate_kv_cache(model_config, -(-num_tokens // self.block_size))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        slots = torch.arange(num_tokens, device=self.device)  # [n]
        meta = AttentionMetadata(is_prefill=True, slot_mapping=slots, seq_lens=[num_tokens])
        hidden = self.model(torch.zeros_like(slots), slots, warmup_cache, meta)  # [n, hidden]
        self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - before
        del warmup_cache, hidden
        torch.cuda.empty_cache()
        # Free memory, not total: the CUDA context, cuBLAS and NCCL hold memory PyTorch does
        # not count. The headroom covers CUDA graphs' pool and allocator fragmentation.
        free, total = torch.cuda.mem_get_info(self.device)
        headroom = CUDA_HEADROOM_FRACTION * total
        budget = free - total * (1 - config.cuda_memory_fraction) - activations - headroom
        # K and V, in every layer
        block_elements = 2 * model_config.num_hidden_layers * math.prod(self._kv_shape(1))
        bytes_per_block = block_elements * self.dtype.itemsize
        num_blocks = int(budget // bytes_per_block)
        if num_blocks < 1:
            raise ValueError(f"no room for a KV cache: {free} B free of {total} B, a prefill "
                             f"needs {activations} B, fraction "
                             f"{config.cuda_memory_fraction}")  # fmt: skip
        return num_blocks

    def _kv_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        """One layer's K (or V) cache: [num_blocks, block_size, num_kv_heads, head_dim]."""
        attn = self.model.layers[0].self_attn
        return (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)

    def _allocate_kv_cache(self, model_config: PretrainedConfig, num_blocks: int) -> list[KVCache]:
        shape = self._kv_shape(num_blocks)
        return [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(model_config.num_hidden_layers)
        ]

    def release(self, request_id: str) -> None:
        """Drop per-request state (the sampler's generator) once a request is done."""
        self.sampler.release(request_id)

    def forward(
        self,
        input_ids: torch.Tensor,  # [n]
        positions: torch.Tensor,  # [n]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [n, hidden]
        """The model over the batch, writing its K/V into this rank's cache."""
        return self.model(input_ids, positions, self.kv_caches, meta)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, steady: bool = False) -> RunOutput:
        """Forward the batch (on every shard) and sample one token per sequence. `steady`:
        the scheduler will decode this same batch next unless a request ends or joins, so
        the next step may be launched now (decode_ahead.py)."""
        ahead, self._ahead = self._ahead, None
        if not is_prefill and self.graphs is not None and self.graphs.can_run(len(seqs)):
            return self._run_graph_decode(seqs, ahead, steady)
        if is_prefill and self._can_graph_prefill(seqs):
            return self._run_graph_prefill(seqs)
        prepare = self.inputs.prepare_prefill if is_prefill else self.inputs.prepare_decode
        input_ids, positions, meta = prepare(seqs)
        if self.shards is not None:
            self.shards.broadcast((input_ids, positions, meta))
        prefill_logprobs: list[tuple[float | None, ...] | None] = [None] * len(seqs)
        hidden = self.forward(input_ids, positions, meta)  # [n, hidden]
        if is_prefill:
            assert meta.seq_lens is not None
            every_logprobs = compute_prefill_logprobs(self.model, self.inputs, hidden, seqs)
            prefill_logprobs = [logprobs for logprobs, seq in zip(every_logprobs, seqs, strict=True)
                                if seq.completes_prefill]  # fmt: skip
            rows, seqs = self._sampling_rows(seqs)
            if not seqs:
                return RunOutput([], [], [], [])
            hidden = hidden[self.inputs.tensor(rows)]  # [b, hidden]
        return self._read_back(self.sampler(self.model.compute_logits(hidden), seqs),
                               prefill_logprobs)  # fmt: skip

    def _can_graph_prefill(self, seqs: list[Sequence]) -> bool:
        num_tokens = sum(seq.prefill_chunk for seq in seqs)
        return (
            num_tokens <= self.max_graphed_prefill_tokens
            and self.graphs is not None
            and self.graphs.can_run(num_tokens)
            and not any(seq.needs_prefill_logprobs for seq in seqs)  # they need every row
        )

    def _run_graph_prefill(self, seqs: list[Sequence]) -> RunOutput:
        """A short prefill through the decode graphs, a row per new token; the logits of the
        rows that end a prompt are sampled."""
        assert self.graphs is not None
        logits = self.graphs.run(*self.inputs.prepare_prefill_rows(seqs))  # [n, vocab]
        self.num_prefills_graphed += 1
        rows, seqs = self._sampling_rows(seqs)
        if not seqs:
            return RunOutput([], [], [], [])
        logits = logits[self.inputs.tensor(rows)]  # [b, vocab]
        return self._read_back(self.sampler(logits, seqs), [None] * len(seqs))

    @staticmethod
    def _sampling_rows(seqs: list[Sequence]) -> tuple[list[int], list[Sequence]]:
        """Of a packed prefill, the sequences whose chunk ends their prompt (only those
        sample; the others read on) and the row of each one's last token."""
        ends = itertools.accumulate(seq.prefill_chunk for seq in seqs)
        done = [(end - 1, seq) for end, seq in zip(ends, seqs, strict=True)
                if seq.completes_prefill]  # fmt: skip
        return [row for row, _ in done], [seq for _, seq in done]

    @staticmethod
    def _read_back(
        sampled: SamplerOutput, prefill_logprobs: list[tuple[float | None, ...] | None]
    ) -> RunOutput:
        # One device-to-host copy for both: the step's only synchronisation when no request
        # asks for top tokens or penalties.
        token_ids, logprobs = torch.stack(
            [sampled.token_ids.double(), sampled.logprobs.double()]
        ).tolist()
        return RunOutput(
            token_ids=[int(t) for t in token_ids],
            logprobs=logprobs,
            top_tokens=sampled.top_tokens,
            prefill_logprobs=prefill_logprobs,
        )

    def _run_graph_decode(
        self, seqs: list[Sequence], ahead: DeviceStep | None, steady: bool
    ) -> RunOutput:
        """A decode step through the CUDA graphs: the one launched ahead for this batch if
        there is one, else this one now; then, if it can, the next one ahead."""
        assert self.graphs is not None
        rows = ahead.rows_for(seqs) if ahead is not None else None
        if ahead is not None and rows is not None:
            step = ahead
            self.num_steps_ahead_taken += 1
        else:
            input_ids, positions, meta = self.inputs.prepare_decode(seqs)
            logits = self.graphs.run(input_ids, positions, meta)  # [b, vocab]
            step = DeviceStep.enqueue(seqs, self.sampler(logits, seqs), ahead=0)
        if self.decode_ahead and steady and all(can_run_ahead(seq) for seq in seqs):
            # Sequences that finished since `step` was launched leave the graph's rows.
            keep = None if rows is None or len(rows) == len(step.request_ids) else rows
            self.graphs.advance(step.token_ids, self.inputs.block_tables(seqs), keep)
            logits = self.graphs.replay(len(seqs))  # [b, vocab]
            self._ahead = DeviceStep.enqueue(seqs, self.sampler(logits, seqs), ahead=1)
            self.num_steps_run_ahead += 1
        token_ids, logprobs = step.result(rows)
        top_tokens = step.top_tokens if rows is None else [step.top_tokens[r] for r in rows]
        return RunOutput(token_ids, logprobs, top_tokens, [None] * len(seqs))
