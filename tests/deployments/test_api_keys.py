"""API keys and per-key limits of the ingress (deployments/api_keys.py), and their config."""

import pydantic
import pytest

from deployments.api_keys import APIKeys, TokenBucket
from serve_app.config import AuthOptions, IngressOptions

KEY_A, KEY_B = "a" * 20, "b" * 20


def _keys(**auth) -> APIKeys:
    auth.setdefault("api_keys", [{"name": "a", "key": KEY_A}])
    return APIKeys(AuthOptions.model_validate(auth), environ={"B_KEY": KEY_B})


def test_bearer_keys_from_the_config_and_from_the_environment():
    keys = _keys(api_keys=[{"name": "a", "key": KEY_A}, {"name": "b", "key_env": "B_KEY"}])
    assert keys.authenticate(f"Bearer {KEY_A}").name == "a"
    assert keys.authenticate(f"bearer {KEY_B}").name == "b"  # the scheme is case-insensitive
    for header in (None, "", KEY_A, f"Basic {KEY_A}", f"Bearer {KEY_A}x", "Bearer ", "Bearer"):
        assert keys.authenticate(header) is None, header


def test_a_missing_variable_fails_at_start_by_name_and_no_key_prints():
    with pytest.raises(ValueError, match="environment variable NOPE is not set"):
        _keys(api_keys=[{"name": "x", "key_env": "NOPE"}])
    options = IngressOptions.model_validate({"auth": {"api_keys": [{"name": "a", "key": KEY_A}]}})
    assert KEY_A not in repr(options) and KEY_A not in str(options.model_dump())


@pytest.mark.parametrize(
    "api_key",
    [{"name": "x"}, {"name": "x", "key": KEY_A, "key_env": "B_KEY"}, {"name": "x", "key": "short"},
     {"name": "bad name", "key": KEY_A}, {"name": "x", "key": KEY_A, "typo": 1}],
)  # fmt: skip
def test_bad_key_configs_are_refused(api_key):
    with pytest.raises(pydantic.ValidationError):
        AuthOptions.model_validate({"api_keys": [api_key]})


def test_duplicate_names_or_keys_are_refused():
    with pytest.raises(pydantic.ValidationError, match="unique"):
        AuthOptions.model_validate({"api_keys": [{"name": "a", "key": KEY_A},
                                                 {"name": "a", "key": KEY_B}]})  # fmt: skip
    with pytest.raises(ValueError, match="are the same key"):
        _keys(api_keys=[{"name": "a", "key": KEY_B}, {"name": "b", "key_env": "B_KEY"}])


def test_token_bucket_allows_its_burst_then_its_rate():
    bucket = TokenBucket(rate=2.0, capacity=3.0, updated=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one token every 1/rate s
    assert bucket.take(100.5) == 0.0
    assert bucket.take(110.0) == 0.0  # refills, but never above capacity
    assert [bucket.take(110.0) for _ in range(3)][-1] > 0


def test_rate_limit_refusal_names_the_key_and_says_when_to_retry():
    keys = _keys(requests_per_second=0.25, burst=1)
    holder = keys.authenticate(f"Bearer {KEY_A}")
    assert keys.admit(holder, now=holder.bucket.updated) is None
    refusal = keys.admit(holder, now=holder.bucket.updated)
    assert refusal.retry_after_s == 4 and "'a'" in refusal.message and KEY_A not in refusal.message


def test_concurrency_limit_counts_requests_in_flight_until_released():
    keys = _keys(api_keys=[{"name": "a", "key": KEY_A, "max_concurrent_requests": 2}],
                 max_concurrent_requests=10)  # fmt: skip
    holder = keys.authenticate(f"Bearer {KEY_A}")
    assert keys.admit(holder) is None and keys.admit(holder) is None  # the key's own limit
    assert "max_concurrent_requests" in keys.admit(holder).message
    keys.release(holder)
    assert keys.admit(holder) is None
    assert holder.num_in_flight == 2
