"""Jobs processed and failed per minute, for the web view's dashboard.

Each finished run in a worker adds one to a Redis hash per minute (`jobs_service:minute:<epoch
minute>`, fields `processed` and `failed`), which expires after two hours: one pipelined
round trip (HINCRBY, HINCRBY, EXPIRE) per run, from the process that ran the job, to the
broker's Redis. It counts only in worker processes (a job run inline, in a test or a shell,
counts nothing) and only on a Redis broker; a broker that cannot be reached costs the run at
most the short socket timeout below and is logged at DEBUG, never raised.

`processed` counts every finished run whatever its outcome; `failed` the runs that ended in an
error (`failure`, `retry` or `discard`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from app.delivery.records import NAMESPACE

logger = logging.getLogger(__name__)

MINUTE = NAMESPACE + "minute:"  # + minutes since the epoch
#: How long a minute's counts are kept.
TTL = 2 * 3600
FAILED_OUTCOMES = ("failure", "retry", "discard")

_enabled = False
_client: tuple[int, Any, str] | None = None  # (pid, client, prefix)


def enable(**_: Any) -> None:
    """Count in this process (connected to the worker's init signals)."""
    global _enabled
    _enabled = True


def _redis() -> tuple[Any, str] | None:
    global _client
    if _client is None or _client[0] != os.getpid():
        from app.celery_app import celery_app
        from app.delivery.clients import broker_client

        client = broker_client(socket_timeout=0.5, socket_connect_timeout=0.5)
        if client is None:
            _client = (os.getpid(), None, "")
        else:
            options = celery_app.conf.broker_transport_options or {}
            prefix = str(options.get("global_keyprefix") or "")
            _client = (os.getpid(), client, prefix)
    return None if _client[1] is None else (_client[1], _client[2])


def record(outcome: str, now: float | None = None) -> None:
    """Count one finished run (in a worker process on a Redis broker; otherwise nothing)."""
    if not _enabled:
        return
    try:
        found = _redis()
        if found is None:
            return
        client, prefix = found
        key = f"{prefix}{MINUTE}{int((now or time.time()) // 60)}"
        with client.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "processed", 1)
            if outcome in FAILED_OUTCOMES:
                pipe.hincrby(key, "failed", 1)
            pipe.expire(key, TTL)
            pipe.execute()
    except Exception:  # counting must never fail a job
        logger.debug("could not count the run for the dashboard", exc_info=True)


def last_hour(
    client: Any, prefix: str = "", now: float | None = None
) -> list[tuple[int, int, int]]:
    """(minute start, processed, failed) for each of the last 60 minutes, oldest first: one
    pipelined round trip of 60 HMGETs."""
    current = int((now or time.time()) // 60)
    minutes = list(range(current - 59, current + 1))
    with client.pipeline(transaction=False) as pipe:
        for minute in minutes:
            pipe.hmget(f"{prefix}{MINUTE}{minute}", "processed", "failed")
        counts = pipe.execute()
    return [
        (minute * 60, int(processed or 0), int(failed or 0))
        for minute, (processed, failed) in zip(minutes, counts, strict=True)
    ]
