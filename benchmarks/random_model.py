"""A random-weight stand-in for the default model, for the serving benchmarks on a GPU machine.

The GPU machine cannot fetch the default model's GGUF. The serving benchmarks (routing,
serve_vs_direct) measure scheduling, routing and Serve's hops, not the text, so SmolLM2's
shape with random bf16 weights next to SmolLM2's own tokenizer files does. Its EOS token's
embedding (tied to the output layer) is zero, so a greedy request never picks it and runs to
its max_new_tokens, as fixed-length workloads mean.

    python -m benchmarks.random_model --tokenizer-from DIR --out DIR
"""

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GenerationConfig

from benchmarks.gpu_engine import SMOLLM2, random_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")  # fmt: skip


def write_random_smollm2(tokenizer_from: Path, out: Path) -> Path:
    random_model_dir(SMOLLM2, out, torch.bfloat16)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, out / name)
    eos_id = AutoTokenizer.from_pretrained(out).eos_token_id
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    # Its logit is then 0 while the largest of 49,151 random ones is above 0.
    tensors["model.embed_tokens.weight"][eos_id] = 0
    save_file(tensors, weights)
    GenerationConfig(eos_token_id=eos_id).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer-from", type=Path, required=True,
                   help="a directory holding SmolLM2's tokenizer files")  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    print(write_random_smollm2(args.tokenizer_from, args.out))


if __name__ == "__main__":
    main()
