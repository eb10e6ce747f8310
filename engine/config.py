"""Engine configuration: what the launcher flags resolve to before the engine starts."""

import math
from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Static settings of one `LLMEngine` (model, KV cache size, batching limits, device)."""

    model_dir: str  # local dir: config.json + *.safetensors (+ tokenizer files)
    # KV cache capacity in tokens; None: as much as fits in cuda_memory_fraction of the GPU
    # after a warm-up prefill (CUDA only).
    max_batch_total_tokens: int | None = 16384
    cuda_memory_fraction: float = 1.0
    max_batch_prefill_tokens: int = 4096  # cap on prompt tokens prefilled in one step
    max_batch_size: int | None = None  # cap on running sequences
    # TGI's rule for letting waiting requests into a running batch (a prefill pauses every
    # running sequence): only when at least floor(waiting_served_ratio x running) requests
    # wait, or when max_waiting_tokens steps passed since requests last joined. At 0.3 a
    # lone newcomer joins a batch of up to 6 at once; a batch of 7 to 9 takes two.
    enable_prefix_caching: bool = True  # reuse the KV of shared prompt prefixes
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    block_size: int = 16
    dtype: str | None = None  # None -> float32 on CPU, bfloat16 on CUDA
    quantize: str | None = None  # a key of engine/quantization.py's QUANTIZERS; None: off
    device: str | None = None  # None -> "cuda" if available else "cpu"
    # Decode batch sizes captured as CUDA graphs (CUDA, unsharded); None: TGI's default
    # buckets; (): eager decode.
    cuda_graphs: tuple[int, ...] | None = None
    # With CUDA graphs, launch the next decode step before the host reads this one's tokens
    # when the batch stays the same (engine/decode_ahead.py). Off: one step at a time.
    decode_ahead: bool = True
    # Tensor parallelism: this process is rank 0 and spawns ranks 1..num_shard-1, which join
    # it over torch.distributed at tcp://master_addr:master_port (see engine/distributed.py).
    num_shard: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    shard_uds_path: str = "/tmp/text-generation-server"  # shard r is named f"{path}-{r}"

    def __post_init__(self) -> None:
        for name in ("max_batch_total_tokens", "max_batch_prefill_tokens", "block_size",
                     "num_shard"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")

    @property
    def num_kv_blocks(self) -> int:
        """KV cache blocks: enough to hold max_batch_total_tokens tokens."""
        if self.max_batch_total_tokens is None:
            raise ValueError("max_batch_total_tokens is sized by the model runner")
        return math.ceil(self.max_batch_total_tokens / self.block_size)
