"""text-generation-launcher's flags, each also settable from its upper-case environment variable.

`parse_launcher_args(argv, environ)` is the one place the engine reads its environment.
"""

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flag:
    name: str  # as on the command line, without "--"
    type: type
    default: object = None
    help: str = ""
    aliases: tuple[str, ...] = ()
    # False: accepted for compatibility with TGI's launcher but has no effect yet here.
    implemented: bool = True

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env_names(self) -> list[str]:
        return [n.upper().replace("-", "_") for n in (self.name, *self.aliases)]


FLAGS = [
    Flag("model-id", str, "HuggingFaceTB/SmolLM2-135M-Instruct", "Hub id, local dir or .gguf"),
    Flag("revision", str, None, "Hub revision of the model"),
    Flag("num-shard", int, None, "Tensor-parallel shards: one process (and one GPU) each"),
    Flag("sharded", bool, None, "Shard over every visible GPU (true) or not at all (false)"),
    Flag("quantize", str, None, "Weight quantization: eetq (int8 weight-only)"),
    Flag("dtype", str, None, "float32 | float16 | bfloat16 (default: fp32 on CPU, bf16 on GPU)"),
    Flag("max-concurrent-requests", int, 128, "Requests in flight before 429"),
    Flag("max-best-of", int, 2, "Largest best_of"),
    Flag("max-stop-sequences", int, 4, "Most stop sequences per request"),
    Flag("max-top-n-tokens", int, 5, "Largest top_n_tokens"),
    Flag("max-client-batch-size", int, 4, "Most prompts in one /v1/completions request"),
    Flag("max-input-tokens", int, None, "Longest prompt", aliases=("max-input-length",)),
    Flag("max-total-tokens", int, None, "Longest prompt + generation"),
    Flag("waiting-served-ratio", float, 0.3, "Waiting/running ratio that lets waiters join"),
    Flag("max-batch-prefill-tokens", int, None, "Prompt tokens prefilled in one step"),
    Flag("max-batch-total-tokens", int, None, "KV cache capacity in tokens"),
    Flag("max-waiting-tokens", int, 20, "Steps since the last join before waiters join anyway"),
    Flag("max-batch-size", int, None, "Most sequences in the running batch"),
    # TGI reads PREFIX_CACHING from the environment; the flag spells the same switch.
    Flag("prefix-caching", bool, True, "Reuse the KV cache of shared prompt prefixes"),
    Flag("disable-grammar-support", bool, False, "Refuse `grammar`, `response_format` and `tools`"),
    Flag("cuda-graphs", str, None, "Decode batch sizes to capture, e.g. 1,2,4,8; 0 disables"),
    Flag("hostname", str, "0.0.0.0", "Address to listen on"),
    Flag("port", int, 3000, "Port to listen on"),
    Flag("master-addr", str, "127.0.0.1", "torch.distributed address of shard 0"),
    Flag("master-port", int, 29500, "torch.distributed port of shard 0"),
    Flag("shard-uds-path", str, "/tmp/text-generation-server", "Shard processes' names: PATH-RANK"),
    Flag("huggingface-hub-cache", str, None, "Hub cache directory"),
    Flag("cuda-memory-fraction", float, 1.0, "GPU memory share for weights + KV cache"),
    Flag("json-output", bool, False, "Log as JSON lines"),
    Flag("otlp-endpoint", str, None, "", implemented=False),
    Flag("api-key", str, None, "Bearer token the generation routes require (401 without)"),
    Flag("payload-limit", int, 2_000_000, "Largest request body in bytes (413 above)"),
    Flag(
        "cors-allow-origin",
        lambda v: [o for o in v.split(",") if o],
        None,
        "Origins allowed by CORS, comma-separated",
    ),  # fmt: skip
]

# The --quantize values the embedded engine implements (engine/quantization.py's QUANTIZERS;
# listed here so that parsing flags needs no torch). TGI's launcher takes more: awq, gptq, fp8,
# ... run those with the real launcher (`engine: tgi`).
SUPPORTED_QUANTIZATIONS = ("eetq",)

# Defaults TGI derives from the model when a limit is not given.
DEFAULT_MAX_BATCH_TOTAL_TOKENS_CPU = 16384


