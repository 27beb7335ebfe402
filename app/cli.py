"""`jobs-service`: the operator's command line.

    jobs-service enqueue JOB [ARGS_JSON] [--kwargs JSON] [--queue Q] [--count N]
    jobs-service import CSV_PATH             import products, showing progress
    jobs-service queues                      depth, oldest age, paused, consumers per queue
    jobs-service queues pause|resume QUEUE   stop or restart taking jobs from QUEUE
    jobs-service schedule                    the beat schedule with next run times
    jobs-service health                      exits 1 when no worker answers or jobs are stranded
    jobs-service dead-letters list|show|retry|discard
    jobs-service outbox                      jobs committed but not yet published
    jobs-service scheduled list|show|run-now|delete   jobs waiting in Redis for their time
    jobs-service retries list                         jobs waiting to be tried again
    jobs-service flow                        unique keys, concurrency slots, rate windows
    jobs-service batches list|show           batches of jobs: progress and callbacks
    jobs-service web                         the operator's web view (WEB_PASSWORD required)

Output is a readable table by default and JSON with `--json`. Arguments holding personal or
payment data are redacted in every listing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from app.settings import ConfigError, load_settings


def _fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(2)


class _OneLineErrors(click.Group):
    """Every error the operator can act on is one line on stderr and exit status 2.

    Click's usage errors (a missing argument, a bad option value) lose their usage banner;
    an unreachable database or broker, or a value the database refuses, is one line too.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        from kombu.exceptions import OperationalError as BrokerUnavailable
        from redis import RedisError
        from sqlalchemy.exc import DBAPIError

        try:
            outcome = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.Abort:
            _fail("aborted")
        except click.exceptions.NoArgsIsHelpError as exc:
            names = ", ".join(getattr(exc.ctx.command, "commands", {}))
            _fail(f"{exc.ctx.command_path}: name a command: {names} (--help shows more)")
        except click.ClickException as exc:
            where = (
                f"{exc.ctx.command_path}: " if isinstance(exc, click.UsageError) and exc.ctx else ""
            )
            _fail(f"{where}{exc.format_message()}")
        except (BrokerUnavailable, RedisError) as exc:
            _fail(f"cannot reach the broker: {type(exc).__name__}: {exc}")
        except DBAPIError as exc:
            first_line = (str(exc.orig).strip().splitlines() or [""])[0]
            _fail(f"database error: {type(exc.orig).__name__}: {first_line}")
        sys.exit(outcome if isinstance(outcome, int) else 0)


