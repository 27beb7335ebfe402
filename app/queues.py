"""What the broker holds: how many jobs wait in each queue and how long the oldest has waited."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from app.celery_app import celery_app
from app.delivery import records, scheduled
from app.settings import QUEUES, get_settings

#: The message header the job layer stamps with the enqueue time (app.jobs.base).
ENQUEUED_AT_HEADER = "job_enqueued_at"
#: When the job was first enqueued (a retry keeps it; `job_enqueued_at` is each message's own).
FIRST_ENQUEUED_HEADER = "job_first_enqueued_at"


@dataclass(frozen=True)
class QueueDepth:
    """One queue's backlog."""

    queue: str
    depth: int
    oldest_age: float | None  # seconds; None when empty or unknown (no header, RabbitMQ)


@dataclass(frozen=True)
class QueueState:
    """What an operator sees of one queue: backlog, pause, and whether any worker takes it."""

    queue: str
    depth: int
    oldest_age: float | None
    paused: bool
    consumers: int | None  # live workers taking from it; None where it cannot be known

    @property
    def stranded(self) -> bool:
        """Jobs wait here and no live worker takes this queue."""
        return self.depth > 0 and self.consumers == 0


def queue_states() -> list[QueueState]:
    """Every queue holding jobs or served by the service, with its pause and consumer count.

    On Redis that is the service's queues, Celery's default `celery` queue, and any other list
    a producer pushed to (found with SCAN); consumers come from the workers' heartbeats.
    """
    with celery_app.connection_for_read() as connection:
        channel = connection.default_channel
        if getattr(channel, "client", None) is None or not hasattr(channel, "keys"):
            return [QueueState(d.queue, d.depth, d.oldest_age, False, None) for d in queue_depths()]
        client = channel.plain_client
        prefix = channel.keys.prefix
        found = dict.fromkeys([*QUEUES, "celery"])
        for key in client.scan_iter(match=f"{prefix}*", _type="list", count=1000):
            name = bytes(key).decode(errors="replace").removeprefix(prefix)
            name = name.split(channel.sep, 1)[0]  # a priority list belongs to its queue
            if not (name.startswith(records.NAMESPACE) or "pidbox" in name):
                found[name] = None
        lapse = get_settings().heartbeat_timeout
        live = [w for w in records.workers(client, prefix) if w.last_beat < lapse]
        paused = records.paused(client, prefix)
        depths = {d.queue: d for d in queue_depths(tuple(found))}
        return [
            QueueState(
                queue=name,
                depth=depths[name].depth,
                oldest_age=depths[name].oldest_age,
                paused=name in paused,
                consumers=sum(1 for w in live if name in w.queues),
            )
            for name in found
            if name in QUEUES or name == "celery" or depths[name].depth
        ]


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


def scheduled_stats() -> scheduled.Stats | None:
    """The scheduled set's size and most overdue entry; None where the broker has no set."""
    with celery_app.connection_for_read() as connection:
        channel = connection.default_channel
        if not hasattr(channel, "plain_client") or not hasattr(channel, "keys"):
            return None
        return scheduled.stats(channel.plain_client, channel.keys.prefix)


def _enqueued_at(raw: Any) -> float | None:
    if raw is None:
        return None
    try:
        headers = json.loads(raw).get("headers") or {}
        value = headers.get(ENQUEUED_AT_HEADER)
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None
