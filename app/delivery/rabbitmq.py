"""RabbitMQ as the broker: quorum queues, their delivery limit, and their dead letters.

With `BROKER_URL=amqp://...` the service's queues are quorum queues (replicated, persisted,
counting each message's deliveries), bound to the topic exchange `jobs`:

- `x-delivery-limit`: a message returned to its queue more than POISON_AFTER times (its pool
  process or whole worker died holding it, or it was requeued) is dead-lettered instead of
  handed out again: RabbitMQ's own count stands in for the Redis transport's poison count.
- `x-dead-letter-exchange`: what a queue dead-letters (over the delivery limit, or rejected by
  a worker: an unknown job, a message Celery cannot read) goes to the fanout exchange
  `jobs.dead_letters` and its quorum queue, at least once (`x-dead-letter-strategy`).
- The topic exchange is what Celery's native delayed delivery needs: a job due later waits in
  RabbitMQ's `celery_delayed_*` queues (message TTLs, no plugin), never in a worker.

`DeadLetterConsumer`, a consumer step of every worker on RabbitMQ, moves each dead-lettered
message to the dead-letter store (PostgreSQL) and acknowledges it only after the commit, so a
worker that dies mid-way leaves it in the queue.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
import time
from typing import Any

from celery import bootsteps
from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer

from app.delivery.envelope import describe
from app.delivery.rejected import log_dead_lettered
from app.services import dead_letters

#: The exchange every service queue is bound to (topic: native delayed delivery needs it).
JOBS_EXCHANGE = "jobs"
#: Where the queues dead-letter, and the queue the workers drain into the dead-letter store.
DEAD_LETTER_EXCHANGE = "jobs.dead_letters"
DEAD_LETTER_QUEUE = "jobs.dead_letters"
#: Dead letters a worker takes at a time (each is committed before it is acknowledged).
DEAD_LETTER_PREFETCH = 10
#: The raw message kept in a dead-letter entry, at most (bytes).
RAW_LIMIT = 64 * 1024
#: How long a dead letter waits before it is tried again while the database refuses it.
DATABASE_RETRY_WAIT = 1.0

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")

logger = logging.getLogger(__name__)


def is_amqp(url: str | None) -> bool:
    """Whether `url` names a RabbitMQ broker."""
    return bool(url) and str(url).split("://", 1)[0] in AMQP_SCHEMES


def queue_arguments(delivery_limit: int) -> dict[str, Any]:
    """The arguments every service queue is declared with on RabbitMQ."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        # At-least-once dead-lettering (a message leaves its queue only once the dead-letter
        # queue has it) needs the queue to refuse publishes rather than drop when full.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def task_queues(names: tuple[str, ...], delivery_limit: int) -> list[Queue]:
    """The service's queues as RabbitMQ declares them."""
    exchange = Exchange(JOBS_EXCHANGE, type="topic", durable=True)
    return [
        Queue(name, exchange, routing_key=name, queue_arguments=queue_arguments(delivery_limit))
        for name in names
    ]


def whole_second_delay(countdown: Any, eta: Any, now: dt.datetime) -> tuple[Any, Any]:
    """`countdown` and `eta` as native delayed delivery can take them.

    Celery routes a delay through the delay queues by its whole seconds and raises on one
    under a second (kombu's `calculate_routing_key` refuses 0): such a delay becomes one
    second, late rather than early. A longer one is left alone: it arrives up to a second
    early and the worker holds it until its `eta`, as on Redis (`scheduled.SCHEDULE_AFTER`).
    """
    if eta is not None:
        if isinstance(eta, str):
            eta = dt.datetime.fromisoformat(eta)
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=dt.UTC)
        seconds = (eta - now).total_seconds()
    elif countdown is not None:
        seconds = float(countdown)
    else:
        return countdown, eta
    if 0 < seconds < 1:
        return 1, None
    return countdown, eta


#: The prefix native delayed delivery puts before a routing key: the delay's 28 binary digits.
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def undelayed_routing_key(routing_key: str) -> str:
    """The routing key a message was sent with, without the delay prefix it carries when it
    arrives through RabbitMQ's delay queues (`0.0.….1.default` -> `default`)."""
    return _DELAY_PREFIX.sub("", routing_key, count=1)


