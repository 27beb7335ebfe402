"""Which result backend class a result backend URL gets (app.delivery.results.backend_url)."""

from __future__ import annotations

import datetime as dt

import pytest
from celery.app.backends import by_url
from celery.backends.rpc import RPCBackend

from app.delivery.results import RedisResults, SentinelResults, _seconds, backend_url


@pytest.mark.parametrize(
    ("url", "cls", "given"),
    [
        ("redis://cache:6380/2", RedisResults, "redis://cache:6380/2"),
        ("rediss://:pw@cache:6380/2", RedisResults, "rediss://:pw@cache:6380/2"),
        ("redis+socket:///run/redis.sock", RedisResults, "socket:///run/redis.sock"),
        ("sentinel://a:26379;sentinel://b:26379", SentinelResults, None),
        ("rpc://", RPCBackend, "rpc://"),
    ],
)
def test_redis_urls_get_the_one_round_trip_store_and_others_stay_celerys(
    url: str, cls: type, given: str | None
) -> None:
    backend, passed = by_url(backend_url(url))
    assert backend is cls
    assert passed == (given or url)


def test_no_url_and_a_named_class_are_left_alone() -> None:
    assert backend_url(None) is None
    named = "app.delivery.results:RedisResults+redis://x/0"
    assert backend_url(named) == named
    assert backend_url("db+postgresql://u@h/d") == "db+postgresql://u@h/d"


@pytest.mark.parametrize(
    ("expires", "seconds"),
    [(None, 0), (0, 0), (86400, 86400), (0.2, 1), (2.5, 3), (dt.timedelta(hours=1), 3600)],
)
def test_expiry_is_whole_seconds_rounded_up(expires: object, seconds: int) -> None:
    assert _seconds(expires) == seconds