def _parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine",
        description="ray-tgi's embedded engine: text-generation-launcher's flags and HTTP API.",
    )
    for flag in FLAGS:
        from_env = next((environ[e] for e in flag.env_names if e in environ), None)
        names = [f"--{n}" for n in (flag.name, *flag.aliases)]
        if flag.type is bool:
            default = _parse_bool(from_env) if from_env is not None else flag.default
            parser.add_argument(
                *names, dest=flag.dest, nargs="?", const=True, type=_parse_bool, default=default,
                help=flag.help,
            )  # fmt: skip
        else:
            default = flag.type(from_env) if from_env is not None else flag.default
            parser.add_argument(
                *names, dest=flag.dest, type=flag.type, default=default, help=flag.help
            )
    return parser


def parse_launcher_args(argv: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.quantize is not None and args.quantize not in SUPPORTED_QUANTIZATIONS:
        parser.error(
            f"--quantize {args.quantize!r} is not supported by the embedded engine; supported: "
            f"{', '.join(SUPPORTED_QUANTIZATIONS)} (TGI's other methods need the real "
            "text-generation-launcher: engine: tgi)"
        )
    for flag in FLAGS:
        value = getattr(args, flag.dest)
        if not flag.implemented and value not in (None, flag.default):
            log.warning("--%s=%s is accepted but has no effect in the embedded engine yet",
                        flag.name, value)  # fmt: skip
    return args


def resolve_num_shard(sharded: bool | None, num_shard: int | None, num_gpus: int) -> int:
    """The number of shards, by TGI's launcher rule: `--sharded true` alone shards over every
    visible GPU. Stricter than TGI, `--sharded false` with `--num-shard` > 1 is refused."""
    if num_shard is None:
        if not sharded:
            return 1
        if num_gpus <= 1:
            raise ValueError(
                f"`--sharded true` needs --num-shard or more than one GPU; found {num_gpus} "
                "CUDA devices (give --num-shard N to shard on CPU)"
            )
        return num_gpus
    if num_shard < 1:
        raise ValueError(f"`--num-shard` must be >= 1, got {num_shard}")
    if sharded is True and num_shard == 1:
        raise ValueError("`--sharded true` contradicts `--num-shard 1`")
    if sharded is False and num_shard > 1:
        raise ValueError(f"`--sharded false` contradicts `--num-shard {num_shard}`")
    if 0 < num_gpus < num_shard:
        raise ValueError(f"`--num-shard {num_shard}` needs one GPU per shard; found {num_gpus}")
    return num_shard


def parse_cuda_graphs(value: str | None) -> tuple[int, ...] | None:
    """`--cuda-graphs 1,2,4,8` -> (1, 2, 4, 8); `0` -> () (no graphs); unset -> None."""
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        message = f"`--cuda-graphs` takes batch sizes like 1,2,4,8 or 0; got {value!r}"
        raise ValueError(message) from None
    if sizes == (0,):
        return ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"`--cuda-graphs` batch sizes must be >= 1 (or just 0); got {value!r}")
    return sizes


def resolve_token_limits(
    args: argparse.Namespace, max_position_embeddings: int, size_from_memory: bool = False
) -> None:
    """Fill in the token limits TGI derives when they are not given, and check them.
    `size_from_memory`: leave max_batch_total_tokens unset, for the engine to size on the GPU.
    """
    if args.max_total_tokens is None:
        args.max_total_tokens = max_position_embeddings
    if args.max_input_tokens is None:
        args.max_input_tokens = args.max_total_tokens - 1
    if args.max_batch_prefill_tokens is None:
        args.max_batch_prefill_tokens = args.max_input_tokens + 50
    if args.max_batch_total_tokens is None and not size_from_memory:
        args.max_batch_total_tokens = max(DEFAULT_MAX_BATCH_TOTAL_TOKENS_CPU, args.max_total_tokens)
    if args.max_input_tokens >= args.max_total_tokens:
        raise ValueError(
            f"`max_input_tokens` ({args.max_input_tokens}) must be < "
            f"`max_total_tokens` ({args.max_total_tokens})"
        )
    check_batch_total_tokens(args)


def check_batch_total_tokens(args: argparse.Namespace) -> None:
    """A request of max_total_tokens must fit the KV cache (once its size is known)."""
    if args.max_batch_total_tokens is None:
        return
    if args.max_batch_total_tokens < args.max_total_tokens:
        raise ValueError(
            f"`max_batch_total_tokens` ({args.max_batch_total_tokens}) must be >= "
            f"`max_total_tokens` ({args.max_total_tokens})"
        )
