"""Retries and scheduled jobs wait in Redis, not in a worker's memory (Sidekiq's scheduled set).

A message published with an `eta` (a job's `countdown=` / `eta=`, a retry's wait, Celery's
own `Task.retry`) more than `SCHEDULE_AFTER` seconds ahead goes into the sorted set
`jobs_service:schedule`, scored by its due time, instead of onto its queue (the transport's
`_put`). A message that reaches a worker with such an `eta` anyway (a producer that pushes to
the list itself: celery-node, Celery 3, a stock kombu client) is moved there and its delivery
ended in one script (`scripts.DEFER`). No worker holds a future job.

Every worker process runs a `Poller` thread per Redis: it moves what is due into its queues with
`scripts.RELEASE`, which takes each member out of the set in the same step that pushes its
message, so each due job is enqueued exactly once however many workers poll, and never before
its due time in Redis's clock. The poller sleeps until the next due time, `POLL_INTERVAL` at
most (a job scheduled meanwhile for sooner is seen within that).

The message waits as the producer built it, `eta` included: the worker that takes it when due
finds the time passed and runs it at once. Operators list, show, run now and delete entries
here (`jobs-service scheduled`, `jobs-service retries`); a revoke (`celery control revoke`,
`AsyncResult.revoke()`) deletes the entry too, so a job revoked before it is due never runs.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.utils.time import maybe_iso8601

from app.delivery import scripts
from app.delivery.envelope import Malformed, decoded_body
from app.delivery.records import Keys

#: A message due less than this many seconds ahead goes to its queue (the worker holds it until
#: then, as Celery does); one due later waits in the scheduled set.
SCHEDULE_AFTER = 1.0
#: The longest a poller sleeps between two looks at the set.
POLL_INTERVAL = 0.2
#: Messages moved by one script call (the next call, at once, moves the rest).
RELEASE_BATCH = 1000

#: The header the job layer writes on a retry: the error that caused it (shown to operators).
ERROR_HEADER = "job_last_error"

logger = logging.getLogger(__name__)


def due_time(payload: Mapping[str, Any]) -> float | None:
    """The message's `eta` as seconds since the epoch, or None (none, or not readable).

    Protocol 2 carries it in the headers; protocol 1 (Celery 3) in the body. A time without a
    zone is UTC, as Celery reads it.
    """
    headers = payload.get("headers")
    value = headers.get("eta") if isinstance(headers, Mapping) else None
    if value is None and not (isinstance(headers, Mapping) and "task" in headers):
        try:
            body = decoded_body(payload)
        except Malformed:
            return None
        value = body.get("eta") if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = maybe_iso8601(value)
        return float(parsed.replace(tzinfo=parsed.tzinfo or dt.UTC).timestamp())
    except (ValueError, OverflowError, OSError, TypeError, AttributeError):
        return None


def entry_header(queue: str, key: str, payload: Mapping[str, Any]) -> str:
    """The JSON header an entry of the set carries: where it goes and what operators see."""
    headers = payload.get("headers")
    headers = headers if isinstance(headers, Mapping) else {}
    retries = headers.get("retries")
    header: dict[str, Any] = {
        "queue": queue,
        "key": key,
        "task": headers.get("task") if isinstance(headers.get("task"), str) else None,
        "id": headers.get("id") if isinstance(headers.get("id"), str) else None,
        "retries": retries if isinstance(retries, int) else 0,
    }
    error = headers.get(ERROR_HEADER)
    if isinstance(error, str):
        header["error"] = error[:500]
    return json.dumps(header)


def member_base(payload: Mapping[str, Any]) -> str:
    """The member an entry waits under: the task id (or '' to use the message's digest)."""
    headers = payload.get("headers")
    task_id = headers.get("id") if isinstance(headers, Mapping) else None
    return task_id[:200] if isinstance(task_id, str) else ""


# Operators ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A job waiting in the scheduled set."""

    member: str
    due: float  # seconds since the epoch
    queue: str
    task_id: str | None
    job_name: str | None
    retries: int
    error: str | None
    message: dict[str, Any] = field(repr=False)

    @property
    def is_retry(self) -> bool:
        """A job waiting to be tried again (Celery counts its retries in the message)."""
        return self.retries > 0

    @property
    def arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """The positional and keyword arguments, as far as the message can be read."""
        try:
            body = decoded_body(self.message)
        except Malformed:
            return [], {}
        if isinstance(body, list) and len(body) == 3:
            args, kwargs = body[0], body[1]
        elif isinstance(body, dict):
            args, kwargs = body.get("args", []), body.get("kwargs", {})
        else:
            return [], {}
        return (
            args if isinstance(args, list) else [],
            kwargs if isinstance(kwargs, dict) else {},
        )


class EntryNotFound(LookupError):
    """No job with that id waits in the scheduled set."""


def _entry(member: str, due: float, raw: bytes) -> Entry | None:
    head, _, message = raw.partition(b"\n")
    try:
        header = json.loads(head)
        payload = json.loads(message)
    except ValueError:
        return None
    return Entry(
        member=member,
        due=due,
        queue=str(header.get("queue")),
        task_id=header.get("id"),
        job_name=header.get("task"),
        retries=int(header.get("retries") or 0),
        error=header.get("error"),
        message=payload if isinstance(payload, dict) else {},
    )


def entries(
    client: redis.Redis,
    prefix: str = "",
    *,
    job_name: str | None = None,
    retries_only: bool = False,
    limit: int | None = None,
) -> Iterator[Entry]:
    """The waiting jobs, soonest first, filtered by job name and by being a retry."""
    keys = Keys(prefix)
    start, page, shown = 0, 500, 0
    while True:
        members: Any = client.zrange(keys.schedule, start, start + page - 1, withscores=True)
        if not members:
            return
        raws: Any = client.hmget(keys.schedule_messages, [m for m, _ in members])
        for (member, due), raw in zip(members, raws, strict=True):
            if raw is None:
                continue
            entry = _entry(bytes(member).decode(), float(due), bytes(raw))
            if entry is None:
                continue
            if job_name is not None and entry.job_name != job_name:
                continue
            if retries_only and not entry.is_retry:
                continue
            yield entry
            shown += 1
            if limit is not None and shown >= limit:
                return
        start += page


def page(
    client: redis.Redis,
    prefix: str = "",
    *,
    offset: int = 0,
    limit: int = 50,
    job_name: str | None = None,
    retries_only: bool = False,
    max_scanned: int = 2000,
) -> tuple[list[Entry], int | None]:
    """One page of waiting jobs, soonest first, from position `offset` of the set: at most
    `limit` entries, reading at most `max_scanned` members to find them (a filter never scans
    the whole set). The offset of the next page, or None at the end of the set."""
    keys = Keys(prefix)
    found: list[Entry] = []
    position, chunk = max(0, offset), min(500, max(limit, 50))
    while len(found) < limit and position - offset < max_scanned:
        members: Any = client.zrange(keys.schedule, position, position + chunk - 1, withscores=True)
        if not members:
            return found, None
        raws: Any = client.hmget(keys.schedule_messages, [m for m, _ in members])
        for (member, due), raw in zip(members, raws, strict=True):
            position += 1
            if raw is None:
                continue
            if (job_name is not None or retries_only) and not _header_matches(
                bytes(raw), job_name, retries_only
            ):
                continue  # decided on the entry's small header, the message left unparsed
            entry = _entry(bytes(member).decode(), float(due), bytes(raw))
            if entry is None:
                continue
            found.append(entry)
            if len(found) >= limit:
                break
    more = int(client.zcard(keys.schedule)) > position
    return found, position if more else None


def _header_matches(raw: bytes, job_name: str | None, retries_only: bool) -> bool:
    try:
        header = json.loads(raw.partition(b"\n")[0])
    except ValueError:
        return False
    if job_name is not None and header.get("task") != job_name:
        return False
    return not retries_only or int(header.get("retries") or 0) > 0


def find(client: redis.Redis, task_id: str, prefix: str = "") -> list[Entry]:
    """Every entry waiting under `task_id` (one, unless another message had the same id)."""
    keys = Keys(prefix)
    members = [task_id.encode()]
    members += [m for m, _ in client.zscan_iter(keys.schedule, match=_pattern(task_id) + b":*")]
    found = []
    for member in members:
        due = client.zscore(keys.schedule, member)
        raw: Any = client.hget(keys.schedule_messages, member)
        if due is None or raw is None:
            continue
        entry = _entry(bytes(member).decode(), float(due), bytes(raw))
        if entry is not None:
            found.append(entry)
    return found


def get(client: redis.Redis, task_id: str, prefix: str = "") -> Entry:
    """The entry waiting under `task_id`; EntryNotFound when none does."""
    found = find(client, task_id, prefix)
    if not found:
        raise EntryNotFound(f"no scheduled job with task id {task_id!r}")
    return found[0]


def delete(client: redis.Redis, task_id: str, prefix: str = "") -> int:
    """Delete what waits under `task_id` (it never runs); how many entries went."""
    keys = Keys(prefix)
    deleted = 0
    for entry in find(client, task_id, prefix):
        with client.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.schedule, entry.member)
            pipe.hdel(keys.schedule_messages, entry.member)
            removed, _ = pipe.execute()
        deleted += int(removed)
    return deleted