def _seconds(text: str) -> float:
    """A click type: a finite number of seconds, zero or more."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"expected a number of seconds, 0 or more, got {text!r}")
    return value


#: Ids of rows (dead letters): PostgreSQL's bigint.
ROW_ID = click.IntRange(1, 2**63 - 1)


@click.group(cls=_OneLineErrors)
def main() -> None:
    """Operate the jobs service."""
    try:
        load_settings()
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")


def _json_argument(name: str, raw: str | None, kind: type) -> Any:
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        _fail(f"{name}: expected JSON, got {raw!r} ({exc.msg})")
    if not isinstance(value, kind):
        _fail(f"{name}: expected a JSON {'array' if kind is list else 'object'}, got {raw!r}")
    return value


@main.command("enqueue")
@click.argument("job_name")
@click.argument("args", required=False)
@click.option("--kwargs", "kwargs_json", default=None, help='Keyword arguments, JSON: {"a": 1}.')
@click.option("--queue", default=None, help="Override the job's queue.")
@click.option(
    "--count",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Enqueue it this many times.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def enqueue_command(
    job_name: str,
    args: str | None,
    kwargs_json: str | None,
    queue: str | None,
    count: int,
    as_json: bool,
) -> None:
    """Enqueue JOB_NAME (e.g. jobs.process_order) with ARGS, a JSON array such as '[42]'."""
    from app import celery
    from app.jobs.base import Job, perform_all_later
    from app.jobs.errors import DeserializationError

    arguments = _json_argument("ARGS", args, list)
    keywords = _json_argument("--kwargs", kwargs_json, dict)
    job = celery.tasks.get(job_name)
    if not isinstance(job, Job):
        known = ", ".join(sorted(n for n, t in celery.tasks.items() if isinstance(t, Job)))
        _fail(f"unknown job {job_name!r}; known jobs: {known}")
    from app.settings import QUEUES

    if queue is not None and queue not in QUEUES:
        _fail(f"unknown queue {queue!r}: expected one of {', '.join(QUEUES)}")
    options = {"queue": queue} if queue else {}
    try:
        if count == 1:
            ids = [job.apply_async(arguments, keywords, **options).id]
        else:
            with click.progressbar(
                length=count, label=f"enqueueing {job_name}", file=sys.stderr
            ) as bar:
                ids = []
                for start in range(0, count, 1000):
                    batch = min(1000, count - start)
                    signatures = [job.signature(arguments, keywords, **options)] * batch
                    ids += perform_all_later(signatures).ids
                    bar.update(batch)
    except (DeserializationError, ValueError) as exc:
        _fail(f"{job_name}: {exc}")
    if as_json:
        click.echo(json.dumps({"job": job_name, "task_ids": ids}))
    else:
        click.echo(f"enqueued {job_name} x{len(ids)}: {ids[0]}" + (" ..." if len(ids) > 1 else ""))


@main.command("import")
@click.argument("csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait for the import to finish, showing progress.",
)
@click.option(
    "--timeout", default=3600.0, show_default=True, type=_seconds, help="Seconds to wait at most."
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def import_command(csv_path: Path, wait: bool, timeout: float, as_json: bool) -> None:
    """Import products from CSV_PATH (sku, name, price, inventory) with jobs.import_data."""
    import time

    from app.db import session_scope
    from app.jobs import import_data
    from app.models import Import

    with session_scope() as session:
        record = Import(source=str(csv_path.resolve()))
        session.add(record)
        session.flush()
        import_id = record.id
        import_data.delay(import_id)  # published once the import row is committed
    if not wait:
        click.echo(
            json.dumps({"import_id": import_id}) if as_json else f"import {import_id} enqueued"
        )
        return
    started = time.monotonic()
    spinner = "|/-\\"
    while True:
        with session_scope() as session:
            current = session.get(Import, import_id)
            assert current is not None
            status = current.status
            errors: list[dict[str, Any]] = list(current.errors[:20])
            summary = {
                "import_id": import_id,
                "status": status,
                "rows_seen": current.rows_seen,
                "rows_imported": current.rows_imported,
                "rows_rejected": current.rows_rejected,
                "errors": errors,
            }
        elapsed = time.monotonic() - started
        if status in ("completed", "failed") or elapsed > timeout:
            break
        if not as_json:
            mark = spinner[int(elapsed * 4) % 4]
            click.echo(
                f"\r{mark} import {import_id}: {status} ({elapsed:.0f} s)", nl=False, err=True
            )
        time.sleep(0.25)
    if not as_json:
        click.echo("", err=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"import {import_id}: {status}; {summary['rows_seen']} rows, "
            f"{summary['rows_imported']} imported, {summary['rows_rejected']} rejected"
        )
        for error in errors:
            click.echo(f"  line {error.get('line')}: {error.get('error')}")
    sys.exit(0 if status == "completed" else 1)


@main.group("queues", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.pass_context
def queues_group(context: click.Context, as_json: bool) -> None:
    """Each queue: jobs waiting, the oldest's age, paused or not, live workers taking it.

    A queue holding jobs that no live worker takes is flagged "stranded", with a warning
    (`jobs-service health` then exits 1).
    """
    if context.invoked_subcommand is not None:
        return
    from app.queues import queue_states

    states = _broker_call(queue_states)
    rows = [
        {
            "queue": state.queue,
            "depth": state.depth,
            "oldest_age_seconds": None if state.oldest_age is None else round(state.oldest_age, 1),
            "paused": state.paused,
            "consumers": state.consumers,
            "stranded": state.stranded,
        }
        for state in states
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(
            _table(
                rows, ["queue", "depth", "oldest_age_seconds", "paused", "consumers", "stranded"]
            )
        )
        for state in states:
            if state.stranded:
                click.echo(
                    f"warning: {state.depth} job(s) wait in {state.queue!r} and no live worker "
                    "takes that queue",
                    err=True,
                )


@queues_group.command("pause")
@click.argument("queue")
def pause_command(queue: str) -> None:
    """Stop every worker taking jobs from QUEUE (running jobs finish; nothing is lost)."""
    from app.delivery import records

    changed = _broker_call(lambda: records.pause(*_paused_store(queue)))
    click.echo(f"{queue}: paused" + ("" if changed else " (it already was)"))


@queues_group.command("resume")
@click.argument("queue")
def resume_command(queue: str) -> None:
    """Let workers take jobs from QUEUE again."""
    from app.delivery import records

    changed = _broker_call(lambda: records.resume(*_paused_store(queue)))
    click.echo(f"{queue}: resumed" + ("" if changed else " (it was not paused)"))


def _paused_store(queue: str) -> tuple[Any, str, str]:
    """The Redis client, queue name and key prefix for pausing; exit 2 on a bad name."""
    from app.settings import QUEUES

    known = (*QUEUES, "celery")
    if queue not in known:
        _fail(f"unknown queue {queue!r}: expected one of {', '.join(known)}")
    client, prefix = _broker_redis()
    return client, queue, prefix


def _broker_redis() -> tuple[Any, str]:
    """A redis-py client on the broker, and the key prefix; exit 2 when it is not Redis."""
    from app.operations import NotRedis, broker_redis

    try:
        return broker_redis()
    except NotRedis as exc:
        _fail(str(exc))


def _broker_call(call: Any) -> Any:
    """`call()`, with a one-line error and exit 2 when the broker cannot be reached."""
    try:
        return call()
    except SystemExit:
        raise
    except Exception as exc:
        from kombu.exceptions import OperationalError
        from redis import RedisError

        if isinstance(exc, RedisError | OperationalError | OSError):
            _fail(f"cannot reach the broker: {type(exc).__name__}: {exc}")
        raise


@main.command("schedule")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def schedule_command(as_json: bool) -> None:
    """The beat schedule: each entry, its task, when it last ran and when it runs next."""
    from app.operations import schedule_rows

    rows = schedule_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(_table(rows, ["entry", "task", "schedule", "last_run", "next_run"]))


@main.command("health")
@click.option(
    "--timeout", default=2.0, show_default=True, type=_seconds, help="Seconds to wait for replies."
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def health_command(timeout: float, as_json: bool) -> None:
    """Ping the workers; exit 1 when none answers (for a liveness check)."""
    from app import celery

    error: str | None = None
    try:
        replies = celery.control.ping(timeout=timeout) or []
    except Exception as exc:  # the broker itself is unreachable
        replies, error = [], f"{type(exc).__name__}: {exc}"
    workers = sorted(name for reply in replies for name in reply)
    stranded: list[dict[str, Any]] = []
    if error is None:
        from app.queues import queue_states

        try:
            stranded = [{"queue": s.queue, "depth": s.depth} for s in queue_states() if s.stranded]
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    healthy = bool(workers) and not stranded
    if as_json:
        click.echo(
            json.dumps(
                {"healthy": healthy, "workers": workers, "stranded": stranded, "error": error}
            )
        )
    elif healthy:
        click.echo(f"ok: {len(workers)} worker(s) answered: {', '.join(workers)}")
    else:
        if not workers:
            click.echo("unhealthy: no worker answered" + (f" ({error})" if error else ""), err=True)
        for queue in stranded:
            click.echo(
                f"unhealthy: {queue['depth']} job(s) wait in {queue['queue']!r} and no live "
                "worker takes that queue",
                err=True,
            )
    sys.exit(0 if healthy else 1)


@main.group("dead-letters")
def dead_letters_group() -> None:
    """Jobs that failed for good: list, show, retry, discard."""


def _as_dict(entry: Any, *, full: bool) -> dict[str, Any]:
    from app.operations import dead_letter_dict

    return dead_letter_dict(entry, full=full)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any, width: int = 60) -> str:
    text = "" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@dead_letters_group.command("list")
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1), help="How many, newest first."
)
@click.option("--job", "job_name", default=None, help="Only this job, e.g. jobs.send_email.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def list_command(limit: int, job_name: str | None, as_json: bool) -> None:
    """List dead letters, newest first."""
    from app.db import session_scope
    from app.services import dead_letters

    with session_scope() as session:
        rows = [
            _as_dict(e, full=False)
            for e in dead_letters.entries(session, limit=limit, job_name=job_name)
        ]
        total = dead_letters.count(session)
    if as_json:
        click.echo(json.dumps({"total": total, "entries": rows}, indent=2))
        return
    if not rows:
        click.echo("no dead letters")
        return
    columns = ["id", "failed_at", "job", "queue", "reason", "attempts", "error", "arguments"]
    click.echo(_table(rows, columns))
    click.echo(f"({len(rows)} of {total} shown)")


@dead_letters_group.command("show")
@click.argument("entry_id", type=ROW_ID)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def show_command(entry_id: int, as_json: bool) -> None:
    """Show one dead letter with its traceback."""
    from app.db import session_scope
    from app.services import dead_letters

    with session_scope() as session:
        try:
            shown = _as_dict(dead_letters.get(session, entry_id), full=True)
        except dead_letters.DeadLetterNotFound as exc:
            _fail(str(exc))
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    traceback = shown.pop("traceback") or ""
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        click.echo(f"{key.ljust(width)}  {_cell(value, 2000)}")
    click.echo(f"\n{traceback}".rstrip())


def _selected(entry_ids: Sequence[int], everything: bool) -> list[int]:
    from app.db import session_scope
    from app.services import dead_letters

    if everything == bool(entry_ids):
        _fail("name entry ids, or --all")
    if not everything:
        return list(entry_ids)
    with session_scope() as session:
        return [e.id for e in dead_letters.entries(session, limit=dead_letters.MAX_ENTRIES)]


@dead_letters_group.command("retry")
@click.argument("entry_ids", type=ROW_ID, nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every entry.")
def retry_command(entry_ids: tuple[int, ...], everything: bool) -> None:
    """Enqueue the jobs again (fresh attempt counts) and remove them from the store."""
    from app.operations import retry_dead_letter
    from app.services import dead_letters

    for entry_id in _selected(entry_ids, everything):
        try:
            entry, task_id = retry_dead_letter(entry_id)
        except dead_letters.DeadLetterNotFound as exc:
            _fail(str(exc))
        click.echo(f"retried #{entry_id} {entry.job_name} as task {task_id}")


@dead_letters_group.command("discard")
@click.argument("entry_ids", type=ROW_ID, nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every entry.")
def discard_command(entry_ids: tuple[int, ...], everything: bool) -> None:
    """Remove entries from the store for good."""
    from app.operations import discard_dead_letter
    from app.services import dead_letters

    for entry_id in _selected(entry_ids, everything):
        try:
            entry = discard_dead_letter(entry_id)
        except dead_letters.DeadLetterNotFound as exc:
            _fail(str(exc))
        click.echo(f"discarded #{entry_id} {entry.job_name}")


@main.command("outbox")
@click.option("--limit", default=10, show_default=True, help="How many of the oldest rows.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def outbox_command(limit: int, as_json: bool) -> None:
    """Jobs committed but not yet published: how many, the oldest's age, the oldest rows."""
    from app.delivery import outbox

    if limit < 0:
        _fail(f"--limit must be 0 or more, got {limit}")
    waiting = outbox.pending()
    rows = [
        {"id": i, "task_id": t, "job": j, "age_seconds": round(a, 3)}
        for i, t, j, a in outbox.oldest(limit)
    ]
    age = round(waiting.oldest_age, 3) if waiting.oldest_age is not None else None
    if as_json:
        click.echo(json.dumps({"pending": waiting.rows, "oldest_age_seconds": age, "oldest": rows}))
        return
    if not waiting.rows:
        click.echo("outbox: empty (every committed job has been published)")
        return
    click.echo(f"outbox: {waiting.rows} job(s) waiting to be published, the oldest for {age} s")
    click.echo(_table(rows, ["id", "task_id", "job", "age_seconds"]))


