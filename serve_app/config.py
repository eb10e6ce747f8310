"""Validated configuration of a ray-tgi application (the `args:` of serve_config.yaml).

Every model is pydantic with `extra="forbid"`, so a misspelled key or an unknown launcher
flag fails at deploy time with its name, not at runtime inside a replica.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

# engine/args.py imports no torch: the Serve side may read what the embedded engine supports.
from engine.args import SUPPORTED_QUANTIZATIONS

# TGI's `--quantize` choices (text-generation-launcher 3.x).
Quantization = Literal[
    "awq",
    "compressed-tensors",
    "eetq",
    "exl2",
    "gptq",
    "marlin",
    "bitsandbytes",
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "fp8",
]


# Launcher flags passed in the environment, never on the command line.
SECRET_FLAGS = {"api_key"}
# List flags TGI's launcher takes once per value (it splits only --cuda-graphs on commas).
_TGI_REPEATED_FLAGS = {"cors_allow_origin"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Flags TGI's launcher takes without a value.
_BARE_SWITCHES = frozenset({"json_output", "disable_grammar_support"})


class LauncherArgs(_Strict):
    """TGI launcher flags (`text-generation-launcher --help`); unset flags use its defaults.

    The flags that each replica must own (`--hostname --port --master-port --shard-uds-path`)
    and those set from `ModelConfig` (`--model-id --revision --num-shard`) are not accepted.
    """

    max_concurrent_requests: int | None = Field(
        None, ge=1, description="Requests in flight before the server answers 429."
    )
    max_best_of: int | None = Field(None, ge=1, description="Largest `best_of` accepted.")
    max_stop_sequences: int | None = Field(None, ge=0, description="Most stop sequences.")
    max_top_n_tokens: int | None = Field(None, ge=0, description="Largest `top_n_tokens`.")
    max_input_tokens: int | None = Field(None, ge=1, description="Longest prompt, in tokens.")
    max_total_tokens: int | None = Field(
        None, ge=2, description="Longest prompt + generation, in tokens (per request)."
    )
    waiting_served_ratio: float | None = Field(
        None, ge=0, description="Waiting/running ratio that triggers a prefill of waiters."
    )
    max_batch_prefill_tokens: int | None = Field(
        None, ge=1, description="Most tokens in one prefill batch."
    )
    max_batch_total_tokens: int | None = Field(
        None, ge=1, description="KV-cache budget: most tokens held by one running batch."
    )
    max_waiting_tokens: int | None = Field(
        None, ge=0, description="Steps since the last join before waiters join anyway."
    )
    max_batch_size: int | None = Field(None, ge=1, description="Most requests in one batch.")
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="Weight dtype (TGI itself accepts float16 and bfloat16 only)."
    )
    quantize: Quantization | None = Field(None, description="Weight quantization method.")
    sharded: bool | None = Field(None, description="Force sharding on or off.")
    cuda_graphs: list[int] | None = Field(
        None, description="Batch sizes to capture CUDA graphs for; [0] disables them."
    )
    cuda_memory_fraction: float | None = Field(
        None, gt=0, le=1, description="Fraction of GPU memory the server may use."
    )
    huggingface_hub_cache: str | None = Field(None, description="Hub cache directory.")
    payload_limit: int | None = Field(None, ge=1, description="Largest request body, bytes.")
    api_key: str | None = Field(
        None, min_length=1, description="Bearer token the generation routes require (401)."
    )
    cors_allow_origin: list[str] | None = Field(None, description="Origins CORS allows.")
    max_client_batch_size: int | None = Field(
        None, ge=1, description="Most prompts in one /v1/completions request (and OpenAI n)."
    )
    json_output: bool = Field(False, description="Log as JSON lines (a bare switch).")
    disable_grammar_support: bool = Field(
        False, description="Refuse `grammar`, `response_format` and `tools` (a bare switch)."
    )
    otlp_endpoint: str | None = Field(None, description="OpenTelemetry collector endpoint.")

    @model_validator(mode="after")
    def _check_token_budgets(self) -> "LauncherArgs":
        # The same checks text-generation-launcher makes before it starts anything.
        def check(small: str, big: str, strict: bool) -> None:
            a, b = getattr(self, small), getattr(self, big)
            if a is None or b is None:
                return
            if a > b or (strict and a == b):
                relation = "<" if strict else "<="
                raise ValueError(f"{small} ({a}) must be {relation} {big} ({b})")

        check("max_input_tokens", "max_total_tokens", strict=True)
        check("max_input_tokens", "max_batch_prefill_tokens", strict=False)
        check("max_total_tokens", "max_batch_total_tokens", strict=False)
        check("max_batch_prefill_tokens", "max_batch_total_tokens", strict=False)
        return self

    def to_argv(self, engine: Literal["embedded", "tgi"] = "embedded") -> list[str]:
        """Set flags as kebab-case argv (`--max-total-tokens 2048`), unset ones left out.
        Secrets are not flags: see secret_env."""
        argv: list[str] = []
        for name, value in self.model_dump(exclude_none=True, exclude=SECRET_FLAGS).items():
            flag = "--" + name.replace("_", "-")
            if name in _BARE_SWITCHES:
                if value:
                    argv.append(flag)
            elif isinstance(value, bool):
                argv += [flag, str(value).lower()]
            elif isinstance(value, list) and engine == "tgi" and name in _TGI_REPEATED_FLAGS:
                for item in value:
                    argv += [flag, str(item)]
            elif isinstance(value, list):
                argv += [flag, ",".join(str(v) for v in value)]
            else:
                argv += [flag, str(value)]
        return argv

    def secret_env(self) -> dict[str, str]:
        """Secret flags as the environment variables both launchers read instead (API_KEY):
        a command line is visible to every process on the node, and logged."""
        return {name.upper(): str(getattr(self, name))
                for name in sorted(SECRET_FLAGS) if getattr(self, name) is not None}  # fmt: skip


class ResourceConfig(_Strict):
    """Ray resources of one TGIServer replica."""

    num_cpus: float = Field(
        1.0, gt=0, description="CPUs reserved per shard (the first also runs the replica)."
    )
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per shard.")


class AutoscalingOptions(_Strict):
    """Replicas follow the engines' queues (deployments/autoscaling.py), within Serve's
    bounds and delays."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 scales to zero.")
    max_replicas: int = Field(ge=1, description="Most replicas.")
    target_queued_per_replica: float = Field(
        2.0, gt=0, description="Requests waiting in each engine's queue that one replica absorbs."
    )
    target_batch_token_usage: float = Field(
        0.75, gt=0, le=1, description="Share of the KV cache a replica's batch may reserve."
    )
    upscale_delay_s: float = Field(30, ge=0, description="Demand lasting this long adds.")
    downscale_delay_s: float = Field(600, ge=0, description="Idle lasting this long removes.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Idle lasting this long takes the last replica away "
        "(min_replicas 0); default: downscale_delay_s.",
    )  # fmt: skip
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often each replica reads its engine's queue and reports "
        "it, and each handle its queued requests, to the autoscaler.",
    )  # fmt: skip
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which the reported metrics are averaged."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas "
                             f"({self.max_replicas})")  # fmt: skip
        # Serve only warns, then averages over a window holding at most one report.
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must be > "
                             f"metrics_interval_s ({self.metrics_interval_s})")  # fmt: skip
        return self


class DeploymentOptions(_Strict):
    """Ray Serve options of one model's TGIServer deployment."""

    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replicas, each running its own launcher (default 1); "
        "leave unset with `autoscaling`.",
    )  # fmt: skip
    autoscaling: AutoscalingOptions | None = Field(
        None, description="Scale replicas on the engines' queues instead of a fixed number."
    )
    request_router: Literal["batching_aware", "power_of_two"] = Field(
        "batching_aware",
        description="batching_aware: by the load each engine's batch carries, with prefix "
        "affinity (deployments/router.py); power_of_two: Serve's default router.",
    )
    routing_stats_period_s: float = Field(
        2.0, gt=0, description="How often each replica reports its engine's load to routers."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Serve sends one replica at once; default: the launcher's "
        "max_concurrent_requests (128 when unset), so continuous batching sees them all.",
    )
    health_check_period_s: float = Field(10, gt=0, description="Seconds between health checks.")
    health_check_timeout_s: float = Field(30, gt=0, description="Health check deadline.")
    graceful_shutdown_timeout_s: float = Field(
        20, ge=0, description="Seconds a stopping replica may drain before it is killed."
    )
    startup_timeout_s: float = Field(
        600, gt=0, description="Seconds the launcher may take to load the model and get healthy."
    )
    max_queued_requests: int | None = Field(
        None, ge=1, description="Requests each caller (ingress replica) may queue for this "
        "deployment's replicas before more are refused with 429 overloaded; default: unbounded.",
    )  # fmt: skip
    stream_messages_per_s: float = Field(
        500, ge=0, description="Messages a second one replica's HTTP token streams send "
        "through Serve's hops, all together: with n streams open, a stream's tokens go at "
        "most every n / this seconds (0.1 s at most), those that come sooner together. The "
        "first token goes at once. 0: each token as soon as it comes.",
    )  # fmt: skip
    max_surge_percent: int | None = Field(
        None, ge=0, le=100, description="On a `serve deploy` that changes this model, extra "
        "replicas (percent of the target count) Serve starts before it stops old ones; 100: "
        "blue/green, every new replica serves before an old one drains. Default (Serve's, 0): "
        "an old replica stops first.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_replicas(self) -> "DeploymentOptions":
        if self.autoscaling is not None and self.num_replicas is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self


class ModelConfig(_Strict):
    """One served model: which weights, which engine, how it is sharded and deployed."""

    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9._\-]+$", description="Model name clients use."
    )
    model_id: str = Field(min_length=1, description="Hub id or local path of the weights.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    engine: Literal["embedded", "tgi"] = Field(
        "embedded",
        description="embedded: `python -m engine`; tgi: the real `text-generation-launcher`.",
    )
    num_shard: int = Field(1, ge=1, description="Tensor-parallel shards (one GPU each).")
    prefetch_weights: bool = Field(
        True,
        description="Hub ids: each replica downloads the weights into its node's Hub cache "
        "before the launcher starts (one download per node), then starts it offline "
        "(deployments/weights_prefetch.py).",
    )
    launcher_args: LauncherArgs = Field(default_factory=LauncherArgs)
    resources: ResourceConfig = Field(default_factory=ResourceConfig)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @model_validator(mode="after")
    def _check_engine_support(self) -> "ModelConfig":
        # Refused at deploy time rather than by a launcher exiting in every replica.
        quantize, dtype = self.launcher_args.quantize, self.launcher_args.dtype
        if self.engine == "embedded" and quantize not in (None, *SUPPORTED_QUANTIZATIONS):
            raise ValueError(f"quantize {quantize!r} needs engine: tgi; the embedded engine "
                             f"supports {', '.join(SUPPORTED_QUANTIZATIONS)}")  # fmt: skip
        if self.engine == "tgi" and dtype == "float32":
            raise ValueError("text-generation-launcher takes dtype float16 or bfloat16")
        return self

    def launcher_argv(self) -> list[str]:
        """Launcher flags for this model, without the per-replica host/port flags."""
        argv = ["--model-id", self.model_id]
        if self.revision is not None:
            argv += ["--revision", self.revision]
        argv += ["--num-shard", str(self.num_shard)]
        return argv + self.launcher_args.to_argv(self.engine)


class KeyLimits(_Strict):
    """Per-key limits, enforced by each ingress replica on its own."""

    requests_per_second: float | None = Field(
        None, gt=0, description="Token-bucket refill rate: sustained requests per second."
    )
    burst: int | None = Field(
        None, ge=1, description="Token-bucket size: requests allowed at once after a quiet "
        "spell (default: requests_per_second rounded up).",
    )  # fmt: skip
    max_concurrent_requests: int | None = Field(
        None, ge=1, description="Requests of this key in flight at once (streams until done)."
    )


class APIKey(KeyLimits):
    """One client's Bearer key; limits left unset fall back to `auth`'s."""

    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9._\-]+$",
        description="Who holds the key: named in logs and 429 messages instead of the key.",
    )  # fmt: skip
    key_env: str | None = Field(
        None, min_length=1, description="Environment variable holding the key, read by each "
        "ingress replica when it starts (keeps the secret out of config files).",
    )  # fmt: skip
    key: SecretStr | None = Field(
        None, min_length=16, description="The key itself (the Python API, tests); in "
        "serve_config.yaml use `key_env`.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_source(self) -> "APIKey":
        if (self.key is None) == (self.key_env is None):
            raise ValueError(f"API key {self.name!r}: set exactly one of key_env or key")
        return self


class AuthOptions(KeyLimits):
    """Bearer API keys at the ingress; the limits here are each key's defaults."""

    api_keys: list[APIKey] = Field(min_length=1, description="Accepted keys.")
    open_paths: list[str] = Field(
        ["/health", "/metrics"], description="Paths served without a key (also under "
        "/models/{name}); the chat page itself (GET / and /static/) is always open.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _unique_names(self) -> "AuthOptions":
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError(f"API key names must be unique: {names}")
        return self


class IngressOptions(_Strict):
    """Ray Serve options of the HTTP ingress deployment, and what it refuses at the door."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.1, gt=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Concurrent HTTP requests one ingress replica handles."
    )
    # A `serve deploy` that changes any model's args redeploys the ingress too (the app's
    # config is its code version), and every open stream passes through an ingress replica.
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="Seconds a replaced ingress replica may finish its open "
        "streams before it is killed (Serve's default: 20).",
    )  # fmt: skip
    max_surge_percent: int | None = Field(
        None, ge=0, le=100, description="As the model's: 100 starts the new ingress before "
        "the old one drains.",
    )  # fmt: skip
    auth: AuthOptions | None = Field(
        None, description="API keys and per-key limits; unset: no key needed."
    )
    max_body_bytes: int = Field(
        2_000_000, ge=1, description="Largest request body (413 above); TGI's payload limit."
    )
    request_timeout_s: float | None = Field(
        None, gt=0, description="Longest a request may take at the ingress, streams included "
        "(504, or an error event in a started stream); unset: none, as TGI.",
    )  # fmt: skip
    check_prompt_tokens: bool = Field(
        True, description="Count prompt tokens at the ingress (the model's tokenizer) and "
        "refuse requests over the engine's max_input_tokens / max_total_tokens with TGI's 422 "
        "before they are dispatched.",
    )  # fmt: skip


class TracingOptions(_Strict):
    """OpenTelemetry tracing: a span per request in the ingress and in the TGIServer, sent
    to an OTLP/HTTP collector (deployments/tracing.py)."""

    otlp_endpoint: str = Field(
        pattern=r"^https?://",
        description="OTLP/HTTP collector base URL, e.g. http://127.0.0.1:4318; spans are "
        "POSTed to {otlp_endpoint}/v1/traces.",
    )
    service_name: str = Field("ray-tgi", min_length=1, description="OTel service.name.")
    sampling_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of new traces sampled (a caller's choice wins)."
    )
    launcher_otlp_endpoint: str | None = Field(
        None,
        description="Passed to every launcher as --otlp-endpoint unless its model's "
        "launcher_args set one. TGI exports OTLP over gRPC: the collector's gRPC port, e.g. "
        "http://127.0.0.1:4317.",
    )


class AppArgs(_Strict):
    """The whole application: the models it serves and its ingress."""

    models: list[ModelConfig] = Field(min_length=1, description="Served models.")
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    tracing: TracingOptions | None = Field(None, description="OpenTelemetry tracing; off if unset.")
    check_placement: bool = Field(
        True,
        description="Fail the deploy when no alive node can hold one replica of a model "
        "(all its shards' bundles on one node). Set false on autoscaling clusters whose "
        "GPU nodes start on demand.",
    )

    @model_validator(mode="after")
    def _check_unique_names(self) -> "AppArgs":
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {duplicates}")
        return self