def run_now(client: redis.Redis, task_id: str, prefix: str = "") -> int:
    """Make what waits under `task_id` due now (the next poll enqueues it); how many.

    The message loses its `eta`, or the worker taking it would find it not due and put it
    back in the set.
    """
    keys = Keys(prefix)
    moved = 0
    for entry in find(client, task_id, prefix):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(keys.schedule_messages)
                raw: Any = pipe.hget(keys.schedule_messages, entry.member)
                if raw is None:
                    continue
                head, _, _ = bytes(raw).partition(b"\n")
                message = json.dumps(without_eta(entry.message)).encode()
                pipe.multi()
                pipe.hset(keys.schedule_messages, entry.member, head + b"\n" + message)
                pipe.zadd(keys.schedule, {entry.member: 0}, xx=True)
                pipe.execute()
                moved += 1
            except redis.WatchError:  # the poller moved it meanwhile, or it was deleted
                continue
    return moved


def without_eta(payload: dict[str, Any]) -> dict[str, Any]:
    """The message with its `eta` taken out (protocol 2's header, protocol 1's body field)."""
    payload = dict(payload)
    headers = payload.get("headers")
    if isinstance(headers, Mapping) and "task" in headers:
        payload["headers"] = {**headers, "eta": None}
        return payload
    try:
        body = decoded_body(payload)
    except Malformed:
        return payload
    if not isinstance(body, dict) or "eta" not in body:
        return payload
    encoded = json.dumps({**body, "eta": None})
    properties = payload.get("properties") or {}
    if properties.get("body_encoding") == "base64":
        encoded = base64.b64encode(encoded.encode()).decode()
    payload["body"] = encoded
    return payload


