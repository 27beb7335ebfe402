"""The transactional outbox: a job enqueued in a committed transaction is never lost.

Inside an open `session_scope()`, the job layer (`app.jobs.base`) writes each job it enqueues as
a row of `outbox_messages` in the caller's transaction, with its task id fixed then: a
rollback leaves nothing, a commit makes the job certain. Right after the commit the enqueuing
process publishes its rows and deletes them (the fast path: one DELETE after the publish). If
that publish fails (the broker is down) the caller gets no error and the rows stay; if the
process dies between the commit and the publish, the rows stay too.

A relay in every worker process (a thread, started when the worker is ready) publishes what
stays: every `RELAY_INTERVAL` it takes the oldest rows older than `GRACE` seconds (left to their
fast path until then) with `FOR UPDATE SKIP LOCKED`, so that several relays share the work, in
id order (a producer's commit order), publishes them and deletes them in the same transaction.
A crash between a publish and its delete publishes the row again, with the same task id: the
jobs' idempotency keys make the second run a no-op. Deleting a published row is its pruning.

Why in every worker rather than a Procfile entry of its own: a worker is what every deployment
runs, so no operator can forget the relay and strand committed jobs; the relays of many workers
share rows through SKIP LOCKED and cost one indexed query a second each when idle.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, text
from sqlalchemy.orm import Session

from app.db import get_engine
from app.models.outbox import OutboxMessage

#: Seconds a row is left to its own fast path before a relay takes it.
GRACE = 2.0
#: Seconds between two looks of an idle relay.
RELAY_INTERVAL = 1.0
#: Rows one relay round takes (the next round, at once, takes more).
RELAY_BATCH = 1000

logger = logging.getLogger(__name__)

TABLE = cast(Table, OutboxMessage.__table__)


@dataclass(frozen=True)
class Row:
    """A job as the outbox keeps it."""

    id: int
    task_id: str
    job_name: str
    payload: str


def write(session: Session, rows: Sequence[dict[str, str]]) -> list[int]:
    """Insert `rows` ({task_id, job_name, payload}) in the session's transaction, in one
    statement; their ids."""
    if not rows:
        return []
    if len(rows) == 1:
        result = session.execute(insert(OutboxMessage).returning(OutboxMessage.id), list(rows))
        return list(result.scalars().all())
    # Many rows: three arrays unnested by the server, one statement whatever the count (an
    # INSERT of VALUES lists costs the client a parameter set per row).
    result = session.execute(
        _INSERT_MANY,
        {
            "task_ids": [row["task_id"] for row in rows],
            "job_names": [row["job_name"] for row in rows],
            "payloads": [row["payload"] for row in rows],
        },
    )
    return list(result.scalars().all())


_INSERT_MANY = text(
    "INSERT INTO outbox_messages (task_id, job_name, payload) "
    "SELECT * FROM unnest(CAST(:task_ids AS text[]), CAST(:job_names AS text[]), "
    "CAST(:payloads AS text[])) RETURNING id"
)


def forget(ids: Sequence[int]) -> None:
    """Delete published rows (the fast path, after its publish).

    The commit does not wait for the WAL flush (`synchronous_commit` off, this transaction
    only): a delete lost to a database crash leaves rows already published, which a relay
    publishes again under the same task ids, as after a crash between the publish and the
    delete. Waiting for the flush would add one fsync to every enqueuing transaction."""
    if ids:
        with get_engine().begin() as connection:
            connection.execute(text("SET LOCAL synchronous_commit TO OFF"))
            connection.execute(_DELETE_MANY, {"ids": list(ids)})


#: One array parameter, however many ids (an IN list costs a parameter per id).
_DELETE_MANY = text("DELETE FROM outbox_messages WHERE id = ANY(CAST(:ids AS bigint[]))")


@dataclass(frozen=True)
class Pending:
    """What waits in the outbox: how many rows, and the oldest one's age in seconds."""

    rows: int
    oldest_age: float | None


def pending() -> Pending:
    """The outbox's backlog, as operators and the gauges see it."""
    with get_engine().connect() as connection:
        count, oldest = connection.execute(
            select(
                func.count(),
                func.extract("epoch", func.clock_timestamp() - func.min(TABLE.c.created_at)),
            )
        ).one()
    return Pending(int(count), float(oldest) if oldest is not None else None)


