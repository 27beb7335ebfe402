"""What the broker holds: how many jobs wait in each queue and how long the oldest has waited."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from app.celery_app import celery_app
from app.settings import QUEUES

#: The message header the job layer stamps with the enqueue time (app.jobs.base).
ENQUEUED_AT_HEADER = "job_enqueued_at"


@dataclass(frozen=True)
class QueueDepth:
    """One queue's backlog."""

    queue: str
    depth: int
    oldest_age: float | None  # seconds; None when empty or unknown (no header, RabbitMQ)


def queue_depths(queues: tuple[str, ...] = QUEUES) -> list[QueueDepth]:
    """Depth and oldest job's age of each queue, read from the broker."""
    with celery_app.connection_for_read() as connection:
        channel = connection.default_channel
        client = getattr(channel, "client", None)
        if client is None or not hasattr(channel, "_q_for_pri"):  # RabbitMQ
            return [
                QueueDepth(q, channel.queue_declare(queue=q, passive=True).message_count, None)
                for q in queues
            ]
        depths = []
        now = time.time()
        for queue in queues:
            # kombu keeps one Redis list per priority step; LPUSH adds at the head, so the
            # oldest message of a list is its last element.
            keys = dict.fromkeys(channel._q_for_pri(queue, p) for p in channel.priority_steps)
            depth = sum(int(client.llen(key)) for key in keys)
            enqueued = [t for key in keys if (t := _enqueued_at(client.lindex(key, -1)))]
            oldest = max(0.0, now - min(enqueued)) if enqueued else None
            depths.append(QueueDepth(queue, depth, oldest))
        return depths


def _enqueued_at(raw: Any) -> float | None:
    if raw is None:
        return None
    try:
        headers = json.loads(raw).get("headers") or {}
        value = headers.get(ENQUEUED_AT_HEADER)
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None
