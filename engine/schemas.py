"""Request bodies of the TGI and OpenAI routes (TGI 3.3 API, shared/anchors/tgi-openapi.json).

Unknown fields are ignored, as TGI's serde does. The OpenAI fields the embedded engine does not
implement are accepted at their neutral value and rejected by name otherwise
(`unsupported_fields`); TGI's own rules are in engine/validation.py.
"""

import json
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# TGI's integer types (router/src/lib.rs): a larger number fails its JSON parsing with 422.
# Here too, rather than overflowing a torch tensor inside the engine loop, which would stop
# the loop for every request.
U32_MAX, U64_MAX, I32_MAX = 2**32 - 1, 2**64 - 1, 2**31 - 1


def _encodable(text: str) -> str:
    """Reject lone UTF-16 surrogates (`"\\ud800"` is valid JSON but not text): the tokenizer
    would fail on them; TGI's JSON parser refuses them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text ({e.reason} at {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


def _encodable_strings(value: object) -> object:
    """`_encodable` on a str-or-list field (unions name their branches in error locations)."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            _encodable(text)
    return value


class _Request(BaseModel):
    # NaN and infinities are not JSON, though Python's parser reads them: refuse them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    # name -> value that means "off"; any other value is rejected until implemented.
    neutral_values: ClassVar[dict[str, object]] = {}

    def unsupported_fields(self) -> list[str]:
        return [
            name
            for name, neutral in self.neutral_values.items()
            if getattr(self, name) not in (None, neutral)
        ]


class JsonSchemaConfig(BaseModel):
    """TGI's JsonSchemaConfig, which is also OpenAI's `json_schema` object."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    # `schema` would shadow a BaseModel attribute, hence the alias.
    json_schema: dict = Field(alias="schema")


class JsonGrammar(BaseModel):
    """TGI's {"type": "json", "value": SCHEMA}; the schema may come as a JSON string."""

    type: Literal["json"]
    value: object


class JsonSchemaGrammar(BaseModel):
    type: Literal["json_schema"]
    value: JsonSchemaConfig


class RegexGrammar(BaseModel):
    type: Literal["regex"]
    value: str


# TGI's GrammarType, told apart by `type`.
Grammar = Annotated[JsonGrammar | JsonSchemaGrammar | RegexGrammar, Field(discriminator="type")]


class GenerateParameters(_Request):
    best_of: int | None = Field(default=None, le=U64_MAX)
    decoder_input_details: bool = False
    details: bool = False  # TGI's behaviour; the spec says true
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: int | None = Field(default=None, le=U32_MAX)
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = Field(default=None, ge=0, le=U64_MAX)
    stop: list[Text] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = Field(default=None, le=I32_MAX)
    top_n_tokens: int | None = Field(default=None, le=U32_MAX)
    top_p: float | None = None
    truncate: int | None = Field(default=None, le=U64_MAX)
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None


def sampling_defaults() -> GenerateParameters:
    """TGI's quirk: `parameters` left out (or null here) samples; `{}` is greedy."""
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Request):
    inputs: Text
    parameters: GenerateParameters = Field(default_factory=sampling_defaults)
    add_special_tokens: bool = True

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_is_left_out(cls, value: object) -> object:
        return sampling_defaults() if value is None else value


class CompatGenerateRequest(GenerateRequest):
    """Body of TGI's POST `/`: a generate request that may ask for a stream."""

    stream: bool = False


class ToolCallFunctionName(BaseModel):
    name: str


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str | dict = "{}"  # OpenAI sends a JSON string; TGI once sent the object


class ToolCall(BaseModel):
    """A call an assistant message made, as clients send it back in the conversation."""

    model_config = ConfigDict(extra="ignore")

    id: str = ""
    type: str = "function"
    function: ToolCallFunction


class ContentPart(BaseModel):
    """One part of a message's content list; only text parts reach the prompt."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = ""
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a `tool` message answers

    @field_validator("content")
    @classmethod
    def _content_is_text(
        cls, content: "str | list[ContentPart] | None"
    ) -> "str | list[ContentPart] | None":
        texts = [content] if isinstance(content, str) else [p.text for p in content or []]
        for text in texts:
            _encodable(text)
        return content

    def text(self) -> str:
        """The text the chat template sees; an assistant's tool calls as their JSON, as TGI
        renders them."""
        if self.tool_calls and not self.content:
            return json.dumps([call.model_dump() for call in self.tool_calls])
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1)
    description: str | None = None
    # OpenAI's `parameters` (a JSON schema of the arguments); TGI also reads `arguments`.
    parameters: dict = Field(default_factory=dict, alias="arguments")


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: ToolCallFunctionName


class ResponseFormat(BaseModel):
    """`response_format` of the chat route, in OpenAI's shapes (`text`, `json_object`,
    `json_schema` with a `json_schema` object) and TGI's (`json`, `json_schema`, `regex`
    with a `value`)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json", "json_schema", "regex"]
    value: object = None  # TGI's shapes
    json_schema: JsonSchemaConfig | None = None  # OpenAI's json_schema

    @model_validator(mode="after")
    def _has_its_value(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            if not isinstance(self.value, dict):
                raise ValueError("`json_schema` needs a `json_schema` (or TGI's `value`) object")
            self.json_schema = JsonSchemaConfig.model_validate(self.value)
        if self.type in ("json", "regex") and self.value is None:
            raise ValueError(f"`{self.type}` needs a `value`")
        if self.type == "regex" and not isinstance(self.value, str):
            raise ValueError("`regex` needs a string `value`")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(_Request):
    """Sampling fields both OpenAI routes share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, le=U32_MAX)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=U64_MAX)
    stream: bool = False
    frequency_penalty: float | None = None

    _stop_is_text = field_validator("stop")(lambda v: _encodable_strings(v))

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, le=U64_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, le=U32_MAX)
    presence_penalty: float | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    # "auto" (the default with tools), "none", "required", a function's name (TGI reads any
    # other string as one) or {"type": "function", "function": {"name": ...}}.
    tool_choice: str | NamedToolChoice | None = None
    tool_prompt: str | None = None  # TGI's: the instructions put before the tools


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]

    _prompt_is_text = field_validator("prompt")(lambda v: _encodable_strings(v))
    suffix: str | None = None
    repetition_penalty: float | None = None

    neutral_values: ClassVar[dict[str, object]] = {"suffix": None}

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt
