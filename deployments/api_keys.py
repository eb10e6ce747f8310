"""API keys at the ingress: who a Bearer token belongs to, and that key's limits.

Keys come from the app config (`ingress.auth.api_keys`), each either inline (`key`, a
pydantic SecretStr that never prints) or, as serve_config.yaml should have it, from an
environment variable the config names (`key_env`), read once when the ingress replica
starts. Only SHA-256 digests of the keys are kept and compared; logs and error messages
name a key by its `name`.

Limits are per ingress replica: with N ingress replicas a key may reach N times its rate
and concurrency (each replica keeps its own token buckets and counters).
"""

import hashlib
import hmac
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from serve_app.config import APIKey, AuthOptions

_BEARER = "bearer "


@dataclass
class TokenBucket:
    """`rate` tokens a second, up to `capacity`; one request takes one token."""

    rate: float
    capacity: float
    tokens: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is one."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class KeyHolder:
    """One key's identity, bucket and requests in flight (this replica's)."""

    name: str
    bucket: TokenBucket | None
    max_concurrent_requests: int | None
    num_in_flight: int = 0


@dataclass(frozen=True)
class Refusal:
    """A 429 for a key over one of its limits."""

    message: str
    retry_after_s: int


class APIKeys:
    def __init__(self, options: AuthOptions, environ: Mapping[str, str]):
        """Resolve every key now, so a missing variable fails the deploy, by name."""
        self.open_paths = frozenset(options.open_paths)
        self._holders: dict[bytes, KeyHolder] = {}
        for key in options.api_keys:
            digest = _digest(_secret(key, environ))
            if digest in self._holders:
                raise ValueError(f"API keys {self._holders[digest].name!r} and {key.name!r} "
                                 "are the same key")  # fmt: skip
            self._holders[digest] = _holder(key, options)

    def authenticate(self, authorization: str | None) -> KeyHolder | None:
        """The holder of `Authorization: Bearer <key>`, None for anything else."""
        if not authorization or authorization[: len(_BEARER)].lower() != _BEARER:
            return None
        digest = _digest(authorization[len(_BEARER) :].strip())
        # Equal-length digests compared in constant time, one by one: no early exit on a
        # matching prefix of the key itself.
        found = None
        for known, holder in self._holders.items():
            if hmac.compare_digest(known, digest):
                found = holder
        return found

    def admit(self, holder: KeyHolder, now: float | None = None) -> Refusal | None:
        """Count a request of `holder` in (release it with `release`), or say why not."""
        limit = holder.max_concurrent_requests
        if limit is not None and holder.num_in_flight >= limit:
            return Refusal(f"API key '{holder.name}' has {limit} requests in flight, its "
                           "max_concurrent_requests", retry_after_s=1)  # fmt: skip
        if holder.bucket is not None:
            wait_s = holder.bucket.take(time.monotonic() if now is None else now)
            if wait_s > 0:
                rate = holder.bucket.rate
                return Refusal(f"API key '{holder.name}' is over its rate limit of {rate:g} "
                               "requests per second", math.ceil(wait_s))  # fmt: skip
        holder.num_in_flight += 1
        return None

    def release(self, holder: KeyHolder) -> None:
        holder.num_in_flight -= 1


def _secret(key: APIKey, environ: Mapping[str, str]) -> str:
    if key.key is not None:
        return key.key.get_secret_value()
    value = environ.get(key.key_env or "", "")
    if not value:
        raise ValueError(f"API key {key.name!r}: environment variable {key.key_env} is not "
                         "set (or empty) where the ingress runs")  # fmt: skip
    return value


def _holder(key: APIKey, defaults: AuthOptions) -> KeyHolder:
    rate = key.requests_per_second or defaults.requests_per_second
    burst = key.burst or defaults.burst
    bucket = None
    if rate is not None:
        bucket = TokenBucket(rate, float(burst or max(1, math.ceil(rate))))
    concurrency = key.max_concurrent_requests or defaults.max_concurrent_requests
    return KeyHolder(key.name, bucket, concurrency)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()
