"""Constrained decoding: JSON schemas and regexes compiled into token matchers (llguidance).

A `GrammarCompiler` turns a `GrammarSpec` into a `CompiledGrammar` once per spec (this engine
has one tokenizer, so the spec alone is the cache key) and keeps the most recent ones in a
bounded LRU. Compiling happens at request admission, on the HTTP thread; the engine loop only
copies a compiled grammar into a fresh `GrammarState` per request, which the request's
`Sequence` advances token by token. engine/grammar_mask.py turns the states of a batch's
constrained rows into one boolean mask, which the batched sampler applies. This module
imports no torch: the Serve side validates requests with it (engine/validation.py).
"""

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import llguidance
from tokenizers import Tokenizer, decoders

log = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept; a compiled JSON schema is ~10-100 kB

# JSON is written compactly, `{"a": 1, "b": [2, 3]}`: one space after ':' and ',' and none
# elsewhere. Small models given free whitespace tend to emit newlines until max_new_tokens,
# which leaves unparseable output. A schema's own "x-guidance" options override these.
JSON_FORMAT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarError(ValueError):
    """A grammar that cannot be compiled: bad JSON schema, bad regex, unsupported keyword."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks its output to match: a JSON schema (as compact JSON, key order
    kept, since properties are written in the schema's order) or a regex. Equal specs share
    one cache entry."""

    kind: Literal["json_schema", "regex"]
    value: str

    @classmethod
    def json_schema(cls, schema: dict) -> "GrammarSpec":
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        return cls("regex", pattern)


class CompiledGrammar:
    """A grammar ready for one tokenizer: a matcher in its start state, copied per request."""

    def __init__(self, spec: GrammarSpec, prototype: llguidance.LLMatcher) -> None:
        self.spec = spec
        self._prototype = prototype  # never advanced; only deep-copied

    def new_state(self) -> "GrammarState":
        return GrammarState(self._prototype.deep_copy())


class GrammarState:
    """One request's position in its grammar: the matcher has consumed exactly the request's
    generated tokens (`num_tokens` of them)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_tokens = 0

    def advance(self, token_id: int) -> None:
        """Consume a generated token. One the mask did not allow puts the matcher in its
        error state, whose mask then allows only EOS, so the request ends at once."""
        if not self.matcher.consume_token(token_id):
            log.warning("token %d broke the grammar: %s", token_id, self.matcher.get_error())
        self.num_tokens += 1

    @property
    def is_finished(self) -> bool:
        """The output is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles grammar specs for one tokenizer and caches them (bounded LRU)."""

    def __init__(
        self, hf_tokenizer, vocab_size: int, eos_token_ids: frozenset[int],
        cache_size: int = GRAMMAR_CACHE_SIZE,
    ) -> None:  # fmt: skip
        self.tokenizer = llguidance_tokenizer(hf_tokenizer, vocab_size, eos_token_ids)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self.num_hits = 0
        self.num_misses = 0

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar for `spec`, from the cache when it is there; GrammarError if it
        cannot be compiled (bad grammars are not cached)."""
        if (compiled := self._cache.get(spec)) is not None:
            self._cache.move_to_end(spec)
            self.num_hits += 1
            return compiled
        self.num_misses += 1
        compiled = CompiledGrammar(spec, self._new_matcher(spec))
        self._cache[spec] = compiled
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # the least recently used
        return compiled

    def _new_matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        LLMatcher = llguidance.LLMatcher
        if spec.kind == "regex":
            grammar = LLMatcher.grammar_from_regex(spec.value)
        else:
            try:
                grammar = LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_FORMAT)
            except ValueError as e:
                raise GrammarError(str(e)) from e
        if error := LLMatcher.validate_grammar(grammar, self.tokenizer):
            raise GrammarError(error.strip())
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error().strip())
        return matcher


def llguidance_tokenizer(
    hf_tokenizer, vocab_size: int, eos_token_ids: frozenset[int]
) -> llguidance.LLTokenizer:
    """llguidance's view of a fast HF tokenizer, with the model's vocabulary size (the logits'
    width) and EOS tokens (what a finished grammar allows).

    Tokenizers converted from GGUF (our default model) chain ByteFallback, Replace and
    ByteLevel decoders, which llguidance does not recognise as byte-level BPE; it would then
    read tokens such as "Ġ{" literally. When the pre-tokenizer is ByteLevel, the decoder is
    ByteLevel in effect, so we say so. Otherwise this is `llguidance.hf.from_tokenizer`.
    """
    backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())  # a copy
    backend.no_padding()
    backend.no_truncation()
    if _is_byte_level(json.loads(backend.to_str())):
        backend.decoder = decoders.ByteLevel()
    return llguidance.LLTokenizer(
        backend.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_token_ids)
    )


def _is_byte_level(tokenizer_json: dict) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(part.get("type") == "ByteLevel" for part in parts)
