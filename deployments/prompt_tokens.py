"""Prompt token counts at the ingress, with the model's own tokenizer and chat template.

The ingress imports no torch, so no transformers tokenizer: `tokenizers` reads the model's
tokenizer.json, and the chat template renders in jinja2's sandbox set up as transformers
sets it up (`apply_chat_template`: trim_blocks, lstrip_blocks, loopcontrols, `tojson`,
`raise_exception`, `strftime_now`, the special tokens as variables). Counts leave out the
special tokens a tokenizer may add around plain text (BOS/EOS), so they never exceed the
engine's: chat prompts carry their markers in the template's text, and are counted exactly.
"""

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                        "cls_token", "mask_token")  # fmt: skip


class PromptTokens:
    """Counts the tokens of TGI inputs, OpenAI prompts and (templated) chat messages."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, special: dict[str, str]):
        self._tokenizer = tokenizer
        self._template = _compile(chat_template) if chat_template else None
        self._special = special

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> "PromptTokens":
        """From deployments/tokenizer_files.py's {name: bytes}."""
        tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
        special_map = json.loads(files.get("special_tokens_map.json", b"{}"))
        special = {}
        for name in _SPECIAL_TOKEN_NAMES:
            value = special_map.get(name, config.get(name))
            if isinstance(value, dict):  # AddedToken's serialised form
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(tokenizer, _chat_template(files, config), special)

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str | None:
        """The prompt the engine builds for these messages; None without a template."""
        if self._template is None:
            return None
        return self._template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True,
            **self._special,
        )  # fmt: skip


def _chat_template(files: dict[str, bytes], config: dict[str, Any]) -> str | None:
    # transformers' precedence: chat_template.jinja, chat_template.json, tokenizer_config.
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode()
    template = config.get("chat_template")
    if "chat_template.json" in files:
        template = json.loads(files["chat_template.json"]).get("chat_template", template)
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _compile(template: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)  # fmt: skip

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