@dataclass(frozen=True)
class Stats:
    """The set's size, and how late its most overdue entry is (0 when none is)."""

    size: int
    oldest_overdue: float


def stats(client: redis.Redis, prefix: str = "") -> Stats:
    """The gauges: entries waiting, and seconds the most overdue one is past its due time."""
    keys = Keys(prefix)
    size = int(client.zcard(keys.schedule))
    first: Any = client.zrange(keys.schedule, 0, 0, withscores=True)
    now = now_in_redis(client)
    overdue = max(0.0, now - float(first[0][1])) if first else 0.0
    return Stats(size=size, oldest_overdue=overdue)


def now_in_redis(client: redis.Redis) -> float:
    """Redis's clock, in seconds since the epoch."""
    clock: Any = client.time()
    seconds, micros = clock
    return float(seconds) + float(micros) / 1e6


def _pattern(text: str) -> bytes:
    """`text` as a literal in a Redis glob pattern."""
    escaped = "".join("\\" + c if c in "*?[]\\^" else c for c in text)
    return escaped.encode()


# The poller ---------------------------------------------------------------------------------


class Poller:
    """One process's mover of due jobs for one Redis (a thread; see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, interval: float = POLL_INTERVAL) -> None:
        self.client = client
        self.keys = keys
        self.interval = interval
        self._script = client.register_script(scripts.RELEASE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduled poller", daemon=True)
        self._failing = False
        #: Redis's clock minus this process's, as of the last poll (a worker compares a
        #: delivered message's `eta` with Redis's clock, as the poller does).
        self.clock_offset = 0.0

    def start(self) -> None:
        """Poll in the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive() and not self._stop.is_set()

    def release(self) -> tuple[int, float | None]:
        """Move what is due into its queues: (how many, seconds until the next is due)."""
        moved_total = 0
        while True:
            moved, following, now = self._script(
                keys=[self.keys.schedule, self.keys.schedule_messages], args=[RELEASE_BATCH]
            )
            moved_total += int(moved)
            self.clock_offset = float(now) - time.time()
            if int(moved) < RELEASE_BATCH:
                wait = float(following) - float(now) if following else None
                return moved_total, wait

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval
            try:
                moved, following = self.release()
                if moved:
                    logger.debug("moved %d due job(s) into their queues", moved)
                if following is not None:
                    wait = max(0.0, min(wait, following))
                if self._failing:
                    logger.warning("the scheduled-set poller reaches Redis again")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    logger.warning("the scheduled-set poller failed: %s; retrying", exc)
                self._failing = True
            self._stop.wait(wait)


# Revoking -----------------------------------------------------------------------------------


def install_revoke_hook(**_: Any) -> None:
    """Make a worker's `revoke` control command delete the revoked jobs' scheduled entries.

    Celery keeps revoked ids in each worker's memory only: a job revoked before it is due
    would run if every worker restarted before it fell due. Connected to `worker_init`; the
    deletion is idempotent, so every worker receiving the broadcast may do it.
    """
    from celery.worker import control

    original = control.Panel.data["revoke"]
    if getattr(original, "deletes_scheduled", False):
        return

    def revoke(
        state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
    ) -> Any:
        ids = task_id if isinstance(task_id, list | tuple | set) else [task_id]
        try:
            deleted = _delete_revoked(state.consumer.app, [str(i) for i in ids])
            if deleted:
                logger.info("revoked %d scheduled job(s): they will not run", deleted)
        except Exception:
            logger.warning("could not delete revoked jobs from the scheduled set", exc_info=True)
        return original(state, task_id, terminate=terminate, signal=signal, **kwargs)

    revoke.deletes_scheduled = True  # type: ignore[attr-defined]
    control.Panel.data["revoke"] = revoke


def _delete_revoked(app: Any, task_ids: list[str]) -> int:
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = getattr(channel, "plain_client", None)
        if client is None:  # not this service's Redis transport: no scheduled set
            return 0
        return sum(delete(client, task_id, channel.keys.prefix) for task_id in task_ids)
