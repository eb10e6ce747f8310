"""The model's tokenizer files, read on a TGIServer replica for the ingress.

The ingress counts prompt tokens before it dispatches a request (deployments/
token_budget.py), with the same tokenizer the engine uses, but it imports no torch and may
run on a node without the weights: the replica, which runs beside its launcher, reads the
files and hands them over.
"""

from pathlib import Path

from serve_app.config import ModelConfig

# What a tokenizer and its chat template need; tokenizer.json is the one that must be there.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def read_tokenizer_files(model_cfg: ModelConfig) -> dict[str, bytes]:
    """{file name: bytes} of the TOKENIZER_FILES the model has (tokenizer.json always)."""
    model_dir = _model_dir(model_cfg)
    files = {n: (model_dir / n).read_bytes() for n in TOKENIZER_FILES if (model_dir / n).is_file()}
    if "tokenizer.json" not in files:
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    return files


def _model_dir(model_cfg: ModelConfig) -> Path:
    hub_cache = model_cfg.launcher_args.huggingface_hub_cache
    if model_cfg.engine == "embedded":
        # The launcher resolved (fetched, converted) this id already: a cache hit here.
        from engine.weights import resolve_model_dir

        return resolve_model_dir(model_cfg.model_id, model_cfg.revision, hub_cache)
    local = Path(model_cfg.model_id).expanduser()
    if local.is_dir():
        return local
    # TGI's launcher downloaded the repository into the Hub cache; only the tokenizer's
    # files are asked for, so a cold cache costs kilobytes, not the weights.
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model_cfg.model_id,
            revision=model_cfg.revision,
            cache_dir=hub_cache,
            allow_patterns=list(TOKENIZER_FILES),
        )
    )