def oldest(limit: int = 10) -> list[tuple[int, str, str, float]]:
    """The oldest rows: (id, task id, job, age in seconds)."""
    age = func.extract("epoch", func.clock_timestamp() - TABLE.c.created_at)
    with get_engine().connect() as connection:
        found = connection.execute(
            select(TABLE.c.id, TABLE.c.task_id, TABLE.c.job_name, age)
            .order_by(TABLE.c.id)
            .limit(limit)
        ).all()
    return [(int(i), str(t), str(j), float(a)) for i, t, j, a in found]


def relay_once(
    publish: Callable[[list[Row]], None], limit: int = RELAY_BATCH, grace: float = GRACE
) -> int:
    """Publish the oldest unclaimed rows older than `grace` seconds and delete them, in one
    transaction: what another relay holds is skipped; a failed publish rolls back and leaves
    them. How many were published."""
    with get_engine().begin() as connection:
        found = connection.execute(
            select(TABLE.c.id, TABLE.c.task_id, TABLE.c.job_name, TABLE.c.payload)
            .where(TABLE.c.created_at < func.clock_timestamp() - dt.timedelta(seconds=grace))
            .order_by(TABLE.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if not found:
            return 0
        rows = [Row(int(i), str(t), str(j), str(p)) for i, t, j, p in found]
        publish(rows)
        connection.execute(_DELETE_MANY, {"ids": [r.id for r in rows]})
    return len(rows)


class Relay:
    """A worker process's relay thread (see the module docstring)."""

    def __init__(
        self,
        publish: Callable[[list[Row]], None],
        interval: float = RELAY_INTERVAL,
        grace: float = GRACE,
    ) -> None:
        self.publish = publish
        self.interval = interval
        self.grace = grace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox relay", daemon=True)
        self._failing = False
        self._behind_since: float | None = None  # when it first found rows the fast path left
        self._relayed = 0  # rows published since then

    def start(self) -> None:
        """Relay in the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after the round in progress)."""
        self._stop.set()

    def round(self) -> int:
        """Publish everything the fast path left, a batch at a time; how many rows."""
        total = 0
        while not self._stop.is_set():
            published = relay_once(self.publish, RELAY_BATCH, self.grace)
            total += published
            if published < RELAY_BATCH:
                break
        if total:
            if self._behind_since is None:
                self._behind_since = time.monotonic()
            self._relayed += total
            _count("outbox.relayed", total)
        elif self._behind_since is not None:
            logger.warning(
                "outbox relay caught up: published %d job(s) the enqueuing processes could "
                "not (broker down, or a process died after its commit) over %.1f s; the "
                "outbox is empty of old rows",
                self._relayed,
                time.monotonic() - self._behind_since,
                extra={"event": "outbox_caught_up", "relayed": self._relayed},
            )
            self._behind_since, self._relayed = None, 0
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
                if self._failing:
                    logger.warning("the outbox relay publishes again")
                self._failing = False
            except Exception as exc:
                if self._behind_since is None:
                    self._behind_since = time.monotonic()
                if not self._failing:
                    logger.warning(
                        "the outbox relay could not publish (%s: %s); the jobs stay in the "
                        "outbox; retrying",
                        type(exc).__name__,
                        exc,
                    )
                self._failing = True
            self._stop.wait(self.interval)


def _count(name: str, value: int) -> None:
    try:
        from app.jobs.instrumentation import metrics

        metrics().incr(name, value)
    except Exception:  # metrics never stop the relay
        logger.debug("could not count %s", name, exc_info=True)


_relay: Relay | None = None


def start_relay(**_: Any) -> None:
    """Start this process's relay (Celery's `worker_ready`; OUTBOX_RELAY=false turns it off)."""
    global _relay
    from app.settings import get_settings

    if not get_settings().outbox_relay or _relay is not None:
        return
    from app.jobs.base import publish_outbox_rows

    _relay = Relay(publish_outbox_rows)
    _relay.start()


def stop_relay(**_: Any) -> None:
    """Stop this process's relay (Celery's `worker_shutdown`)."""
    global _relay
    if _relay is not None:
        _relay.stop()
        _relay = None
