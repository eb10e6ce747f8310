"""Request bodies of the TGI and OpenAI routes (TGI 3.3 API, shared/anchors/tgi-openapi.json).

Unknown fields are ignored, as TGI's serde does. The OpenAI fields the embedded engine does not
implement are accepted at their neutral value and rejected by name otherwise
(`unsupported_fields`); TGI's own rules are in engine/validation.py.
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # name -> value that means "off"; any other value is rejected until implemented.
    neutral_values: ClassVar[dict[str, object]] = {}

    def unsupported_fields(self) -> list[str]:
        return [
            name
            for name, neutral in self.neutral_values.items()
            if getattr(self, name) not in (None, neutral)
        ]


class GenerateParameters(_Request):
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False  # TGI's behaviour; the spec says true
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: dict | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None


def sampling_defaults() -> GenerateParameters:
    """TGI's quirk: `parameters` left out (or null here) samples; `{}` is greedy."""
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Request):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=sampling_defaults)
    add_special_tokens: bool = True

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_is_left_out(cls, value: object) -> object:
        return sampling_defaults() if value is None else value


class CompatGenerateRequest(GenerateRequest):
    """Body of TGI's POST `/`: a generate request that may ask for a stream."""

    stream: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict] = ""

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(_Request):
    """Sampling fields both OpenAI routes share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    frequency_penalty: float | None = None

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    response_format: dict | None = None
    tools: list | None = None

    neutral_values: ClassVar[dict[str, object]] = {"response_format": None, "tools": None}


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    suffix: str | None = None
    repetition_penalty: float | None = None

    neutral_values: ClassVar[dict[str, object]] = {"suffix": None}

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt
