"""Log lines: readable text by default, one JSON object per line with LOG_FORMAT=json.

Every line written while a job runs carries the job's name and task id, and the correlation
id its caller passed in the `x-correlation-id` message header; jobs it enqueues carry the
same header, so one id follows a piece of work through every job it causes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from contextvars import ContextVar
from typing import Any

from celery import signals

from app.settings import get_settings

CORRELATION_HEADER = "x-correlation-id"
#: The correlation id of the job running in this process or thread, if its caller gave one.
current_correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)
_current_job: ContextVar[tuple[str, str] | None] = ContextVar("current_job", default=None)

#: Structured fields copied from a record into its JSON object when present.
FIELDS = (
    "job",
    "task_id",
    "queue",
    "attempt",
    "duration",
    "outcome",
    "event",
    "correlation_id",
    "dead_letter_id",
    "reason",
)


class JobContext(logging.Filter):
    """Adds the running job's name, task id and correlation id to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = _current_job.get()
        if job is not None:
            if not hasattr(record, "job"):
                record.job = job[0]
            if not hasattr(record, "task_id"):
                record.task_id = job[1]
        correlation = current_correlation_id.get()
        if correlation is not None and not hasattr(record, "correlation_id"):
            record.correlation_id = correlation
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the job fields present."""

    def format(self, record: logging.LogRecord) -> str:
        shown: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                shown[name] = value
        if record.exc_info:
            shown["exception"] = self.formatException(record.exc_info)
        return json.dumps(shown, default=str)


def configure(logger: logging.Logger) -> None:
    """Give the logger's handlers the job context, and JSON when LOG_FORMAT=json."""
    as_json = get_settings().log_format == "json"
    for handler in logger.handlers:
        if not any(isinstance(f, JobContext) for f in handler.filters):
            handler.addFilter(JobContext())
        if as_json:
            handler.setFormatter(JsonFormatter())


def _apply_log_level(logger: logging.Logger) -> None:
    """LOG_LEVEL (INFO by default) for `celery worker` / `beat`, unless `-l` was given.

    Celery's own default is WARNING, which hides the `job started` / `job finished` lines.
    """
    import click
    from click.core import ParameterSource

    context = click.get_current_context(silent=True)
    if context is None or "loglevel" not in context.params:
        return  # not Celery's command line (a worker started in code sets its own level)
    if context.get_parameter_source("loglevel") is ParameterSource.DEFAULT:
        logger.setLevel(get_settings().log_level)


@signals.after_setup_logger.connect
def _root_logger_set_up(logger: logging.Logger, **_: Any) -> None:
    _apply_log_level(logger)
    configure(logger)


@signals.after_setup_task_logger.connect
def _task_logger_set_up(logger: logging.Logger, **_: Any) -> None:
    _apply_log_level(logger)
    configure(logger)


def note_job(name: str, task_id: str, request: Any) -> None:
    """A job starts in this thread (`app.running`): its lines carry its name, task id and the
    correlation id its caller passed."""
    correlation = getattr(request, CORRELATION_HEADER, None) or (
        (getattr(request, "headers", None) or {}).get(CORRELATION_HEADER)
    )
    current_correlation_id.set(str(correlation) if correlation else None)
    _current_job.set((name, task_id))


def forget_job() -> None:
    """The job's outcome is logged (`app.running`): this thread's lines are no job's."""
    current_correlation_id.set(None)
    _current_job.set(None)
