"""Messages taken out of circulation, moved from Redis to the dead-letter store.

The fetch script and `Channel.quarantine` push a message that cannot run (malformed, or poison)
onto `jobs_service:rejected` in the same step that takes it from its queue or its record, so
none is lost if the worker dies next. A worker's heartbeat thread then writes each entry to the
dead-letter store (PostgreSQL) and removes it from the list only after the commit; while the
database is down the entries wait in Redis. One worker drains at a time (a lock with a TTL).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from app.delivery.envelope import describe
from app.delivery.records import Keys
from app.services import dead_letters

#: Entries written to the dead-letter store in one transaction.
DRAIN_BATCH = 100
#: The raw message kept in a dead-letter entry, at most (bytes).
RAW_LIMIT = 64 * 1024
LOCK_SECONDS = 60

logger = logging.getLogger(__name__)


def failure_of(entry: bytes) -> dead_letters.Failure:
    """The dead-letter entry for one item of the rejected list.

    Whatever the message holds, the entry is one PostgreSQL accepts: an entry it refused would
    stop every later one from being written (the drain takes them in order).
    """
    head, _, raw = entry.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError:
        header = {}
    reason = str(header.get("reason") or "unknown")
    poison = reason == "poison"
    found = describe(raw)
    tag = str(header.get("tag") or "")
    text = raw[:RAW_LIMIT].decode("utf-8", "backslashreplace")
    if len(raw) > RAW_LIMIT:
        text += f"... ({len(raw)} bytes in all)"
    args, kwargs = found["args"], found["kwargs"]
    if not (_storable_json(args) and _storable_json(kwargs)):
        args, kwargs = [], {}  # the raw message keeps them
    return dead_letters.Failure(
        task_id=_storable(found["task_id"] or tag or "unknown")[:255],
        job_name=_storable(found["job_name"] or "(not a job)")[:255],
        queue=_storable(str(header.get("queue") or ""))[:64] or None,
        args=args,
        kwargs=kwargs,
        headers={},
        reason="poison" if poison else "malformed",
        error_type="app.delivery.PoisonMessage" if poison else "app.delivery.MalformedMessage",
        error_message=(
            f"its deliveries ended in the death of the process holding it "
            f"{header.get('deaths', '?')} times"
            if poison
            else _storable(reason)
        ),
        traceback=None,
        attempts=int(header["deaths"])
        if poison and isinstance(header.get("deaths"), int)
        else None,
        enqueued_at=None,
        raw_message=_storable(text),
    )


def _storable(text: str) -> str:
    """`text` as PostgreSQL stores it: no NUL characters, no lone surrogates."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _storable_json(value: object) -> bool:
    """Whether PostgreSQL's jsonb takes `value` (no NaN or infinity, no \\u0000, no lone
    surrogates)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # (UnicodeEncodeError is a ValueError)
        return False
    return "\\u0000" not in text


def _settle_controls(client: redis.Redis, entry: bytes) -> None:
    """A dead job no longer holds its unique key (app.delivery.flow), and counts as dead in
    its batch (app.jobs.batches)."""
    from app.delivery import flow

    try:
        message = json.loads(entry.partition(b"\n")[2])
        headers = message.get("headers") or {}
        key, task_id = headers.get(flow.UNIQUE_HEADER), headers.get("id")
        batch = headers.get("job_batch")
    except (ValueError, AttributeError, RecursionError):
        return
    if not isinstance(task_id, str):
        return
    if isinstance(key, str):
        flow.release_unique(client, key, task_id)
    if isinstance(batch, int) and not isinstance(batch, bool):
        from app.jobs import batches

        try:
            batches.job_finished(batch, task_id, dead=True)
        except Exception:
            logger.exception("could not count job %s as dead in batch %d", task_id, batch)


def drain(client: redis.Redis, keys: Keys, worker: str, limit: int = DRAIN_BATCH) -> int:
    """Write the oldest rejected messages to the dead-letter store; return how many."""
    if not client.llen(keys.rejected):
        return 0
    if not client.set(keys.rejected_lock, worker, nx=True, ex=LOCK_SECONDS):
        return 0  # another worker drains
    try:
        entries: Any = client.lrange(keys.rejected, -limit, -1)  # LPUSHed: the oldest is last
        if not entries:
            return 0
        failures = [failure_of(bytes(entry)) for entry in reversed(entries)]
        from app.db import session_scope

        with session_scope() as session:
            ids = [dead_letters.record(session, failure) for failure in failures]
        client.rpop(keys.rejected, len(entries))  # only the lock holder removes from this end
        for entry in entries:
            _settle_controls(client, bytes(entry))
        for entry_id, failure in zip(ids, failures, strict=True):
            log_dead_lettered(entry_id, failure)
        return len(entries)
    finally:
        if client.get(keys.rejected_lock) == worker.encode():
            client.delete(keys.rejected_lock)


def log_dead_lettered(
    entry_id: int, failure: dead_letters.Failure, log: logging.Logger = logger
) -> None:
    """The one ERROR line of a message written to the dead-letter store (Redis's rejected list
    here, RabbitMQ's dead-letter queue in app.delivery.rabbitmq)."""
    log.error(
        "message dead-lettered as #%d (%s) from queue %s: %s",
        entry_id,
        failure.reason,
        failure.queue,
        failure.error_message,
        extra={"event": "dead_letter", "dead_letter_id": entry_id, "reason": failure.reason},
    )