@main.command("flow")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def flow_command(as_json: bool) -> None:
    """Flow control now: unique keys held, concurrency slots and who holds them, jobs waiting
    for a slot, rate windows and the jobs they deferred."""
    import time

    from app.delivery import flow

    client, prefix = _broker_redis()
    state = _broker_call(lambda: flow.holdings(client, prefix))
    now = time.time()
    unique = [
        {"key": u.key, "task_id": u.task_id, "ttl_seconds": round(u.ttl, 3)} for u in state.unique
    ]
    limits = [
        {
            "key": limit.key,
            "to": limit.to,
            "duration_seconds": limit.duration,
            "holders": [
                {
                    "worker": worker or None,
                    "task_id": task,
                    "expires_in_seconds": round(expiry - now, 3),
                }
                for worker, task, expiry in limit.holders
            ],
            "waiting": limit.waiting,
        }
        for limit in state.limits
    ]
    rates = [{"key": r.key, "in_window": r.recent, "deferred": r.deferred} for r in state.rates]
    if as_json:
        click.echo(json.dumps({"unique": unique, "limits": limits, "rates": rates}))
        return
    click.echo(f"unique keys held: {len(unique)}")
    if unique:
        click.echo(_table(unique, ["key", "task_id", "ttl_seconds"]))
    click.echo(f"concurrency limits in use: {len(limits)}")
    if limits:
        rows = [
            {
                "key": limit["key"],
                "held": f"{len(limit['holders'])}/{limit['to']}",
                "waiting": limit["waiting"],
                "holders": " ".join(h["task_id"] for h in limit["holders"]),
            }
            for limit in limits
        ]
        click.echo(_table(rows, ["key", "held", "waiting", "holders"]))
    click.echo(f"rate limits in use: {len(rates)}")
    if rates:
        click.echo(_table(rates, ["key", "in_window", "deferred"]))