def dead_letter_queue() -> Queue:
    """The quorum queue that receives every service queue's dead letters."""
    return Queue(
        DEAD_LETTER_QUEUE,
        Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True),
        routing_key="",
        queue_arguments={"x-queue-type": "quorum"},
    )


def failure_of(message: Message) -> dead_letters.Failure:
    """The dead-letter entry for a message RabbitMQ dead-lettered."""
    headers = dict(message.headers or {})
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    # The Redis transport's envelope, so the store reads both brokers' messages the same way.
    envelope = {
        "body": base64.b64encode(body).decode(),
        "properties": {"body_encoding": "base64"},
        "headers": headers,
    }
    found = describe(json.dumps(envelope, default=str).encode())
    for key, name in (("task_id", "id"), ("job_name", "task")):  # (a body it could not read)
        if not found[key] and isinstance(headers.get(name), str):
            found[key] = headers[name]
    death = _first_death(headers)
    why = str(headers.get("x-first-death-reason") or death.get("reason") or "unknown")
    queue = str(headers.get("x-first-death-queue") or death.get("queue") or "") or None
    deliveries = headers.get("x-delivery-count")
    poison = why == "delivery_limit"
    if poison:
        error_message = (
            "returned to its queue more often than the queue's delivery limit (the process or "
            "worker holding it died, or it was requeued)"
        )
    elif why == "rejected":
        error_message = (
            f"rejected by the worker that received it: an unknown job, or a message it could "
            f"not read (content type {message.content_type!r})"
        )
    else:
        error_message = f"dead-lettered by RabbitMQ ({why})"
    text = body[:RAW_LIMIT].decode("utf-8", "backslashreplace")
    if len(body) > RAW_LIMIT:
        text += f"... ({len(body)} bytes in all)"
    return dead_letters.Failure(
        task_id=_storable(found["task_id"] or message.properties.get("correlation_id") or "")[:255]
        or "unknown",
        job_name=_storable(found["job_name"] or "(not a job)")[:255],
        queue=_storable(queue)[:64] if queue else None,
        args=found["args"],
        kwargs=found["kwargs"],
        headers={},
        reason="poison" if poison else "malformed",
        error_type="app.delivery.PoisonMessage" if poison else "app.delivery.MalformedMessage",
        error_message=error_message,
        traceback=None,
        attempts=deliveries if isinstance(deliveries, int) and poison else None,
        enqueued_at=None,
        raw_message=_storable(text),
    )


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        return deaths[-1]
    return {}


def _storable(text: str) -> str:
    """`text` as PostgreSQL stores it: no NUL characters, no lone surrogates."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _settle_batch(message: Message, task_id: str) -> None:
    """A dead job counts as dead in its batch (app.jobs.batches)."""
    batch = (message.headers or {}).get("job_batch")
    if isinstance(batch, int) and not isinstance(batch, bool):
        from app.jobs import batches

        try:
            batches.job_finished(batch, task_id, dead=True)
        except Exception:
            logger.exception("could not count job %s as dead in batch %d", task_id, batch)


class TaskConsumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, except that a message it cannot decode (a content type other than
    JSON, a body that is not what it says) is rejected into the dead-letter exchange, where it
    becomes a `malformed` dead letter, instead of acknowledged and lost."""

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        logger.error(
            "cannot decode a message (content type %r): %s; dead-lettered",
            message.content_type,
            exc,
            extra={"event": "decode_error"},
        )
        message.reject(requeue=False)


class DeadLetterConsumer(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Every worker on RabbitMQ drains `jobs.dead_letters` into the dead-letter store."""

    name = "jobs_service.dead_letters"

    def include_if(self, parent: Any) -> bool:
        return is_amqp(parent.app.conf.broker_url)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        channel.basic_qos(0, DEAD_LETTER_PREFETCH, False)
        return [Consumer(channel, queues=[dead_letter_queue()], on_message=self.store)]

    def store(self, message: Message) -> None:
        """Write one dead letter to the store, then acknowledge it."""
        try:
            failure = failure_of(message)
            from app.db import session_scope

            with session_scope() as session:
                entry_id = dead_letters.record(session, failure)
        except Exception:
            logger.exception("could not store a dead letter; it goes back to its queue")
            time.sleep(DATABASE_RETRY_WAIT)  # (the database is down: do not spin on it)
            message.requeue()
            return
        message.ack()
        _settle_batch(message, failure.task_id)
        log_dead_lettered(entry_id, failure, logger)
