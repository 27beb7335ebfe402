"""The job base: a `celery.Task` with ActiveJob's semantics.

A job is declared with `@job("jobs.<snake_case>", queue_as=..., retry_on=[...], discard_on=[...])`
on a plain function, and stays a real Celery task: `.delay()`, `.apply_async()`, `.s()`, canvas
and `send_task` by name all work. The job layer adds, on Celery's own extension points:

- per-exception retry and discard (`__call__`, `Task.retry` with headers that count attempts),
- a queue chosen at enqueue time from the arguments (a router in `task_routes`),
- start/finish log lines and StatsD metrics around every execution, with around-perform hooks,
- enqueue after commit: inside an open `session_scope`, publishing waits for the commit,
- `perform_now`, `perform_later` and `perform_all_later` (one pipelined publish for many).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, TypeVar

from celery import Task, signals
from celery.app import amqp as celery_amqp
from celery.canvas import Signature
from celery.exceptions import (
    Ignore,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from celery.result import AsyncResult
from celery.utils import uuid
from celery.utils.nodenames import anon_nodename
from kombu import serialization
from kombu.entity import Queue
from kombu.exceptions import BatchPublishError, EncodeError
from kombu.transport.redis import Channel as RedisChannel
from kombu.transport.redis import Transport as RedisTransport
from kombu.utils import json as kombu_json
from kombu.utils.functional import maybe_evaluate

from app.celery_app import celery_app
from app.db import after_commit, session_scope
from app.jobs import instrumentation
from app.jobs.arguments import (
    SENSITIVE_NAMES,
    bind_arguments,
    check_size,
    redacted_arguments,
)
from app.jobs.errors import DeserializationError, JobDeclarationError
from app.jobs.instrumentation import AroundPerform, Execution
from app.jobs.policies import DiscardOn, Policy, RetryOn, counted_executions, find_policy
from app.logs import CORRELATION_HEADER, current_correlation_id
from app.queues import ENQUEUED_AT_HEADER
from app.services import dead_letters
from app.settings import QUEUES

logger = logging.getLogger("app.jobs")

DEFAULT_QUEUE = "default"
#: Message headers the job layer reads and writes.
EXECUTIONS_HEADER = "job_executions"
#: Headers a retry carries over from the message it retries (Celery would replace them all).
CARRIED_HEADERS = (EXECUTIONS_HEADER, CORRELATION_HEADER)
#: Messages buffered before one round trip to the broker in `perform_all_later`.
BULK_BATCH_SIZE = 1000

JOB_NAME = re.compile(r"jobs\.[a-z][a-z0-9_]*")

QueueChooser = Callable[..., str]
F = TypeVar("F", bound=Callable[..., Any])


def _discard_deserialization(job: Job, error: BaseException) -> None:
    logger.error(
        "job discarded %s[%s]: cannot deserialize its arguments: %s",
        job.name,
        job.request.id,
        error,
        extra={"job": job.name, "task_id": job.request.id, "reason": str(error)},
    )


#: Every job discards DeserializationError (retrying bad arguments cannot help).
DISCARD_DESERIALIZATION = DiscardOn(DeserializationError, callback=_discard_deserialization)


@dataclass(frozen=True)
class Prepared:
    """A job call checked and ready to publish."""

    job: Job
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    task_id: str
    options: dict[str, Any]

    @property
    def queue(self) -> str | None:
        """The queue it goes to, once `route` has run (or the caller chose one)."""
        queue = self.options.get("queue")
        return str(getattr(queue, "name", queue)) if queue else None

    def route(self) -> None:
        """Choose the queue from `queue_as` unless the caller (or a retry) already did.

        Runs when the message is delivered, after the enclosing transaction committed, so a
        chooser that reads the database sees what the caller just wrote (as in Rails, where
        the deferred enqueue evaluates `queue_as` then).
        """
        options = self.options
        if not (options.get("queue") or options.get("routing_key") or options.get("exchange")):
            options["queue"] = self.job.queue_for(self.args, self.kwargs)


#: Where jobs go instead of the broker while a test captures them (app.jobs.testing).
capture: list[Prepared] | None = None


class Job(Task):  # type: ignore[misc]
    """Base of every job. Declare jobs with `@job(...)`; subclass only to change the layer."""

    #: A queue name, or a callable of the job's arguments returning one at enqueue time.
    queue_as: str | QueueChooser = DEFAULT_QUEUE
    retry_on: tuple[RetryOn, ...] = ()
    discard_on: tuple[DiscardOn, ...] = ()
    #: Further argument names whose values are kept out of logs.
    redact: tuple[str, ...] = ()
    around_perform: tuple[AroundPerform, ...] = ()
    #: The policies count attempts per exception class; Celery's own cap would cut them short.
    max_retries = None

    @cached_property
    def policies(self) -> tuple[Policy, ...]:
        """Discards first (an explicit 'never retry'), then retries, each in declared order."""
        return (*self.discard_on, *self.retry_on, DISCARD_DESERIALIZATION)

    @cached_property
    def sensitive_names(self) -> frozenset[str]:
        """Argument names redacted in logs and in the message's argsrepr."""
        return SENSITIVE_NAMES | frozenset(self.redact)

    # Enqueueing ------------------------------------------------------------------------------

    def queue_for(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The queue for a call with these arguments, from `queue_as`."""
        chooser = self.queue_as
        queue = chooser(*args, **kwargs) if callable(chooser) else chooser
        if queue not in QUEUES:
            raise ValueError(f"{self.name}: queue_as chose {queue!r}, not one of {QUEUES}")
        return queue

    def prepare(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        task_id: str | None = None,
        **options: Any,
    ) -> Prepared:
        """Check the arguments and stamp the headers; nothing is published yet."""
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        if not options.get("retries"):
            check_size(args, kwargs)
            bind_arguments(self.run, args, kwargs)  # a bad call fails here, at the caller
        headers = dict(options.pop("headers", None) or {})
        headers[ENQUEUED_AT_HEADER] = _scheduled_time(options)
        correlation = current_correlation_id.get()
        if correlation is not None:  # a job enqueued by a job carries its correlation id
            headers.setdefault(CORRELATION_HEADER, correlation)
        options["headers"] = headers
        arguments = redacted_arguments(self.run, args, kwargs, self.sensitive_names)
        options.setdefault("argsrepr", repr(arguments))  # argsrepr reaches logs and Flower
        options.setdefault("kwargsrepr", "{}")
        return Prepared(self, args, kwargs, task_id or uuid(), options)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Publish the job; inside an open `session_scope`, only once it has committed."""
        prepared = self.prepare(
            args, kwargs, task_id, link=link, link_error=link_error, shadow=shadow, **options
        )

        def deliver() -> None:
            _deliver([prepared], producer)

        # A retry is delivered at once: the scope it was raised in is rolling back.
        if options.get("retries") or not after_commit(deliver):
            deliver()
        return self.AsyncResult(prepared.task_id)

    def perform_later(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """ActiveJob's name for `.delay()`."""
        return self.apply_async(args, kwargs)

    def perform_now(self, *args: Any, **kwargs: Any) -> Any:
        """Run the job inline with the same policies; a retry is enqueued with its wait."""
        return self.apply(args, kwargs, throw=True).get()

    # Executing -------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        execution = Execution(
            job_name=self.name,
            task_id=request.id or "",
            queue=_delivered_queue(request) or "inline",
            attempt=(request.retries or 0) + 1,
            arguments=redacted_arguments(self.run, args, kwargs, self.sensitive_names),
            enqueued_at=_header(request, ENQUEUED_AT_HEADER),
        )
        instrumentation.started(execution)
        try:
            with ExitStack() as hooks:
                for hook in self.around_perform:
                    hooks.enter_context(hook(execution))
                check_size(args, kwargs)
                bind_arguments(self.run, args, kwargs)
                result = super().__call__(*args, **kwargs)
        except (Retry, Ignore, Reject) as control:  # the body steered Celery itself
            instrumentation.finished(
                execution, "retry" if isinstance(control, Retry) else "discard"
            )
            raise
        except Exception as error:
            return self._rescue(error, execution, args, kwargs)
        instrumentation.finished(execution, "success")
        return result

    def _rescue(
        self, error: Exception, execution: Execution, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        policy = find_policy(self.policies, error)
        if isinstance(policy, DiscardOn):
            if policy.callback is not None:
                try:
                    policy.callback(self, error)
                except Exception:
                    logger.exception("discard callback of %s failed", self.name)
            instrumentation.finished(execution, "discard", error)
            return None
        if isinstance(policy, RetryOn):
            request = self.request
            counts = dict(_header(request, EXECUTIONS_HEADER) or {})
            executions = counted_executions(counts, policy) + 1
            counts[policy.key] = executions
            if executions < policy.attempts:
                wait = policy.wait_seconds(executions)
                instrumentation.finished(execution, "retry", error)
                headers = {
                    name: value
                    for name in CARRIED_HEADERS
                    if (value := _header(request, name)) is not None
                }
                headers[EXECUTIONS_HEADER] = counts
                if request.is_eager:  # perform_now: enqueue the retry, as ActiveJob does
                    self.apply_async(
                        args,
                        kwargs,
                        countdown=wait,
                        headers=headers,
                        retries=(request.retries or 0) + 1,
                    )
                    return None
                raise self.retry(exc=error, countdown=wait, headers=headers)
            self.exhausted(error, execution, policy, executions)
            error.job_exhausted = True  # type: ignore[attr-defined]  # read by on_failure
        instrumentation.finished(execution, "failure", error)
        raise error

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Celery's hook for a job that failed for good: it goes to the dead-letter store.

        Celery calls it in the worker process after the job raised, and in the parent process
        when the job was killed at its hard time limit.
        """
        request = self.request
        if request.is_eager:  # perform_now: the caller gets the exception
            return
        current = request.id == task_id  # False in the parent after a hard time limit
        enqueued_at = _header(request, ENQUEUED_AT_HEADER) if current else None
        if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
            reason = "time_limit"
        else:
            reason = "exhausted" if getattr(exc, "job_exhausted", False) else "unhandled"
        failure = dead_letters.Failure(
            task_id=task_id,
            job_name=self.name,
            queue=_delivered_queue(request) if current else None,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            headers={EXECUTIONS_HEADER: _header(request, EXECUTIONS_HEADER) or {}}
            if current
            else {},
            reason=reason,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error_message=str(exc),
            traceback=getattr(einfo, "traceback", None),
            attempts=(request.retries or 0) + 1 if current else None,
            enqueued_at=dt.datetime.fromtimestamp(enqueued_at, dt.UTC) if enqueued_at else None,
        )
        _store_dead_letter(self, failure)

    def exhausted(
        self, error: Exception, execution: Execution, policy: RetryOn, executions: int
    ) -> None:
        """Called when a retry policy has run out of attempts; the job then fails for good."""
        request = self.request
        logger.error(
            "job failed for good %s[%s] after %d executions for %s: %s: %s; "
            "replay with: send_task(%r, args=%r, kwargs=%r, queue=%r)",
            self.name,
            execution.task_id,
            executions,
            policy.key,
            type(error).__name__,
            error,
            self.name,
            list(request.args or ()),
            dict(request.kwargs or {}),
            execution.queue,
            extra={**execution.fields(), "event": "exhausted", "executions": executions},
        )


def _store_dead_letter(job: Job, failure: dead_letters.Failure) -> None:
    shown = redacted_arguments(job.run, failure.args, failure.kwargs, job.sensitive_names)
    try:
        with session_scope() as session:
            entry_id = dead_letters.record(session, failure)
    except Exception:
        # The store is the database, which may be what failed: the log keeps the whole entry
        # (arguments included, so it can be replayed) rather than let the job vanish.
        logger.critical(
            "job failed for good and could not be dead-lettered: %s",
            json.dumps({**failure.__dict__, "enqueued_at": str(failure.enqueued_at)}, default=str),
            exc_info=True,
        )
        return
    logger.error(
        "job dead-lettered %s[%s] as #%d (%s): %s: %s args=%s",
        failure.job_name,
        failure.task_id,
        entry_id,
        failure.reason,
        failure.error_type,
        failure.error_message,
        shown,
        extra={
            "job": failure.job_name,
            "task_id": failure.task_id,
            "event": "dead_letter",
            "dead_letter_id": entry_id,
        },
    )


def _publish(prepared: Prepared, producer: Any = None, **extra: Any) -> AsyncResult:
    return Task.apply_async(
        prepared.job,
        prepared.args,
        prepared.kwargs,
        prepared.task_id,
        producer=producer,
        **prepared.options,
        **extra,
    )


def _scheduled_time(options: Mapping[str, Any]) -> float:
    eta = options.get("eta")
    if eta is not None and hasattr(eta, "timestamp"):
        return float(eta.timestamp())
    return time.time() + float(options.get("countdown") or 0)


def _header(request: Any, name: str) -> Any:
    # A worker puts message headers on the request; an eager apply() keeps them in .headers.
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _delivered_queue(request: Any) -> str | None:
    info = getattr(request, "delivery_info", None) or {}
    return info.get("routing_key") or None


def route_by_queue_as(
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
    task: Any = None,
    **_: Any,
) -> Any:
    """Celery router (celeryconfig.task_routes): a job's `queue_as`, unless the caller chose."""
    if options.get("queue") or options.get("routing_key"):
        return None
    job = task if isinstance(task, Job) else celery_app.tasks.get(name)
    if not isinstance(job, Job):
        return None
    return {"queue": job.queue_for(args or (), kwargs or {})}


def perform_all_later(signatures: Iterable[Signature]) -> list[AsyncResult]:
    """Enqueue many jobs with few broker round trips (ActiveJob 7.1, Sidekiq's push_bulk).

    Every call is checked before any is published; inside an open `session_scope` the whole
    set is published after the commit. As with Sidekiq's push_bulk, the caller gets the task
    ids and the jobs' return values are not kept (no result-backend round trips per job).
    """
    prepared = []
    for signature in signatures:
        job = celery_app.tasks.get(signature.task)
        if not isinstance(job, Job):
            raise TypeError(f"perform_all_later takes job signatures, got {signature!r}")
        options = {"ignore_result": True, **signature.options}
        prepared.append(job.prepare(signature.args, signature.kwargs, **options))

    def deliver() -> None:
        _deliver(prepared)

    if not after_commit(deliver):
        deliver()
    return [p.job.AsyncResult(p.task_id) for p in prepared]


def _deliver(prepared: Sequence[Prepared], producer: Any = None) -> None:
    """Publish, or hand to the test capture; many messages share one pipelined round trip."""
    for item in prepared:
        item.route()
    if capture is not None:
        capture.extend(prepared)
    elif len(prepared) == 1:
        _publish(prepared[0], producer)
    else:
        with celery_app.producer_or_acquire(producer) as batch_producer:
            bulk = _BulkPublish.start(batch_producer, prepared)
            if bulk is not None:
                bulk.publish(prepared)
                return
            # Declare each queue once, not once per message as Celery would.
            queues = celery_app.amqp.queues
            for name in {item.queue for item in prepared if item.queue}:
                batch_producer.maybe_declare(queues[name])
            with batch_producer.batch(max_size=BULK_BATCH_SIZE):
                for item in prepared:
                    _publish(item, batch_producer, declare=[])


#: The options (of `Prepared.options`, after `route`) the bulk path builds exactly as
#: `Task.apply_async` would. A batch with any other option goes through `apply_async`.
_BULK_OPTIONS = frozenset(
    {
        "headers",
        "argsrepr",
        "kwargsrepr",
        "ignore_result",
        "queue",
        "priority",
        "countdown",
        "eta",
        "serializer",
        "time_limit",
        "soft_time_limit",
        "retries",
        "link",  # None only
        "link_error",  # None only
        "shadow",  # None only
    }
)
#: A job's own execution options (`Task._get_exec_options`) the bulk path handles.
_BULK_EXEC_OPTIONS = frozenset(
    {
        "queue",
        "routing_key",  # None only
        "exchange",  # None only
        "priority",
        "expires",  # None only
        "serializer",
        "delivery_mode",
        "compression",  # None only
        "time_limit",
        "soft_time_limit",
        "immediate",
        "mandatory",
    }
)

#: (name, body, headers, routing key) of a message, for after_task_publish.
_Published = tuple[str, Any, dict[str, Any], str]


class _Commands:
    """The Redis commands kombu's Redis channel adds for a message: its `_put` takes any
    object with `add(name, *args)` as the publish batch to add them to."""

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


class _BulkPublish:
    """Many jobs to a Redis broker: Celery's messages, kombu's Redis commands, few round trips.

    `Task.apply_async` -> `Celery.send_task` -> `AMQP.send_task_message` -> `Producer.publish`
    costs 150 to 250 µs a message even inside `Producer.batch`, mostly in work that is the
    same for every message of a batch (configuration lookups, routing, queue declaration, retry
    policies, serializer lookup, result objects). This path does that work once per batch and,
    per message, what those functions do per message, in their order and with their building
    blocks: `app.amqp.create_task_message` (protocol 2) makes the headers, properties and
    body; the serializer kombu's registry names for them encodes the body; the channel's
    `prepare_message` makes the message and its `basic_publish` sets its delivery info and
    tag and has `_put` choose the list for its queue and priority and encode it; the publish
    signals are sent when they have receivers. The commands `_put` adds go out in pipelines of
    BULK_BATCH_SIZE messages, without automatic retry, as kombu's publish batch sends them,
    the LPUSHes to one list as one LPUSH (which leaves the list as one LPUSH each would).

    `start` returns None, and the caller takes the per-message path, for anything this does
    not build exactly: another transport, a channel that cannot batch, an option outside
    `_BULK_OPTIONS`, link callbacks, compression, expiry, a router besides
    `route_by_queue_as`, a queue on a non-direct exchange, eager mode, sent events.
    """

    def __init__(self, producer: Any, channel: Any, queues: dict[str, Queue]) -> None:
        app = celery_app
        conf = app.conf
        self.producer = producer
        self.channel = channel
        self.queues = queues
        self.parent = app.current_worker_task  # a job enqueueing jobs, in a worker
        self.create_task_message = app.amqp.create_task_message
        self.reply_to = app.thread_oid
        self.origin = anon_nodename()  # what create_task_message uses when given none
        self.default_delivery_mode = conf.task_default_delivery_mode
        self.default_serializer = conf.task_serializer
        self.retry_policy = conf.task_publish_retry_policy
        self.inherit_priority = conf.task_inherit_parent_priority
        self.backend = app.backend
        self.declared: set[str] = set()
        self.delivery_modes: dict[tuple[str, Any], Any] = {}
        self.encoders: dict[str, Callable[[Any], tuple[Any, Any, Any]]] = {}

    @classmethod
    def start(cls, producer: Any, prepared: Sequence[Prepared]) -> _BulkPublish | None:
        """A bulk publisher for `prepared` on `producer`, or None if it cannot build them."""
        app = celery_app
        conf = app.conf
        amqp = app.amqp
        if (
            conf.task_always_eager
            or conf.task_protocol != 2
            or conf.task_send_sent_event
            or conf.task_compression
            or producer.compression
            or type(amqp) is not celery_amqp.AMQP
            or signals.task_sent.receivers
            or _publishing_callbacks()
            or any(maybe_evaluate(r) is not route_by_queue_as for r in amqp.router.routes)
        ):
            return None
        connection = producer.connection
        if connection is None or not isinstance(connection.transport, RedisTransport):
            return None
        if not producer.supports_batch_publish:  # kombu's check: no pipeline is retried
            return None
        channel = producer.channel
        if not isinstance(channel, RedisChannel) or not channel.supports_batch_publish:
            return None
        queues: dict[str, Queue] = {}
        jobs: set[int] = set()
        for item in prepared:
            options = item.options
            queue = options.get("queue")
            if (
                not options.keys() <= _BULK_OPTIONS
                or options.get("link")
                or options.get("link_error")
                or options.get("shadow")
                or not isinstance(queue, str)
            ):
                return None
            if queue not in queues:
                found = amqp.router.expand_destination(queue)["queue"]  # or QueueNotFound
                if found.exchange.type != "direct" or found.name != queue:
                    return None
                queues[queue] = found
            if id(item.job) not in jobs:
                if not _bulk_job(item.job):
                    return None
                jobs.add(id(item.job))
        return cls(producer, channel, queues)

    def publish(self, prepared: Sequence[Prepared]) -> None:
        """Build and push every message, BULK_BATCH_SIZE messages a round trip."""
        commands = _Commands()
        published: list[_Published] = []
        count = 0
        for item in prepared:
            self._put(item, commands, published)
            count += 1
            if count == BULK_BATCH_SIZE:
                self._flush(commands, published)
                commands, published, count = _Commands(), [], 0
        if count:
            self._flush(commands, published)

    def _put(self, item: Prepared, commands: _Commands, published: list[_Published]) -> None:
        job, args, kwargs, task_id = item.job, item.args, item.kwargs, item.task_id
        name = job.name
        # Task.apply_async
        options = dict(item.options)
        options.pop("link", None)
        options.pop("link_error", None)
        shadow = options.pop("shadow", None)
        if job.typing:
            check_arguments = getattr(job, "__header__", None)
            if check_arguments is not None:
                check_arguments(*args, **kwargs)
        shadow = shadow or job.shadow_name(args, kwargs, options)
        options = dict(job._get_exec_options(), **options)
        options.setdefault("ignore_result", job.ignore_result)
        # Celery.send_task
        countdown = options.pop("countdown", None)
        eta = options.pop("eta", None)
        retries = options.pop("retries", 0)
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        expires = options.pop("expires", None)
        ignore_result = options.pop("ignore_result", None)
        # The router: route_by_queue_as keeps the queue chosen; the name becomes its Queue.
        queue = self.queues[options.pop("queue")]
        options["queue"] = queue
        root_id = parent_id = None
        parent = self.parent
        if parent:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
            if self.inherit_priority:
                options.setdefault("priority", parent.request.delivery_info.get("priority"))
        headers, properties, body, _ = self.create_task_message(
            task_id,
            name,
            args,
            kwargs,
            countdown,
            eta,
            None,  # group_id
            None,  # group_index
            expires,
            retries,
            None,  # chord
            None,  # link
            None,  # link_error
            self.reply_to,
            time_limit,
            soft_time_limit,
            False,  # create_sent_event
            root_id,
            parent_id,
            shadow,
            None,  # chain
            ignore_result=ignore_result,
            replaced_task_nesting=0,
            origin=self.origin,
            **options,
        )
        if not ignore_result:
            with self.producer.connection._reraise_as_library_errors():
                self.backend.on_task_call(self.producer, task_id)
        if parent:  # add_to_parent
            result = job.AsyncResult(task_id)
            result.ignored = ignore_result
            parent.add_trail(result)
        # AMQP.send_task_message: a direct exchange and no exchange given, so the anonymous
        # exchange and the queue's name as routing key.
        options.pop("exchange", None)
        options.pop("routing_key", None)
        options.pop("queue")
        serializer = options.pop("serializer", None)
        delivery_mode = options.pop("delivery_mode", None)
        options.pop("compression", None)
        extra_headers = options.pop("headers", None)
        if extra_headers:
            headers.update(extra_headers)
        if options:
            properties.update(options)
        routing_key = queue.name
        if routing_key not in self.declared:  # once per batch, before its first message
            self.producer.maybe_declare(queue)
            self.declared.add(routing_key)
        if signals.before_task_publish.receivers:
            signals.before_task_publish.send(
                sender=name,
                body=body,
                exchange="",
                routing_key=routing_key,
                declare=[queue],
                headers=headers,
                properties=properties,
                retry_policy=dict(self.retry_policy),
            )
        # Producer.publish
        properties = dict(properties)
        priority = properties.pop("priority", 0)
        properties.pop("mandatory", None)
        properties.pop("immediate", None)
        properties["delivery_mode"] = self._delivery_mode(queue, delivery_mode)
        content_type, content_encoding, payload = self._encoder(
            serializer or self.default_serializer
        )(body)
        message = self.channel.prepare_message(
            payload, priority, content_type, content_encoding, headers, properties
        )
        self.channel.basic_publish(message, "", routing_key, _publish_batch=commands)
        if signals.after_task_publish.receivers:
            published.append((name, body, headers, routing_key))

    def _delivery_mode(self, queue: Queue, delivery_mode: Any) -> Any:
        key = (queue.name, delivery_mode)
        found = self.delivery_modes.get(key)
        if found is None:
            if delivery_mode is None:
                delivery_mode = queue.exchange.delivery_mode or self.default_delivery_mode
            # Producer.publish: no exchange given ("" here), so the producer's own.
            _, found = self.producer._delivery_details(self.producer.exchange, delivery_mode)
            self.delivery_modes[key] = found
        return found

    def _encoder(self, serializer: str) -> Callable[[Any], tuple[Any, Any, Any]]:
        """kombu.serialization.dumps for `serializer`, with the registry looked up once."""
        encoder = self.encoders.get(serializer)
        if encoder is None:
            encoder = self.encoders[serializer] = _body_encoder(serializer)
        return encoder

    def _flush(self, commands: _Commands, published: list[_Published]) -> None:
        buffered = commands.commands
        with self.channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            if all(name == "lpush" and len(args) == 2 for name, args in buffered):
                values: dict[Any, list[Any]] = {}
                for _, (key, value) in buffered:
                    listed = values.get(key)
                    if listed is None:
                        values[key] = [value]
                    else:
                        listed.append(value)
                for key, listed in values.items():
                    pipe.lpush(key, *listed)
            else:  # other commands too (a queue with an expiry): one by one, in kombu's order
                for name, args in buffered:
                    getattr(pipe, name)(*args)
            try:
                pipe.execute()
            except Exception as exc:  # as kombu's PublishBatch.flush
                raise BatchPublishError(
                    "Redis publish batch failed; delivery is uncertain"
                ) from exc
        for name, body, headers, routing_key in published:
            signals.after_task_publish.send(
                sender=name, body=body, headers=headers, exchange="", routing_key=routing_key
            )


def _body_encoder(serializer: str) -> Callable[[Any], tuple[Any, Any, Any]]:
    """What kombu.serialization.dumps(body, serializer) does for each body, looked up once."""
    codec = serialization.registry._encoders.get(serializer) if serializer != "raw" else None
    if codec is None or codec.encoder is not kombu_json.dumps:
        return partial(serialization.dumps, serializer=serializer)
    # kombu's json encoder is json.dumps(body, cls=kombu's JSONEncoder): one encoder will do.
    content_type, content_encoding = codec.content_type, codec.content_encoding
    encode = kombu_json.JSONEncoder().encode

    def encoded(body: Any) -> tuple[Any, Any, Any]:
        try:
            return content_type, content_encoding, encode(body)
        except Exception as exc:  # as kombu.serialization.dumps
            raise EncodeError(exc) from exc

    return encoded


def _publishing_callbacks() -> bool:
    """Whether Celery is publishing a finished task's callbacks (it retries each on its own)."""
    flag = getattr(celery_amqp, "_callback_publish_retry", None)
    return bool(flag is not None and flag.get())


def _bulk_job(job: Job) -> bool:
    """Whether the bulk path builds this job's messages as its `apply_async` would."""
    options = job._get_exec_options()
    return bool(
        not job.__v2_compat__
        and getattr(job, "_dump_pydantic_arguments", None) is None
        and not (job.soft_time_limit and job.time_limit and job.soft_time_limit > job.time_limit)
        and options.keys() <= _BULK_EXEC_OPTIONS
        and not any(options.get(k) for k in ("routing_key", "exchange", "expires", "compression"))
    )


def job(
    name: str,
    *,
    queue_as: str | QueueChooser = DEFAULT_QUEUE,
    retry_on: Sequence[RetryOn] = (),
    discard_on: Sequence[DiscardOn] = (),
    redact: Sequence[str] = (),
    around_perform: Sequence[AroundPerform] = (),
    **task_options: Any,
) -> Callable[[F], Job]:
    """Declare a function as a job registered under the stable name `jobs.<snake_case>`."""
    if not JOB_NAME.fullmatch(name):
        raise JobDeclarationError(f"job names are jobs.<snake_case>, got {name!r}")
    if not callable(queue_as) and queue_as not in QUEUES:
        raise JobDeclarationError(
            f"{name}: queue_as must be one of {QUEUES} or a callable, got {queue_as!r}"
        )
    for policy in (*retry_on, *discard_on):
        if not isinstance(policy, RetryOn | DiscardOn):
            raise JobDeclarationError(f"{name}: expected RetryOn/DiscardOn, got {policy!r}")

    soft, hard = task_options.get("soft_time_limit"), task_options.get("time_limit")
    if soft is not None and hard is not None and soft >= hard:
        raise JobDeclarationError(
            f"{name}: soft_time_limit ({soft}) must be below time_limit "
            f"({hard}), or the soft limit can never fire"
        )
    # A function stored on a class would be bound as a method: keep the chooser unbound.
    chooser = staticmethod(queue_as) if callable(queue_as) else queue_as

    def declare(func: F) -> Job:
        task = celery_app.task(
            base=Job,
            name=name,
            queue_as=chooser,
            retry_on=tuple(retry_on),
            discard_on=tuple(discard_on),
            redact=tuple(redact),
            around_perform=tuple(around_perform),
            **task_options,
        )(func)
        return task  # type: ignore[no-any-return]

    return declare
