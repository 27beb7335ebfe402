"""The one way the service opens a redis-py client of its own on the broker's Redis.

On a `redis://`, `rediss://` or `redis+socket://` broker it is a client of that URL. On a
`sentinel://` broker it is a client of the master the sentinels name (`BROKER_SENTINEL_MASTER`):
each new connection asks the sentinels where the master is, and a connection to a server that
stopped being the master (a failover happened) fails and is made again to the new one. The
transport's own connections follow the master the same way (`transport.SentinelChannel`).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import Sentinel

from app.settings import get_endpoints, get_settings, parse_sentinel_url, redis_client_url


def is_sentinel(broker_url: str) -> bool:
    """Whether `broker_url` names Redis sentinels rather than a Redis server."""
    return broker_url.split("://", 1)[0].lower() == "sentinel"


def sentinel_master_client(broker_url: str, master: str, **options: Any) -> redis.Redis:
    """A client of the master `master` that the sentinels of `broker_url` name."""
    parsed = parse_sentinel_url(broker_url)
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinels = Sentinel(
        list(parsed.sentinels), sentinel_kwargs=sentinel_options or None, **options
    )
    client: redis.Redis = sentinels.master_for(
        master, db=parsed.db, username=parsed.username, password=parsed.password
    )
    return client


def broker_client(
    broker_url: str | None = None, *, master: str | None = None, **options: Any
) -> redis.Redis | None:
    """A redis-py client on the broker (the configured one by default), following the master
    on a sentinel:// URL; None when the broker is not Redis (RabbitMQ).

    `master` defaults to BROKER_SENTINEL_MASTER; `options` go to redis-py (socket timeouts).
    """
    url = broker_url if broker_url is not None else get_endpoints().broker_url
    if is_sentinel(url):
        name = master or get_settings().sentinel_master
        if not name:
            raise ValueError(
                "a sentinel:// broker URL needs the master's name (BROKER_SENTINEL_MASTER)"
            )
        return sentinel_master_client(url, name, **options)
    client_url = redis_client_url(url)
    if client_url is None:
        return None
    return redis.Redis.from_url(client_url, **options)
