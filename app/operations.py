"""What the operator's tools read and do, shared by the command line (app.cli) and the web
view (app.web): redacted views of dead letters, waiting jobs and batches, the beat schedule
with its next runs, and the actions (retry or discard a dead letter, enqueue a beat entry).

Nothing here prints or exits: the CLI turns errors into one line and exit 2, the web view into
a message on the page.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


class NotRedis(RuntimeError):
    """The broker is not Redis, so the service keeps none of these records there."""


def broker_redis(**options: Any) -> tuple[Any, str]:
    """A redis-py client on the broker (`options` go to redis-py), and the key prefix;
    NotRedis when it is not Redis."""
    from app import celery
    from app.delivery.clients import broker_client

    client = broker_client(**options)
    if client is None:
        raise NotRedis("this command needs a Redis broker (RabbitMQ keeps no such records here)")
    prefix = str((celery.conf.broker_transport_options or {}).get("global_keyprefix") or "")
    return client, prefix


def redacted_arguments(job_name: str | None, args: Any, kwargs: Any) -> Any:
    """A job's arguments with personal and payment data redacted, as every listing shows them."""
    from app import celery
    from app.jobs.arguments import SENSITIVE_NAMES, redact
    from app.jobs.arguments import redacted_arguments as by_signature

    job = celery.tasks.get(job_name or "")
    if job is not None and hasattr(job, "sensitive_names"):
        return by_signature(job.run, args, kwargs, job.sensitive_names)
    return {
        "args": redact(list(args), SENSITIVE_NAMES),
        "kwargs": redact(dict(kwargs), SENSITIVE_NAMES),
    }


def dead_letter_dict(entry: Any, *, full: bool) -> dict[str, Any]:
    """A dead letter as the operator sees it (the traceback and headers only if `full`)."""
    shown: dict[str, Any] = {
        "id": entry.id,
        "failed_at": entry.failed_at.isoformat(),
        "job": entry.job_name,
        "queue": entry.queue,
        "reason": entry.reason,
        "attempts": entry.attempts,
        "error": f"{entry.error_type.rsplit('.', 1)[-1]}: {entry.error_message}",
        "arguments": redacted_arguments(entry.job_name, entry.args, entry.kwargs),
    }
    if full:
        shown.update(
            task_id=entry.task_id,
            error_type=entry.error_type,
            enqueued_at=entry.enqueued_at.isoformat() if entry.enqueued_at else None,
            headers=entry.headers,
            traceback=entry.traceback,
            # A poison message's arguments are shown above, redacted; a malformed one has
            # nothing but its raw bytes to show.
            raw_message=entry.raw_message if entry.reason == "malformed" else None,
        )
    return shown


def retry_dead_letter(entry_id: int) -> tuple[Any, str]:
    """Enqueue a dead letter's job again (a fresh attempt count) and remove it from the store;
    the entry and the new task id. DeadLetterNotFound when there is no such entry."""
    from app import celery
    from app.db import session_scope
    from app.services import dead_letters

    with session_scope() as session:
        entry = dead_letters.get(session, entry_id)
    # Published first, removed after: a crash in between retries it twice (jobs are
    # idempotent), never zero times.
    options = {"queue": entry.queue} if entry.queue else {}
    job = celery.tasks.get(entry.job_name)
    if job is not None:
        result = job.apply_async(entry.args, entry.kwargs, **options)
    else:
        result = celery.send_task(entry.job_name, entry.args, entry.kwargs, **options)
    with session_scope() as session:
        dead_letters.remove(session, entry_id)
    return entry, str(result.id)


def discard_dead_letter(entry_id: int) -> Any:
    """Remove a dead letter for good; the entry. DeadLetterNotFound when there is none."""
    from app.db import session_scope
    from app.services import dead_letters

    with session_scope() as session:
        return dead_letters.remove(session, entry_id)