@main.group("batches")
def batches_group() -> None:
    """Batches of jobs with callbacks: progress and callbacks."""


def _batch_dict(progress: Any) -> dict[str, Any]:
    from app.operations import batch_dict

    return batch_dict(progress)


@batches_group.command("list")
@click.option("--limit", default=20, show_default=True, help="How many of the newest.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def batches_list(limit: int, as_json: bool) -> None:
    """The newest batches with their progress."""
    from app.jobs import batches

    if limit < 0:
        _fail(f"--limit must be 0 or more, got {limit}")
    rows = [_batch_dict(p) for p in batches.recent(limit)]
    if as_json:
        click.echo(json.dumps({"batches": rows}))
        return
    if not rows:
        click.echo("no batches")
        return
    for row in rows:
        row["state"] = (
            "succeeded" if row["succeeded_at"] else "complete" if row["completed_at"] else "running"
        )
    click.echo(
        _table(
            rows, ["id", "parent_id", "description", "total", "pending", "failed", "dead", "state"]
        )
    )


@batches_group.command("show")
@click.argument("batch_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def batches_show(batch_id: int, as_json: bool) -> None:
    """One batch: its counts, and when each callback was enqueued."""
    from app.jobs import batches

    try:
        progress = batches.progress(batch_id)
    except batches.BatchError as exc:
        _fail(str(exc))
    row = _batch_dict(progress)
    if as_json:
        click.echo(json.dumps(row))
        return
    for name, value in row.items():
        click.echo(f"{name}: {value}")


@main.group("scheduled")
def scheduled_group() -> None:
    """Jobs waiting in Redis for their time (countdown, eta, retries): list, show, run-now,
    delete."""


@main.group("retries")
def retries_group() -> None:
    """Jobs waiting in Redis to be tried again."""


def _scheduled_dict(entry: Any, *, full: bool) -> dict[str, Any]:
    from app.operations import scheduled_dict

    return scheduled_dict(entry, full=full)


def _list_scheduled(job_name: str | None, limit: int, as_json: bool, retries_only: bool) -> None:
    from app.delivery import scheduled

    client, prefix = _broker_redis()

    def read() -> tuple[list[dict[str, Any]], Any]:
        found = scheduled.entries(
            client, prefix, job_name=job_name, retries_only=retries_only, limit=limit
        )
        return [_scheduled_dict(e, full=False) for e in found], scheduled.stats(client, prefix)

    rows, stats = _broker_call(read)
    what = "retries" if retries_only else "scheduled jobs"
    if as_json:
        click.echo(
            json.dumps(
                {
                    "total": stats.size,
                    "oldest_overdue_seconds": round(stats.oldest_overdue, 3),
                    "entries": rows,
                },
                indent=2,
            )
        )
        return
    if not rows:
        click.echo(f"no {what} waiting")
        return
    columns = ["task_id", "due", "job", "queue", "attempt"]
    columns += ["error", "arguments"] if retries_only else ["arguments"]
    click.echo(_table(rows, columns))
    click.echo(f"({len(rows)} shown; {stats.size} waiting in all, retries and scheduled jobs)")


@scheduled_group.command("list")
@click.option("--limit", default=50, show_default=True, help="How many, soonest first.")
@click.option("--job", "job_name", default=None, help="Only this job, e.g. jobs.send_email.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def scheduled_list_command(limit: int, job_name: str | None, as_json: bool) -> None:
    """List the jobs waiting for their time, soonest first."""
    if limit < 1:
        _fail(f"--limit must be at least 1, got {limit}")
    _list_scheduled(job_name, limit, as_json, retries_only=False)


@retries_group.command("list")
@click.option("--limit", default=50, show_default=True, help="How many, soonest first.")
@click.option("--job", "job_name", default=None, help="Only this job, e.g. jobs.send_email.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def retries_list_command(limit: int, job_name: str | None, as_json: bool) -> None:
    """List the jobs waiting to be tried again, with their last error and next attempt."""
    if limit < 1:
        _fail(f"--limit must be at least 1, got {limit}")
    _list_scheduled(job_name, limit, as_json, retries_only=True)


@scheduled_group.command("show")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def scheduled_show_command(task_id: str, as_json: bool) -> None:
    """Show one waiting job."""
    from app.delivery import scheduled

    client, prefix = _broker_redis()
    try:
        entry = _broker_call(lambda: scheduled.get(client, task_id, prefix))
    except scheduled.EntryNotFound as exc:
        _fail(str(exc))
    shown = _scheduled_dict(entry, full=True)
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        click.echo(f"{key.ljust(width)}  {_cell(value, 2000)}")


def _scheduled_ids(
    task_ids: tuple[str, ...], everything: bool, job_name: str | None
) -> tuple[Any, str, list[str]]:
    """The client, prefix and task ids a bulk action applies to: those named, or with `--all`
    every waiting job (of `--job` only, if given)."""
    from app.delivery import scheduled

    if everything == bool(task_ids):
        _fail("name task ids, or --all (with --job to take one job's only)")
    if job_name is not None and not everything:
        _fail("--job selects with --all; with task ids, name only the ids")
    client, prefix = _broker_redis()
    if not everything:
        return client, prefix, list(task_ids)
    found = _broker_call(lambda: list(scheduled.entries(client, prefix, job_name=job_name)))
    return client, prefix, list(dict.fromkeys(e.task_id or e.member for e in found))


def _act_on_scheduled(
    task_ids: tuple[str, ...],
    everything: bool,
    job_name: str | None,
    action: Callable[[Any, str, str], int],
    done: str,
) -> None:
    """Apply `action(client, task_id, prefix)` to each selected waiting job; exit 2 on one that
    does not wait."""
    client, prefix, selected = _scheduled_ids(task_ids, everything, job_name)
    for task_id in selected:
        if not _broker_call(lambda t=task_id: action(client, t, prefix)):
            _fail(f"no scheduled job with task id {task_id!r}")
        click.echo(f"{task_id}: {done}")


@scheduled_group.command("run-now")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every waiting job.")
@click.option("--job", "job_name", default=None, help="With --all: only this job.")
def scheduled_run_now_command(
    task_ids: tuple[str, ...], everything: bool, job_name: str | None
) -> None:
    """Make waiting jobs due now: the next poll (within a second) enqueues them."""
    from app.delivery import scheduled

    _act_on_scheduled(task_ids, everything, job_name, scheduled.run_now, "due now")


@scheduled_group.command("delete")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every waiting job.")
@click.option("--job", "job_name", default=None, help="With --all: only this job.")
def scheduled_delete_command(
    task_ids: tuple[str, ...], everything: bool, job_name: str | None
) -> None:
    """Delete waiting jobs: they never run."""
    from app.delivery import scheduled

    _act_on_scheduled(task_ids, everything, job_name, scheduled.delete, "deleted")


@main.command("web")
def web_command() -> None:
    """Serve the operator's web view on WEB_HOST:WEB_PORT (127.0.0.1:5556), behind HTTP basic
    auth (WEB_USERNAME, default admin, and WEB_PASSWORD, which it refuses to start without)."""
    from app.web import serve, web_settings

    try:
        settings = web_settings()
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
    click.echo(
        f"web view on http://{settings.host}:{settings.port}/ (user {settings.username})", err=True
    )
    serve(settings)


if __name__ == "__main__":
    main()
