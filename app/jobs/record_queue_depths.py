"""jobs.record_queue_depths(): the queue-depth gauges beat refreshes every few seconds."""

from __future__ import annotations

from app.jobs.base import job
from app.jobs.instrumentation import metrics
from app.queues import queue_depths


@job("jobs.record_queue_depths", queue_as="urgent", ignore_result=True)
def record_queue_depths() -> dict[str, int]:
    """Send `queues.<name>.depth` and `queues.<name>.oldest_age` (seconds) gauges to StatsD."""
    client = metrics()
    depths = {}
    for depth in queue_depths():
        client.gauge(f"queues.{depth.queue}.depth", depth.depth)
        if depth.oldest_age is not None:
            client.gauge(f"queues.{depth.queue}.oldest_age", round(depth.oldest_age, 3))
        depths[depth.queue] = depth.depth
    return depths
