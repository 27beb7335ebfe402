"""What every job reports: start and finish log lines, and StatsD timings and counters.

This is the seed's `around_perform` MonitoredJob for every job. Metric names (prefixed with
STATSD_PREFIX): `jobs.<name>.duration` and `jobs.<name>.queue_wait` (timings, ms), and
`jobs.<name>.success|failure|retry|discard` (counters), where <name> is the job's name
without its `jobs.` prefix.

A process's metrics leave in batches (`BufferedStatsClient`): a job records three, and a UDP
datagram each cost the threads pool about 4% of its no-op rate (bench peers, beside Dramatiq).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from celery import signals
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


class BufferedStatsClient(StatsClient):  # type: ignore[misc]
    """StatsD over UDP, its lines gathered into datagrams of up to `maxudpsize` bytes.

    A line is held until `batch` lines wait (then the thread that recorded the last sends
    them), or a daemon thread's next flush, every `interval` seconds; `flush()` sends what
    is held at once. Shopify's statsd-instrument batches the same way (STATSD_FLUSH_INTERVAL,
    one second by default). A process killed outright loses what it held, up to `interval`
    seconds of metrics: StatsD over UDP makes no promise of delivery in any case.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str | None,
        interval: float,
        maxudpsize: int = 1432,
        batch: int = 20,
    ) -> None:
        super().__init__(host, port, prefix=prefix, maxudpsize=maxudpsize)
        self.interval, self.batch = interval, batch
        self._lines: deque[str] = deque()  # (appends and pops are atomic: no lock)
        self._closed = threading.Event()
        threading.Thread(
            target=self._flush_every_interval, name="statsd-flush", daemon=True
        ).start()  # (a client is made on a process's first metric, and anew in a forked child)

    def _send(self, data: str) -> None:
        if not data.isascii():  # it would fail the whole datagram, in another job's thread
            logger.warning("StatsD line dropped, not ASCII: %r", data[:200])
            return
        self._lines.append(data)
        if len(self._lines) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Send every line held, packed into as few datagrams as fit."""
        lines, send = self._lines, super()._send  # (which drops socket errors)
        packet: list[str] = []
        size = 0
        while True:
            try:
                line = lines.popleft()
            except IndexError:
                break
            if packet and size + 1 + len(line) > self._maxudpsize:
                send("\n".join(packet))
                packet, size = [], 0
            packet.append(line)
            size += len(line) + 1
        if packet:
            send("\n".join(packet))

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()

    def _flush_every_interval(self) -> None:
        while not self._closed.wait(self.interval):
            self.flush()


_client: StatsClient | None = None


def metrics() -> StatsClient:
    """This process's StatsD client (UDP; one per process, so forks don't share it): batched
    every STATSD_FLUSH_INTERVAL seconds, or a datagram a metric when that is 0."""
    global _client
    client = _client
    if client is None:
        settings = get_settings()
        host, port, prefix = settings.statsd_host, settings.statsd_port, settings.statsd_prefix
        interval = settings.statsd_flush_interval
        client = _client = (
            BufferedStatsClient(host, port, prefix, interval)
            if interval > 0
            else StatsClient(host, port, prefix=prefix)
        )
    return client


def flush_metrics(**_: Any) -> None:
    """Send the metrics this process holds (`worker_shutdown`, `worker_process_shutdown`, and
    at exit)."""
    client = _client
    if isinstance(client, BufferedStatsClient):
        client.flush()


def _forget_client() -> None:
    global _client
    _client = None  # (the parent's flusher thread is not in the child: the child makes its own)


os.register_at_fork(after_in_child=_forget_client)
atexit.register(flush_metrics)
# (a pool child ends without running its atexit hooks)
signals.worker_process_shutdown.connect(flush_metrics, weak=False)
signals.worker_shutdown.connect(flush_metrics, weak=False)


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
