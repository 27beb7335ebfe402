"""The job base: a `celery.Task` with ActiveJob's semantics.

A job is declared with `@job("jobs.<snake_case>", queue_as=..., retry_on=[...], discard_on=[...])`
on a plain function, and stays a real Celery task: `.delay()`, `.apply_async()`, `.s()`, canvas
and `send_task` by name all work. The job layer adds, on Celery's own extension points:

- per-exception retry and discard (`__call__`, `Task.retry` with headers that count attempts),
- a queue chosen at enqueue time from the arguments (a router in `task_routes`),
- start/finish log lines and StatsD metrics around every execution, with around-perform hooks,
- enqueue after commit: inside an open `session_scope`, publishing waits for the commit,
- `perform_now`, `perform_later` and `perform_all_later` (app.delivery.bulk publishes many
  in few round trips),
- flow control across workers (app.delivery.flow): `unique_for`, `limits_concurrency`,
  `rate_limit=Rate(...)`, `expires_in`.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar, overload

import redis
from celery import Task as CeleryTask
from celery import states
from celery.canvas import Signature, maybe_signature
from celery.exceptions import (
    Ignore,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from celery.result import AsyncResult
from kombu.utils import json as kombu_json
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app import running
from app.celery_app import celery_app
from app.db import after_commit, after_rollback, get_engine, open_session, session_scope
from app.delivery import flow, outbox, rabbitmq
from app.delivery.bulk import BULK_BATCH_SIZE, BulkPublish
from app.delivery.clients import broker_client
from app.delivery.envelope import decoded_body
from app.delivery.flow import EXPIRES_HEADER, UNIQUE_HEADER, Limit, Rate
from app.delivery.records import Keys
from app.delivery.requests import Task
from app.delivery.scheduled import ERROR_HEADER
from app.ids import random_uuid, random_uuids
from app.jobs import continuable as continuations
from app.jobs import instrumentation
from app.jobs.arguments import (
    SENSITIVE_NAMES,
    bind_arguments,
    check_size,
    checked_and_redacted,
    redacted_arguments,
)
from app.jobs.continuable import DEFAULT_MAX_RESUMPTIONS
from app.jobs.errors import DeserializationError, JobDeclarationError
from app.jobs.instrumentation import AroundPerform, Execution
from app.jobs.policies import DiscardOn, Policy, RetryOn, counted_executions, find_policy
from app.logs import CORRELATION_HEADER, current_correlation_id
from app.queues import ENQUEUED_AT_HEADER, FIRST_ENQUEUED_HEADER
from app.services import dead_letters
from app.settings import QUEUES

logger = logging.getLogger("app.jobs")

DEFAULT_QUEUE = "default"
#: Message headers the job layer reads and writes.
EXECUTIONS_HEADER = "job_executions"
#: Headers a retry carries over from the message it retries (Celery would replace them all).
#: The batch a job belongs to (app.jobs.batches).
BATCH_HEADER = "job_batch"
CARRIED_HEADERS = (
    EXECUTIONS_HEADER,
    CORRELATION_HEADER,
    FIRST_ENQUEUED_HEADER,
    UNIQUE_HEADER,
    EXPIRES_HEADER,
    BATCH_HEADER,
)

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


@dataclass(slots=True)
class Prepared:
    """A job call checked and ready to publish. (Not frozen: a frozen dataclass's `__init__`
    sets each field through `object.__setattr__`, a tenth of a bulk enqueue's time.)"""

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


class Job(Task):
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
    #: A job's failure is the job layer's to report: Celery logs it at INFO without its
    #: traceback ("raised expected"), and the one ERROR line is the dead letter's, whose entry
    #: keeps the traceback (`jobs-service dead-letters show`).
    throws = (Exception,)
    #: Flow control (see `job`): None when the job has none of it.
    unique_for: float | None = None
    unique_key: Callable[..., Any] | None = None
    limits_concurrency: Limit | None = None
    flow_rate: Rate | None = None
    expires_in: float | None = None
    #: Continuations (app.jobs.continuable): the body runs steps that resume where they got to.
    continuable: bool = False
    max_resumptions: int = DEFAULT_MAX_RESUMPTIONS

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
        *,
        stamped_at: float | None = None,
        **options: Any,
    ) -> Prepared:
        """Check the arguments and stamp the headers; nothing is published yet. The headers'
        times are `stamped_at` if given (a bulk call's, read once for many jobs), else now."""
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        if options.get("retries"):  # checked when first enqueued
            arguments = redacted_arguments(self.run, args, kwargs, self.sensitive_names)
        else:  # a bad call fails here, at the caller
            check_size(args, kwargs)
            arguments = checked_and_redacted(self.run, args, kwargs, self.sensitive_names)
        headers = dict(options.pop("headers", None) or {})
        now = time.time() if stamped_at is None else stamped_at
        headers[ENQUEUED_AT_HEADER] = _scheduled_time(options, now)
        headers.setdefault(FIRST_ENQUEUED_HEADER, now)
        if self.expires_in is not None:  # a retry carries the first message's expiry
            headers.setdefault(EXPIRES_HEADER, headers[ENQUEUED_AT_HEADER] + self.expires_in)
        correlation = current_correlation_id.get()
        if correlation is not None:  # a job enqueued by a job carries its correlation id
            headers.setdefault(CORRELATION_HEADER, correlation)
        options["headers"] = headers
        options.setdefault("argsrepr", repr(arguments))  # argsrepr reaches logs and Flower
        options.setdefault("kwargsrepr", "{}")
        return Prepared(self, args, kwargs, task_id or random_uuid(), options)

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

        retry = bool(options.get("retries"))
        if not retry and self.unique_for is not None:
            holder = _claim_unique(prepared, producer)
            if holder is not None:  # the same job is queued, scheduled or running
                return self.AsyncResult(holder)
        if not retry and _batch_collects([prepared]):  # published when its jobs() block ends
            return self.AsyncResult(prepared.task_id)

        if retry:  # delivered at once: the scope it was raised in is rolling back
            _deliver([prepared], producer)
        else:
            enqueue_prepared([prepared], producer)
        return self.AsyncResult(prepared.task_id)

    def perform_later(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """ActiveJob's name for `.delay()`."""
        return self.apply_async(args, kwargs)

    def perform_now(self, *args: Any, **kwargs: Any) -> Any:
        """Run the job inline with the same policies; a retry is enqueued with its wait."""
        return self.apply(args, kwargs, throw=True).get()

    # Executing (`Task.__call__` notes the log context and deadlines, then calls this) ------

    def _execute(
        self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any], traced: bool = False
    ) -> Any:
        batch = _batch_of(request)
        if self.expires_in is not None and not request.is_eager and _expired(self, request):
            self._skip_expired(args, kwargs)
            _batch_member_done(batch, request)
            return None
        execution = Execution(
            job_name=self.name,
            task_id=request.id or "",
            queue=_delivered_queue(request) or "inline",
            attempt=(request.retries or 0) + 1,
            arguments=redacted_arguments(self.run, args, kwargs, self.sensitive_names),
            enqueued_at=_header(request, ENQUEUED_AT_HEADER),
        )
        instrumentation.started(execution)
        batch_token = _batches().current_batch.set(batch)
        try:
            if self.around_perform or self.continuable:
                with ExitStack() as hooks:
                    for hook in self.around_perform:
                        hooks.enter_context(hook(execution))
                    if self.continuable:
                        hooks.enter_context(
                            continuations.running(
                                self.name,
                                execution.task_id,
                                self.max_resumptions,
                                lambda: self._requeue(args, kwargs),
                                self._time_slice(),
                            )
                        )
                    result = self._perform(args, kwargs, traced)
            else:
                result = self._perform(args, kwargs, traced)
            # Counted in its batch before the message is acknowledged; a database error here
            # retries the job (idempotent), so the count is never lost.
            _batch_member_done(batch, request)
        except (Retry, Ignore, Reject) as control:  # the body steered Celery itself
            outcome = getattr(control, "outcome", "discard")  # (a continuation: "interrupted")
            instrumentation.finished(execution, "retry" if isinstance(control, Retry) else outcome)
            raise
        except Exception as error:
            return self._rescue(error, execution, args, kwargs)
        finally:
            _batches().current_batch.reset(batch_token)
        instrumentation.finished(execution, "success")
        return result

    def _perform(self, args: tuple[Any, ...], kwargs: dict[str, Any], traced: bool) -> Any:
        check_size(args, kwargs)
        bind_arguments(self.run, args, kwargs)
        return self._run_body(args, kwargs, traced)

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
            _batch_member_done(_batch_of(self.request), self.request)
            return None
        if isinstance(policy, RetryOn):
            request = self.request
            counts = dict(_header(request, EXECUTIONS_HEADER) or {})
            executions = counted_executions(counts, policy) + 1
            counts[policy.key] = executions
            if executions < policy.attempts:
                wait = policy.wait_seconds(executions)
                instrumentation.finished(execution, "retry", error)
                _batch_member_failed(_batch_of(request), request)
                headers = {
                    name: value
                    for name in CARRIED_HEADERS
                    if (value := _header(request, name)) is not None
                }
                headers[EXECUTIONS_HEADER] = counts
                headers[ERROR_HEADER] = f"{type(error).__name__}: {error}"[:500]
                if request.is_eager:  # perform_now: enqueue the retry, as ActiveJob does
                    self.apply_async(
                        args,
                        kwargs,
                        task_id=request.id,  # as Task.retry keeps it (a continuation's key)
                        countdown=wait,
                        headers=headers,
                        retries=(request.retries or 0) + 1,
                    )
                    return None
                raise self.retry(exc=error, countdown=wait, headers=headers)
            self.exhausted(error, execution, policy, executions)
            error.job_exhausted = True  # type: ignore[attr-defined]  # read by on_failure
            error.job_executions = counts  # type: ignore[attr-defined]  # this one included
        instrumentation.finished(execution, "failure", error)
        raise error

    def _time_slice(self) -> float | None:
        """How long a continuable execution runs before it stops at a checkpoint to be
        enqueued again: half its soft time limit, so a long walk never reaches the limit."""
        limit = self.soft_time_limit or self.app.conf.task_soft_time_limit
        return float(limit) / 2 if limit else None

    def _requeue(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Enqueue this execution again, same task id and queue, headers carried as a retry
        carries them (a continuation stopping for a shutdown). Inside an open `session_scope`
        it goes through the outbox: published once that transaction commits."""
        request = self.request
        headers = {
            name: value for name in CARRIED_HEADERS if (value := _header(request, name)) is not None
        }
        options: dict[str, Any] = {"headers": headers, "retries": request.retries or 0}
        queue = _delivered_queue(request)
        if queue in QUEUES:
            options["queue"] = queue
        enqueue_prepared([self.prepare(args, kwargs, request.id, **options)])

    def _skip_expired(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        request = self.request
        expired_at = _expiry(self, request) or 0.0
        logger.warning(
            "job expired %s[%s]: still queued %.1f s after its expires_in (%g s) ran out; "
            "skipped args=%s",
            self.name,
            request.id,
            time.time() - expired_at,
            self.expires_in,
            redacted_arguments(self.run, args, kwargs, self.sensitive_names),
            extra={"job": self.name, "task_id": request.id, "event": "expired"},
        )
        client = instrumentation.metrics()
        client.incr(f"jobs.{self.name.removeprefix('jobs.')}.expired")
        client.incr("jobs.flow.expired")

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Celery's hook after a run that succeeded or failed for good (not a retry): the job's
        unique key, if it holds one, is released; then its log context (app.running)."""
        try:
            request = self.request
            if request.is_eager or status not in (states.SUCCESS, states.FAILURE):
                return
            key = _header(request, UNIQUE_HEADER)
            if isinstance(key, str) and request.id:
                _release_unique_key(key, request.id)
        finally:
            running.outcome_logged()

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
        enqueued_at = None
        if current:
            enqueued_at = _header(request, FIRST_ENQUEUED_HEADER) or _header(
                request, ENQUEUED_AT_HEADER
            )
        # The counts with the failing execution included (the header holds those before it).
        executions = getattr(exc, "job_executions", None) or _header(request, EXECUTIONS_HEADER)
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
            headers={EXECUTIONS_HEADER: executions or {}} if current else {},
            reason=reason,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error_message=str(exc),
            traceback=getattr(einfo, "traceback", None),
            attempts=(request.retries or 0) + 1 if current else None,
            enqueued_at=dt.datetime.fromtimestamp(enqueued_at, dt.UTC) if enqueued_at else None,
        )
        _store_dead_letter(self, failure)
        if current:
            _batch_member_done(_batch_of(request), request, dead=True, raising=False)

    def exhausted(
        self, error: Exception, execution: Execution, policy: RetryOn, executions: int
    ) -> None:
        """Called when a retry policy has run out of attempts; the job then fails for good.

        In a worker the job then goes to the dead-letter store, whose line is the ERROR one;
        run inline (`perform_now`) nothing is stored, and this line is the ERROR one.
        """
        request = self.request
        logger.log(
            logging.ERROR if request.is_eager else logging.WARNING,
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


def _expiry(job: Job, request: Any) -> float | None:
    """When the job expires: its header, else (a producer that is not the job layer) its
    enqueue time if it gave one; None when neither is a time."""
    for name, offset in ((EXPIRES_HEADER, 0.0), (ENQUEUED_AT_HEADER, job.expires_in or 0.0)):
        value = _header(request, name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) + offset
    return None


def _expired(job: Job, request: Any) -> bool:
    expiry = _expiry(job, request)
    return expiry is not None and time.time() > expiry


# Flow control ----------------------------------------------------------------------------------

_store: tuple[int, tuple[redis.Redis, Keys] | None] | None = None


def _flow_store(producer: Any = None) -> tuple[redis.Redis, Keys] | None:
    """The Redis (and key prefix) that holds flow control: the producer's broker when it is
    this service's transport, else the configured broker; None when that is not Redis."""
    channel = getattr(producer, "channel", None)
    if channel is not None and isinstance(getattr(channel, "keys", None), Keys):
        return channel.plain_client, channel.keys
    global _store
    if _store is None or _store[0] != os.getpid():
        client = broker_client()
        options = celery_app.conf.broker_transport_options or {}
        prefix = str(options.get("global_keyprefix") or "")
        _store = (os.getpid(), (client, Keys(prefix)) if client is not None else None)
    return _store[1]


def _claim_unique(prepared: Prepared, producer: Any = None) -> str | None:
    """Claim the job's unique key for this call; the holder's task id if another job has it."""
    job = prepared.job
    assert job.unique_for is not None
    part = flow.key_part(job.name, job.unique_key, prepared.args, prepared.kwargs)
    if part is None or capture is not None:
        return None
    store = _flow_store(producer)
    if store is None:
        logger.warning("%s: unique_for needs a Redis broker; enqueued without it", job.name)
        return None
    client, keys = store
    key, txn_key = keys.unique + part, keys.unique_txn + part
    session = open_session()
    transaction = "" if session is None else str(session.scalar(text("SELECT txid_current()")))
    claim = flow.claim_unique(client, key, txn_key, prepared.task_id, job.unique_for, transaction)
    holder = claim.holder
    if (
        holder != prepared.task_id
        and claim.transaction is not None
        and _never_committed(claim.transaction)
        and flow.take_over_unique(
            client, key, txn_key, claim, prepared.task_id, job.unique_for, transaction
        )
    ):
        logger.warning(
            "unique key %s of %s was held by job %s, whose enqueuing transaction never "
            "committed (its process died first); job %s takes it",
            part,
            job.name,
            claim.holder,
            prepared.task_id,
            extra={"job": job.name, "task_id": prepared.task_id, "event": "unique_taken_over"},
        )
        holder = prepared.task_id
    if holder != prepared.task_id:
        logger.info(
            "job not enqueued %s: job %s with the same unique key (%s) is queued, scheduled "
            "or running",
            job.name,
            holder,
            part,
            extra={"job": job.name, "task_id": holder, "event": "unique_refused"},
        )
        metrics = instrumentation.metrics()
        metrics.incr(f"jobs.{job.name.removeprefix('jobs.')}.refused")
        metrics.incr("jobs.flow.refused")
        return holder
    prepared.options["headers"][UNIQUE_HEADER] = key
    task_id = prepared.task_id

    def undo() -> None:  # the transaction that enqueued it rolled back: no job, no key
        flow.release_unique(client, key, task_id)

    after_rollback(undo)
    return None


def _never_committed(transaction: str) -> bool:
    """Whether PostgreSQL reports the transaction `transaction` (a txid) aborted: it ended
    without a commit, by a rollback or because its session died. In progress or committed, or
    not known (a txid older than PostgreSQL keeps the status of), it is not. Asked on a
    connection of its own: an error must not abort the caller's transaction."""
    query = text("SELECT txid_status(CAST(:txid AS bigint))")
    try:
        with get_engine().connect() as connection:
            status = connection.scalar(query, {"txid": transaction})
    except (DBAPIError, ValueError):
        logger.debug("could not read the status of transaction %s", transaction, exc_info=True)
        return False
    return bool(status == "aborted")


def _release_unique(prepared: Prepared) -> None:
    key = prepared.options.get("headers", {}).get(UNIQUE_HEADER)
    if key:
        _release_unique_key(key, prepared.task_id)


def _release_unique_key(key: str, task_id: str) -> None:
    store = _flow_store()
    if store is None:
        return
    try:
        flow.release_unique(store[0], key, task_id)
    except redis.RedisError:  # the key's TTL releases it
        logger.warning("could not release unique key %s of %s", key, task_id, exc_info=True)


def _admission(payload: Mapping[str, Any], keys: Keys) -> tuple[str, list[flow.Control]] | None:
    """flow.admission: the limits a delivered message is under (the worker's main process)."""
    headers = payload.get("headers") or {}
    name = headers.get("task")
    body = None
    if not isinstance(name, str):  # protocol 1 names the task in the body
        body = decoded_body(payload)
        name = body.get("task") if isinstance(body, dict) else None
    job = celery_app.tasks.get(name) if isinstance(name, str) else None
    if not isinstance(job, Job) or (job.limits_concurrency is None and job.flow_rate is None):
        return None
    body = decoded_body(payload) if body is None else body
    if isinstance(body, dict):
        args, kwargs, task_id = body.get("args") or (), body.get("kwargs") or {}, body.get("id")
    else:
        args, kwargs, task_id = body[0], body[1], headers.get("id")
    limit, rate = job.limits_concurrency, job.flow_rate
    controls = flow.controls_for(job.name, limit, rate, keys, args, kwargs)
    return (str(task_id), controls) if controls else None


flow.admission = _admission


def _publish(prepared: Prepared, producer: Any = None, **extra: Any) -> AsyncResult:
    return CeleryTask.apply_async(  # (Celery's publish: the job layer's checks are done)
        prepared.job,
        prepared.args,
        prepared.kwargs,
        prepared.task_id,
        producer=producer,
        **prepared.options,
        **extra,
    )


def _scheduled_time(options: Mapping[str, Any], now: float) -> float:
    eta = options.get("eta")
    if eta is not None and hasattr(eta, "timestamp"):
        return float(eta.timestamp())
    return now + float(options.get("countdown") or 0)


def _header(request: Any, name: str) -> Any:
    # A worker puts message headers on the request; an eager apply() keeps them in .headers.
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _delivered_queue(request: Any) -> str | None:
    info = getattr(request, "delivery_info", None) or {}
    # (A job that waited in RabbitMQ's delay queues arrives under a key prefixed with its delay.)
    return rabbitmq.undelayed_routing_key(info.get("routing_key") or "") or None


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


# Batches (app.jobs.batches) -------------------------------------------------------------------


_batches_module: Any = None


def _batches() -> Any:
    global _batches_module
    if _batches_module is None:  # (imported late: app.jobs.batches imports this module)
        from app.jobs import batches

        _batches_module = batches
    return _batches_module


def _batch_collects(prepared: Sequence[Prepared]) -> bool:
    return bool(_batches().collecting(prepared))


def _batch_of(request: Any) -> int | None:
    value = _header(request, BATCH_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and not request.is_eager:
        return value
    return None


def _batch_member_done(
    batch: int | None, request: Any, dead: bool = False, raising: bool = True
) -> None:
    if batch is None or not request.id:
        return
    try:
        _batches().job_finished(batch, request.id, dead=dead)
    except Exception:
        if raising:
            raise
        logger.exception("could not count job %s as dead in batch %d", request.id, batch)


def _batch_member_failed(batch: int | None, request: Any) -> None:
    if batch is None or not request.id:
        return
    try:
        _batches().job_failed(batch, request.id)
    except Exception:  # only the `failed` figure: the retry goes ahead
        logger.warning("could not count a failure of %s in batch %d", request.id, batch)


def enqueue_prepared(prepared: Sequence[Prepared], producer: Any = None) -> None:
    """Enqueue checked jobs under the enqueue-after-commit contract: through the outbox inside
    an open `session_scope`, after its commit while a test captures, else at once (releasing
    their unique keys if that publish fails)."""

    def deliver() -> None:
        _deliver(prepared, producer)

    if not _through_outbox(prepared, producer) and not after_commit(deliver):
        try:
            deliver()
        except BaseException:
            for item in prepared:
                _release_unique(item)
            raise


class Enqueued(Sequence[AsyncResult]):
    """What `perform_all_later` returns: the jobs' results in call order, each made when it is
    first read (a list of 10,000 AsyncResults cost a sixth of a bulk enqueue), and `ids`, the
    task ids, which is all most callers need."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> AsyncResult: ...
    @overload
    def __getitem__(self, index: slice) -> list[AsyncResult]: ...
    def __getitem__(self, index: int | slice) -> AsyncResult | list[AsyncResult]:
        if isinstance(index, slice):
            return [celery_app.AsyncResult(task_id) for task_id in self.ids[index]]
        return celery_app.AsyncResult(self.ids[index])

    def __repr__(self) -> str:
        return f"<Enqueued {len(self.ids)} job(s)>"


def perform_all_later(signatures: Iterable[Signature]) -> Enqueued:
    """Enqueue many jobs with few broker round trips (ActiveJob 7.1, Sidekiq's push_bulk).

    Every call is checked before any is published; inside an open `session_scope` the whole
    set is published after the commit. As with Sidekiq's push_bulk, the caller gets the task
    ids (`.ids`; each item is the job's AsyncResult, made on access) and the jobs' return
    values are not kept (no result-backend round trips per job).
    """
    with _collector_paused():
        return _perform_all_later(signatures)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a bulk call runs (as json and pickle
    loaders do): the call keeps every job it makes until it has published them all, and the
    collector's passes over those live objects, none of them garbage, took a tenth of the
    call's time. Garbage made meanwhile (by the caller's generator, say) is collected once it
    returns. Left alone if the collector is off already (another thread's bulk call)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _perform_all_later(signatures: Iterable[Signature]) -> Enqueued:
    prepared = []
    tasks = celery_app.tasks
    # Task ids drawn and the clock read once per few jobs, not once per job: 16 at first (a
    # call of a few jobs draws no more ids than that), four times as many each time after,
    # up to BULK_BATCH_SIZE.
    fresh: list[str] = []
    draw = 4
    stamped_at = 0.0
    for signature in signatures:
        # (A Signature is a dict: .get is what its .task, .args... properties do, at a third
        # of the cost.)
        job = tasks.get(signature.get("task")) if isinstance(signature, Signature) else None
        if not isinstance(job, Job):
            raise TypeError(f"perform_all_later takes job signatures, got {signature!r}")
        if not fresh:
            draw = min(4 * draw, BULK_BATCH_SIZE)
            fresh = random_uuids(draw)
            stamped_at = time.time()
        options = {"ignore_result": True, **(signature.get("options") or {})}
        task_id = options.pop("task_id", None) or fresh.pop()
        args, kwargs = signature.get("args"), signature.get("kwargs")
        prepared.append(job.prepare(args, kwargs, task_id, stamped_at=stamped_at, **options))
    ids = [p.task_id for p in prepared]
    if any(p.job.unique_for is not None for p in prepared):
        claimed = []
        for index, item in enumerate(prepared):
            holder = _claim_unique(item) if item.job.unique_for is not None else None
            if holder is None:
                claimed.append(item)
            else:
                ids[index] = holder
        prepared = claimed
    if prepared and _batch_collects(prepared):
        return Enqueued(ids)

    if prepared:
        enqueue_prepared(prepared)
    return Enqueued(ids)


def _through_outbox(prepared: Sequence[Prepared], producer: Any = None) -> bool:
    """Inside an open `session_scope`, write the jobs to the outbox in its transaction and
    publish them once it commits (app.delivery.outbox); False, and nothing done, outside one
    (or while a test captures jobs)."""
    session = open_session()
    if session is None or capture is not None:
        return False
    rows = []
    for item in prepared:
        options = dict(item.options)
        if options.get("countdown") is not None:  # fixed now: the relay may publish later
            due = _scheduled_time(options, time.time())
            options.pop("countdown")
            options["eta"] = dt.datetime.fromtimestamp(due, dt.UTC)
        try:
            payload = kombu_json.dumps(
                {"args": list(item.args), "kwargs": item.kwargs, "options": options}
            )
        except TypeError as exc:
            raise TypeError(f"{item.job.name}: cannot be kept in the outbox: {exc}") from exc
        rows.append({"task_id": item.task_id, "job_name": item.job.name, "payload": payload})
    ids = outbox.write(session, rows)
    after_commit(lambda: _publish_committed(ids, prepared, producer))
    return True


def _publish_committed(ids: Sequence[int], prepared: Sequence[Prepared], producer: Any) -> None:
    """The fast path: publish what the transaction committed, then delete its outbox rows.
    A failure is not the caller's: the rows stay, and a worker's relay publishes them."""
    try:
        _deliver(prepared, producer)
    except Exception as exc:
        logger.warning(
            "could not publish %d job(s) after the commit (%s: %s); they are safe in the "
            "outbox and a worker's relay will publish them",
            len(prepared),
            type(exc).__name__,
            exc,
            extra={"event": "outbox_deferred", "jobs": len(prepared)},
        )
        return
    try:
        outbox.forget(ids)
    except Exception as exc:  # published: the relay may publish them again (same task ids)
        logger.warning(
            "published %d job(s) but could not delete their outbox rows (%s); a relay will "
            "publish them again under the same task ids",
            len(ids),
            exc,
        )


def publish_outbox_rows(rows: Sequence[outbox.Row]) -> None:
    """Publish rows of the outbox (the relay): jobs through the job layer's bulk path, any
    other task name with `send_task`. Raises if the broker refuses, leaving them."""
    prepared = []
    for row in rows:
        payload = kombu_json.loads(row.payload)
        options = dict(payload.get("options") or {})
        for name in ("link", "link_error"):
            if options.get(name):
                options[name] = maybe_signature(options[name], app=celery_app)
        job = celery_app.tasks.get(row.job_name)
        if isinstance(job, Job):
            prepared.append(
                Prepared(job, tuple(payload["args"]), payload["kwargs"], row.task_id, options)
            )
        else:  # no longer a job here (renamed in a deploy): by name, as any producer would
            celery_app.send_task(
                row.job_name, payload["args"], payload["kwargs"], task_id=row.task_id, **options
            )
    if prepared:
        _deliver(prepared)


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
            bulk = BulkPublish.start(batch_producer, prepared)
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


def job(
    name: str,
    *,
    queue_as: str | QueueChooser = DEFAULT_QUEUE,
    retry_on: Sequence[RetryOn] = (),
    discard_on: Sequence[DiscardOn] = (),
    redact: Sequence[str] = (),
    around_perform: Sequence[AroundPerform] = (),
    unique_for: float | None = None,
    unique_key: Callable[..., Any] | None = None,
    limits_concurrency: Limit | None = None,
    rate_limit: Rate | str | None = None,
    expires_in: float | None = None,
    continuable: bool = False,
    max_resumptions: int | None = None,
    **task_options: Any,
) -> Callable[[F], Job]:
    """Declare a function as a job registered under the stable name `jobs.<snake_case>`.

    Flow control, across every worker (app.delivery.flow; needs a Redis broker):
    `unique_for=seconds` (with `unique_key=callable(*args, **kwargs)`, else one per job name),
    `limits_concurrency=Limit(to, key, duration)`, `rate_limit=Rate(limit, per, key)` (a string
    such as "10/m" is Celery's own per-worker limit), `expires_in=seconds`.

    Continuations (app.jobs.continuable): `continuable=True` lets the body run `step(...)`s
    that checkpoint their cursor and resume after a shutdown or crash; `max_resumptions` bounds
    how often a shutdown may stop and requeue it (default 100).
    """
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
    _check_flow(name, unique_for, unique_key, limits_concurrency, rate_limit, expires_in)
    if max_resumptions is not None and not continuable:
        raise JobDeclarationError(f"{name}: max_resumptions needs continuable=True")
    if max_resumptions is not None and (
        not isinstance(max_resumptions, int)
        or isinstance(max_resumptions, bool)
        or max_resumptions < 0
    ):
        raise JobDeclarationError(
            f"{name}: max_resumptions must be a whole number >= 0, got {max_resumptions!r}"
        )
    if isinstance(rate_limit, str):  # Celery's own, per worker
        task_options["rate_limit"] = rate_limit
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
            unique_for=unique_for,
            unique_key=staticmethod(unique_key) if unique_key is not None else None,
            limits_concurrency=limits_concurrency,
            flow_rate=rate_limit if isinstance(rate_limit, Rate) else None,
            expires_in=expires_in,
            continuable=continuable,
            max_resumptions=(
                DEFAULT_MAX_RESUMPTIONS if max_resumptions is None else max_resumptions
            ),
            **task_options,
        )(func)
        return task  # type: ignore[no-any-return]

    return declare


def _check_flow(
    name: str,
    unique_for: Any,
    unique_key: Any,
    limit: Any,
    rate: Any,
    expires_in: Any,
) -> None:
    for label, value in (("unique_for", unique_for), ("expires_in", expires_in)):
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e9
        ):
            raise JobDeclarationError(f"{name}: {label} must be positive seconds, got {value!r}")
    if unique_key is not None and not callable(unique_key):
        raise JobDeclarationError(f"{name}: unique_key must be a callable, got {unique_key!r}")
    if unique_key is not None and unique_for is None:
        raise JobDeclarationError(f"{name}: unique_key needs unique_for (how long the key holds)")
    if limit is not None and not isinstance(limit, Limit):
        raise JobDeclarationError(f"{name}: limits_concurrency must be a Limit, got {limit!r}")
    if rate is not None and not isinstance(rate, Rate | str):
        raise JobDeclarationError(f"{name}: rate_limit must be a Rate (or Celery's string)")
