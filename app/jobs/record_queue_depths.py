"""jobs.record_queue_depths(): the queue-depth gauges beat refreshes every few seconds."""

from __future__ import annotations

from app.delivery import outbox
from app.jobs.base import job
from app.jobs.instrumentation import metrics
from app.queues import queue_depths, scheduled_stats


@job("jobs.record_queue_depths", queue_as="urgent", ignore_result=True)
def record_queue_depths() -> dict[str, int]:
    """Send `queues.<name>.depth` and `queues.<name>.oldest_age` (seconds) gauges to StatsD,
    and `scheduled.size` and `scheduled.oldest_overdue` (seconds the most overdue entry of the
    scheduled set is past its time; 0 when none is) where the broker is Redis, and
    `outbox.pending` and `outbox.oldest_age` (seconds; 0 when empty): jobs committed and not
    yet published."""
    client = metrics()
    depths = {}
    for depth in queue_depths():
        client.gauge(f"queues.{depth.queue}.depth", depth.depth)
        if depth.oldest_age is not None:
            client.gauge(f"queues.{depth.queue}.oldest_age", round(depth.oldest_age, 3))
        depths[depth.queue] = depth.depth
    committed = outbox.pending()
    client.gauge("outbox.pending", committed.rows)
    client.gauge("outbox.oldest_age", round(committed.oldest_age or 0.0, 3))
    waiting = scheduled_stats()
    if waiting is not None:
        client.gauge("scheduled.size", waiting.size)
        client.gauge("scheduled.oldest_overdue", round(waiting.oldest_overdue, 3))
    return depths
