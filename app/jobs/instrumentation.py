"""What every job reports: start and finish log lines, and StatsD timings and counters.

This is the seed's `around_perform` MonitoredJob for every job. Metric names (prefixed with
STATSD_PREFIX): `jobs.<name>.duration` and `jobs.<name>.queue_wait` (timings, ms), and
`jobs.<name>.success|failure|retry|discard` (counters), where <name> is the job's name
without its `jobs.` prefix.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from statsd import StatsClient

from app.delivery import throughput
from app.settings import get_settings

logger = logging.getLogger("app.jobs")

OUTCOMES = ("success", "failure", "retry", "discard")


@dataclass
class Execution:
    """One execution of a job, as the hooks and log lines see it."""

    job_name: str
    task_id: str
    queue: str
    attempt: int
    arguments: dict[str, Any]  # redacted
    enqueued_at: float | None
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    outcome: str | None = None
    error: BaseException | None = None

    @property
    def metric_name(self) -> str:
        """The job's name as metrics carry it: `jobs.process_order` -> `process_order`."""
        return self.job_name.removeprefix("jobs.")

    @property
    def duration(self) -> float:
        """Seconds since the execution started."""
        return time.monotonic() - self.started_monotonic

    @property
    def queue_wait(self) -> float | None:
        """Seconds between enqueueing (or the scheduled time) and the start, if known."""
        if self.enqueued_at is None:
            return None
        return max(0.0, self.started_at - self.enqueued_at)

    def fields(self) -> dict[str, Any]:
        """The structured fields of this execution's log lines."""
        return {
            "job": self.job_name,
            "task_id": self.task_id,
            "queue": self.queue,
            "attempt": self.attempt,
        }


#: A further around-perform hook: a context manager wrapped around each execution.
AroundPerform = Callable[[Execution], AbstractContextManager[None]]

_client: StatsClient | None = None


def metrics() -> StatsClient:
    """This process's StatsD client (UDP; one per process, so forks don't share it)."""
    global _client
    client = _client
    if client is None:
        settings = get_settings()
        client = _client = StatsClient(
            settings.statsd_host, settings.statsd_port, prefix=settings.statsd_prefix
        )
    return client


def _forget_client() -> None:
    global _client
    _client = None


os.register_at_fork(after_in_child=_forget_client)


def started(execution: Execution) -> None:
    """Log the start and time how long the job waited in its queue."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "job started %s[%s] queue=%s attempt=%d args=%s",
            execution.job_name,
            execution.task_id,
            execution.queue,
            execution.attempt,
            execution.arguments,
            extra={**execution.fields(), "event": "start"},
        )
    wait = execution.queue_wait
    if wait is not None:
        metrics().timing(f"jobs.{execution.metric_name}.queue_wait", wait * 1000)


def finished(execution: Execution, outcome: str, error: BaseException | None = None) -> None:
    """Log the finish with its duration and outcome; count the outcome and time the run."""
    execution.outcome, execution.error = outcome, error
    duration = execution.duration
    # A failure is a WARNING here: the job then goes to the dead-letter store, whose line is
    # the one ERROR line (or, run inline, the caller gets the exception).
    level = logging.INFO if outcome == "success" else logging.WARNING
    if logger.isEnabledFor(level):  # (its fields cost more than the check)
        _log_finished(execution, level, outcome, duration, error)
    client = metrics()
    client.timing(f"jobs.{execution.metric_name}.duration", duration * 1000)
    client.incr(f"jobs.{execution.metric_name}.{outcome}")
    throughput.record(outcome)


def _log_finished(
    execution: Execution, level: int, outcome: str, duration: float, error: BaseException | None
) -> None:
    logger.log(
        level,
        "job finished %s[%s] queue=%s attempt=%d outcome=%s duration=%.3fs%s",
        execution.job_name,
        execution.task_id,
        execution.queue,
        execution.attempt,
        outcome,
        duration,
        f" error={type(error).__name__}: {error}" if error is not None else "",
        extra={
            **execution.fields(),
            "event": "finish",
            "outcome": outcome,
            "duration": round(duration, 6),
        },
    )
