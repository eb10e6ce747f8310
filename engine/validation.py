"""TGI's request validation: the same rules, in the same order, with the same messages
(router/src/validation.rs of TGI 3.3), turned into the engine's SamplingParams."""

import json
import random
from dataclasses import dataclass

from engine.errors import ValidationError
from engine.grammar import CompiledGrammar, GrammarCompiler, GrammarError, GrammarSpec
from engine.protocol import SamplingParams
from engine.schemas import GenerateParameters, Grammar, JsonGrammar, RegexGrammar


@dataclass(frozen=True)
class Limits:
    max_concurrent_requests: int
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int
    max_client_batch_size: int
    max_best_of: int
    max_top_n_tokens: int
    disable_grammar_support: bool = False  # --disable-grammar-support: `grammar` is refused


def check_parameters(p: GenerateParameters, limits: Limits, *, stream: bool) -> int:
    """Raise ValidationError at the first rule `p` breaks; return best_of."""
    best_of = p.best_of if p.best_of is not None else 1
    sampling = p.do_sample or any(
        v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p)
    )
    if best_of > 1 and not sampling:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    if p.temperature is not None and p.temperature <= 0:
        raise ValidationError("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
            f"Given: {len(p.stop)}"
        )
    if p.seed is not None and best_of > 1:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= limits.max_top_n_tokens:
        raise ValidationError(
            f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {p.top_n_tokens}"
        )
    if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
            f"Given: {p.truncate}"
        )
    if p.grammar is not None and limits.disable_grammar_support:
        raise ValidationError("grammar is not supported")
    if p.adapter_id is not None:
        raise ValidationError(f"adapter `{p.adapter_id}` is not loaded (no LoRA adapters here)")
    if best_of > 1:  # checked where TGI checks it: in the route, after the parameters
        if best_of > limits.max_best_of:
            raise ValidationError(
                f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}"
            )
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if p.decoder_input_details and stream:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    return best_of


def check_lengths(num_input: int, max_new_tokens: int | None, limits: Limits) -> int:
    """TGI's token-count rules; return max_new_tokens (absent: the rest of the context)."""
    if num_input == 0:
        raise ValidationError("`inputs` cannot be empty")
    if max_new_tokens is None:
        max_new_tokens = max(limits.max_total_tokens - num_input, 0)
    if num_input + max_new_tokens > limits.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {num_input} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    if num_input > limits.max_input_tokens:
        raise ValidationError(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {num_input}"
        )
    if max_new_tokens == 0:  # the prompt fills the whole context
        raise ValidationError("`max_new_tokens` must be strictly positive")
    return max_new_tokens


def grammar_spec(grammar: Grammar) -> GrammarSpec:
    """TGI's GrammarType as a spec; a `json` value may be the schema or its JSON text."""
    if isinstance(grammar, RegexGrammar):
        return GrammarSpec.regex(grammar.value)
    if isinstance(grammar, JsonGrammar):
        schema = grammar.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValidationError(f"grammar is not valid: {e}") from e
        if not isinstance(schema, dict):
            raise ValidationError("grammar is not supported")  # TGI's answer to other values
        return GrammarSpec.json_schema(schema)
    return GrammarSpec.json_schema(grammar.value.json_schema)


def compile_grammar(grammar: Grammar, compiler: GrammarCompiler | None) -> CompiledGrammar:
    """Compile (or find in the cache) a request's grammar; 422 if it cannot be."""
    if compiler is None:  # the engine was started with --disable-grammar-support
        raise ValidationError("grammar is not supported")
    try:
        return compiler.compile(grammar_spec(grammar))
    except GrammarError as e:
        raise ValidationError(f"grammar is not valid: {e}") from e


def sampling_params(
    p: GenerateParameters,
    max_new_tokens: int,
    eos_token_ids: frozenset[int],
    presence_penalty: float | None = None,
    grammar: CompiledGrammar | None = None,
) -> SamplingParams:
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=p.do_sample,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        typical_p=p.typical_p,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=presence_penalty,
        watermark=p.watermark,
        top_n_tokens=p.top_n_tokens or 0,
        prefill_logprobs=p.decoder_input_details,
        eos_token_ids=eos_token_ids,
        grammar=grammar,
    )
    if p.seed is None and not params.is_greedy:  # TGI draws a seed, and reports it
        params = SamplingParams(**{**params.__dict__, "seed": random.getrandbits(63)})
    return params
