"""Jobs processed and failed per minute, for the web view's dashboard.

Each finished run in a worker adds one to a Redis hash per minute (`jobs_service:minute:<epoch
minute>`, fields `processed` and `failed`), which expires after two hours. The counts are kept
in the process that ran the job and written about once a second, by a thread of that process,
in one pipelined round trip (HINCRBY per minute and field, EXPIRE), and when the process stops
(`flush`, on worker_process_shutdown and worker_shutdown): a run costs the job a dictionary
update, not a round trip to Redis. A process killed outright loses its last second of counts;
the dashboard is a view, not a ledger. It counts only in worker processes (a job run inline,
in a test or a shell, counts nothing) and only on a Redis broker; a broker that cannot be
reached costs the flushing thread at most the short socket timeout below and is logged at
DEBUG, never raised, and those counts are dropped.

`processed` counts every finished run whatever its outcome; `failed` the runs that ended in an
error (`failure`, `retry` or `discard`).
"""

from __future__ import annotations

import logging
import os
import threading
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
        from app.operations import NotRedis, broker_redis

        try:
            client, prefix = broker_redis(socket_timeout=0.5, socket_connect_timeout=0.5)
        except NotRedis:
            client, prefix = None, ""
        _client = (os.getpid(), client, prefix)
    return None if _client[1] is None else (_client[1], _client[2])


#: Counts not yet written: (minute, field) -> count. Guarded by `_pending_lock`.
_pending: dict[tuple[int, str], int] = {}
_pending_lock = threading.Lock()
_flusher: int | None = None  # the pid whose flushing thread runs
#: How often the flushing thread writes the counts (seconds).
FLUSH_INTERVAL = 1.0


def record(outcome: str, now: float | None = None) -> None:
    """Count one finished run (in a worker process on a Redis broker; otherwise nothing)."""
    if not _enabled:
        return
    minute = int((now or time.time()) // 60)
    with _pending_lock:
        _pending[(minute, "processed")] = _pending.get((minute, "processed"), 0) + 1
        if outcome in FAILED_OUTCOMES:
            _pending[(minute, "failed")] = _pending.get((minute, "failed"), 0) + 1
    if _flusher != os.getpid():
        _start_flusher()


def _start_flusher() -> None:
    global _flusher
    with _pending_lock:
        if _flusher == os.getpid():
            return
        _flusher = os.getpid()
    threading.Thread(target=_flush_every_second, name="throughput-counts", daemon=True).start()


def _flush_every_second() -> None:
    pid = os.getpid()
    while _flusher == pid:
        time.sleep(FLUSH_INTERVAL)
        flush()


def flush(**_: Any) -> None:
    """Write the counts kept so far (also connected to the worker's shutdown signals)."""
    with _pending_lock:
        if not _pending:
            return
        counts = dict(_pending)
        _pending.clear()
    try:
        found = _redis()
        if found is None:
            return
        client, prefix = found
        with client.pipeline(transaction=False) as pipe:
            for (minute, field), count in counts.items():
                pipe.hincrby(f"{prefix}{MINUTE}{minute}", field, count)
            for minute in {minute for minute, _ in counts}:
                pipe.expire(f"{prefix}{MINUTE}{minute}", TTL)
            pipe.execute()
    except Exception:  # counting must never fail a job, nor stop the worker
        logger.debug("could not write the dashboard's counts", exc_info=True)


def _after_fork_in_child() -> None:
    # A forked process has no flushing thread, and its parent's counts are not its own; a
    # lock the parent's thread held at the fork would stay held.
    global _pending_lock, _flusher
    _pending_lock = threading.Lock()
    _pending.clear()
    _flusher = None


os.register_at_fork(after_in_child=_after_fork_in_child)


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
