"""`jobs-service`: the operator's command line (dead letters; more chores as they come).

Output is a readable table by default and JSON with `--json`. Arguments holding personal or
payment data are redacted in every listing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from app.settings import ConfigError, load_settings


def _fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(2)


@click.group()
def main() -> None:
    """Operate the jobs service."""
    try:
        load_settings()
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")


@main.group("dead-letters")
def dead_letters_group() -> None:
    """Jobs that failed for good: list, show, retry, discard."""


def _redacted(entry: Any) -> Any:
    from app import celery
    from app.jobs.arguments import SENSITIVE_NAMES, redact, redacted_arguments

    job = celery.tasks.get(entry.job_name)
    if job is not None and hasattr(job, "sensitive_names"):
        return redacted_arguments(job.run, entry.args, entry.kwargs, job.sensitive_names)
    return {
        "args": redact(list(entry.args), SENSITIVE_NAMES),
        "kwargs": redact(dict(entry.kwargs), SENSITIVE_NAMES),
    }


def _as_dict(entry: Any, *, full: bool) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "id": entry.id,
        "failed_at": entry.failed_at.isoformat(),
        "job": entry.job_name,
        "queue": entry.queue,
        "reason": entry.reason,
        "attempts": entry.attempts,
        "error": f"{entry.error_type.rsplit('.', 1)[-1]}: {entry.error_message}",
        "arguments": _redacted(entry),
    }
    if full:
        shown.update(
            task_id=entry.task_id,
            error_type=entry.error_type,
            enqueued_at=entry.enqueued_at.isoformat() if entry.enqueued_at else None,
            headers=entry.headers,
            traceback=entry.traceback,
        )
    return shown


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
@click.option("--limit", default=20, show_default=True, help="How many, newest first.")
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
@click.argument("entry_id", type=int)
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
@click.argument("entry_ids", type=int, nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every entry.")
def retry_command(entry_ids: tuple[int, ...], everything: bool) -> None:
    """Enqueue the jobs again (fresh attempt counts) and remove them from the store."""
    from app import celery
    from app.db import session_scope
    from app.services import dead_letters

    for entry_id in _selected(entry_ids, everything):
        with session_scope() as session:
            try:
                entry = dead_letters.get(session, entry_id)
            except dead_letters.DeadLetterNotFound as exc:
                _fail(str(exc))
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
        click.echo(f"retried #{entry_id} {entry.job_name} as task {result.id}")


@dead_letters_group.command("discard")
@click.argument("entry_ids", type=int, nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every entry.")
def discard_command(entry_ids: tuple[int, ...], everything: bool) -> None:
    """Remove entries from the store for good."""
    from app.db import session_scope
    from app.services import dead_letters

    for entry_id in _selected(entry_ids, everything):
        with session_scope() as session:
            try:
                entry = dead_letters.remove(session, entry_id)
            except dead_letters.DeadLetterNotFound as exc:
                _fail(str(exc))
        click.echo(f"discarded #{entry_id} {entry.job_name}")


if __name__ == "__main__":
    main()