def scheduled_dict(entry: Any, *, full: bool) -> dict[str, Any]:
    """A job waiting in the scheduled set, arguments redacted (message headers if `full`)."""
    args, kwargs = entry.arguments
    shown: dict[str, Any] = {
        "task_id": entry.task_id or entry.member,
        "due": dt.datetime.fromtimestamp(entry.due, dt.UTC).isoformat(timespec="seconds"),
        "job": entry.job_name,
        "queue": entry.queue,
        "attempt": entry.retries + 1,
        "error": entry.error,
        "arguments": redacted_arguments(entry.job_name, args, kwargs),
    }
    if full:
        headers = entry.message.get("headers") or {}
        shown.update(
            member=entry.member,
            retries=entry.retries,
            headers={k: v for k, v in headers.items() if k not in ("argsrepr", "kwargsrepr")},
        )
    return shown


def batch_dict(progress: Any) -> dict[str, Any]:
    """A batch's progress, times as ISO text."""

    def when(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": progress.id,
        "parent_id": progress.parent_id,
        "description": progress.description,
        "total": progress.total,
        "pending": progress.pending,
        "failed": progress.failed,
        "dead": progress.dead,
        "created_at": when(progress.created_at),
        "completed_at": when(progress.completed_at),
        "succeeded_at": when(progress.succeeded_at),
        "died_at": when(progress.died_at),
        "callbacks": progress.callbacks,
    }


def schedule_rows() -> list[dict[str, Any]]:
    """The beat schedule: each entry, its task, when it last ran and when it runs next."""
    from celery.schedules import schedule as every

    from app import celery

    rows = []
    for name, entry in sorted(celery.conf.beat_schedule.items()):
        schedule = entry["schedule"]
        if isinstance(schedule, int | float):
            schedule = dt.timedelta(seconds=schedule)
        if isinstance(schedule, dt.timedelta):
            schedule = every(schedule)
        last = last_run(name)
        next_run = next_run_time(schedule, last, celery.now)
        rows.append(
            {
                "entry": name,
                "task": entry["task"],
                "schedule": str(schedule),
                "last_run": last.isoformat() if last else None,
                "next_run": next_run.isoformat(timespec="seconds"),
            }
        )
    return rows


def enqueue_beat_entry(name: str) -> str:
    """Enqueue a beat entry's task now, with its arguments and options (beat's own schedule is
    unchanged); the task id. KeyError when there is no such entry."""
    from app import celery

    entry = celery.conf.beat_schedule[name]
    options = dict(entry.get("options") or {})
    job = celery.tasks.get(entry["task"])
    args, kwargs = list(entry.get("args") or ()), dict(entry.get("kwargs") or {})
    if job is not None:
        return str(job.apply_async(args, kwargs, **options).id)
    return str(celery.send_task(entry["task"], args, kwargs, **options).id)


def next_run_time(schedule: Any, last: Any, now: Any) -> Any:
    """When a beat entry runs next, to the nearest second.

    Celery's `remaining_estimate(last)` is measured from the moment it reads the clock, not
    from `last`, so the next run is that moment plus the estimate (adding it to `last` put a
    00:05 entry at 00:04:59 once beat had run it).
    """
    before = now()
    remaining = schedule.remaining_estimate(last or before)
    after = now()
    # The estimate read the clock between `before` and `after`: take the middle.
    at = before + (after - before) / 2 + max(remaining, dt.timedelta(0))
    return (at + dt.timedelta(milliseconds=500)).replace(microsecond=0)


def last_run(name: str) -> Any:
    """When RedBeat last ran the entry, if it keeps the schedule and has run it."""
    from app import celery

    if celery.conf.get("beat_scheduler") != "redbeat.RedBeatScheduler":
        return None
    from redbeat import RedBeatSchedulerEntry
    from redbeat.schedulers import ensure_conf

    ensure_conf(celery)
    try:
        entry = RedBeatSchedulerEntry.from_key(
            RedBeatSchedulerEntry.generate_key(celery, name), app=celery
        )
    except KeyError:
        return None
    return entry.last_run_at if entry.total_run_count else None
