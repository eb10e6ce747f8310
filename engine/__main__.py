"""`python -m engine [launcher flags]` serves a model over TGI's HTTP API.

`python -m engine download-weights MODEL_ID` only fetches/converts the weights (as TGI's
`text-generation-server download-weights`) and prints the local model directory.
"""

import logging
import os
import sys

import uvicorn

from engine.args import (
    check_batch_total_tokens,
    parse_cuda_graphs,
    parse_launcher_args,
    resolve_num_shard,
    resolve_token_limits,
)
from engine.weights import resolve_model_dir

log = logging.getLogger("engine")

API_VERSION = "3.3.6"  # the TGI HTTP API version this engine speaks


def main(argv: list[str]) -> int:
    if argv[:1] == ["download-weights"]:
        return download_weights(argv[1:])
    args = parse_launcher_args(argv, os.environ)
    setup_logging(args.json_output)
    app, async_engine = build(args)
    try:
        uvicorn.run(app, host=args.hostname, port=args.port, log_level="warning")
    finally:
        async_engine.shutdown()
    return 0


def download_weights(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -m engine download-weights MODEL_ID [REVISION]", file=sys.stderr)
        return 2
    try:
        print(resolve_model_dir(*argv))
    except Exception as e:  # noqa: BLE001 - a user-facing command: one clear line, exit 1
        print(
            f"error: cannot get weights for {argv[0]!r}: {type(e).__name__}: {e}", file=sys.stderr
        )
        return 1
    return 0


def setup_logging(json_output: bool) -> None:
    if json_output:
        fmt = '{"time":"%(asctime)s","level":"%(levelname)s","target":"%(name)s","message":"%(message)s"}'  # noqa: E501
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)


def build(args):
    """Load the model and return the HTTP app and the engine loop serving it."""
    # Imported here so `--help` and download-weights do not pay for torch.
    from transformers import AutoConfig, AutoTokenizer

    from engine.async_engine import AsyncEngine, on_own_thread
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.metrics import EngineMetrics
    from engine.server import create_app
    from engine.service import TextGenerationService
    from engine.validation import Limits

    # Torch work (a GGUF's first conversion, loading) off the main thread: on_own_thread.
    model_dir = on_own_thread(
        resolve_model_dir, args.model_id, args.revision, args.huggingface_hub_cache
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_config = AutoConfig.from_pretrained(model_dir)
    import torch

    args.num_shard = resolve_num_shard(args.sharded, args.num_shard, torch.cuda.device_count())
    # As TGI on a GPU: with no --max-batch-total-tokens, the KV cache takes what memory is left.
    on_gpu = torch.cuda.is_available() and args.max_batch_total_tokens is None
    resolve_token_limits(args, model_config.max_position_embeddings, size_from_memory=on_gpu)
    config = EngineConfig(
        model_dir=str(model_dir),
        max_batch_total_tokens=args.max_batch_total_tokens,
        cuda_memory_fraction=args.cuda_memory_fraction,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        max_batch_size=args.max_batch_size,
        waiting_served_ratio=args.waiting_served_ratio,
        enable_prefix_caching=args.prefix_caching,
        max_waiting_tokens=args.max_waiting_tokens,
        dtype=args.dtype,
        quantize=args.quantize,
        num_shard=args.num_shard,
        cuda_graphs=parse_cuda_graphs(args.cuda_graphs),
        master_addr=args.master_addr,
        master_port=args.master_port,
        shard_uds_path=args.shard_uds_path,
    )
    # Sharded, rank 0 spawns the shards, from the main thread (engine/distributed.py); each
    # rank then runs its share of the cores' threads.
    engine = on_own_thread(LLMEngine, config) if args.num_shard == 1 else LLMEngine(config)
    args.max_batch_total_tokens = engine.config.max_batch_total_tokens
    check_batch_total_tokens(args)
    log.info("model %s loaded from %s, num_shard=%d, quantize=%s", args.model_id, model_dir,
             args.num_shard, args.quantize)  # fmt: skip
    log.info("Setting max batch total tokens to %d", args.max_batch_total_tokens)  # TGI's line
    limits = Limits(
        max_concurrent_requests=args.max_concurrent_requests,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        max_stop_sequences=args.max_stop_sequences,
        max_client_batch_size=args.max_client_batch_size,
        max_best_of=args.max_best_of,
        max_top_n_tokens=args.max_top_n_tokens,
        disable_grammar_support=args.disable_grammar_support,
    )
    metrics = EngineMetrics(
        args.max_input_tokens, args.max_total_tokens, args.max_batch_total_tokens
    )
    async_engine = AsyncEngine(engine, metrics)
    metrics.track_prefix_cache(lambda: async_engine.stats)
    eos_ids = eos_token_ids(model_dir)
    grammars = None
    if not args.disable_grammar_support:
        from engine.grammar import GrammarCompiler

        grammars = GrammarCompiler(tokenizer, model_config.vocab_size, eos_ids)
    service = TextGenerationService(async_engine, tokenizer, eos_ids, limits, metrics, grammars)
    return create_app(service, info_dict(args), args), async_engine


def eos_token_ids(model_dir) -> frozenset[int]:
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    return frozenset(eos if isinstance(eos, list) else [eos])


def info_dict(args) -> dict:
    return {
        "model_id": args.model_id,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_best_of": args.max_best_of,
        "max_stop_sequences": args.max_stop_sequences,
        "max_input_tokens": args.max_input_tokens,
        "max_total_tokens": args.max_total_tokens,
        "validation_workers": 1,
        "max_client_batch_size": args.max_client_batch_size,
        "router": "ray-tgi-embedded",
        "version": API_VERSION,
        "sha": None,
        "docker_label": None,
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
