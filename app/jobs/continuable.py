"""Continuations, after ActiveJob 8.1's `Continuable`: a job in steps that stops at a
checkpoint when its worker shuts down and resumes there, and never runs a completed step again.

    @job("jobs.large_data_process", continuable=True, max_resumptions=100)
    def large_data_process(dataset_id: RowId) -> None:
        step("process", lambda s: process_batches(s, dataset_id))

    def process_batches(s: Step, dataset_id: int) -> None:
        while True:
            with s.checkpoint() as session:  # one transaction
                batch = datasets.process_next_batch(session, dataset_id)
                s.advance(batch.cursor)  # committed with the batch
            if batch.completed:
                return

Progress lives in `job_continuations` under the job's task id (retries, the requeue and the
redelivery after a crash keep it): the completed steps, the current step and its cursor. A
checkpoint writes the cursor in the transaction of the work it covers, so after a SIGKILL the
job resumes after the last committed checkpoint and redoes nothing committed. After each
checkpoint's commit, if the worker is shutting down (app.shutdown), the job enqueues itself
again (same task id, same queue, through the outbox in the transaction that counts the
resumption) and ends this execution; its message is acknowledged. Past `max_resumptions`
it fails instead (ResumptionLimitExceeded, dead-lettered).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import fields
from typing import Any, Protocol, TypeVar

from celery.exceptions import Ignore
from sqlalchemy.orm import Session

from app import shutdown
from app.db import session_scope
from app.services import continuations
from app.services.continuations import Progress

logger = logging.getLogger("app.jobs")

#: How often a job may stop for a shutdown and be enqueued again, unless it says otherwise.
DEFAULT_MAX_RESUMPTIONS = 100

T = TypeVar("T")


class ContinuationError(Exception):
    """A continuable job used its steps wrongly (out of order, twice, outside a checkpoint)."""


class ResumptionLimitExceeded(Exception):
    """The job stopped for a shutdown more often than its `max_resumptions` allows."""


class Interrupted(Exception):
    """Raised at a checkpoint of a stopping worker, or of an execution that has used half its
    soft time limit; `running` turns it into the requeue."""

    def __init__(self, shutdown: bool) -> None:
        super().__init__("shutdown" if shutdown else "time slice")
        self.shutdown = shutdown


class JobInterrupted(Ignore):  # type: ignore[misc]
    """The execution ended at a checkpoint and the job was enqueued again: Celery acknowledges
    the message and records no state (as for `Task.replace`)."""

    outcome = "interrupted"


class Store(Protocol):
    """Where progress is kept (the database; unit tests use one in memory)."""

    def load(self, task_id: str) -> Progress | None:
        """The saved progress of `task_id`, if any."""

    def transaction(self, progress: Progress) -> AbstractContextManager[Session]:
        """One transaction whose commit also saves `progress` as it is when the block ends."""

    def finish(self, progress: Progress) -> None:
        """Mark the job finished (its steps never run again) and prune old continuations."""


class DatabaseStore:
    """`job_continuations`, written in the transaction of the work each checkpoint covers."""

    def load(self, task_id: str) -> Progress | None:
        with session_scope() as session:
            return continuations.load(session, task_id)

    @contextmanager
    def transaction(self, progress: Progress) -> Iterator[Session]:
        with session_scope() as session:
            yield session
            continuations.save(session, progress)

    def finish(self, progress: Progress) -> None:
        progress.finished = True
        with session_scope() as session:
            continuations.save(session, progress)
            continuations.prune(session)


#: The store every continuation uses (tests replace it).
store: Store = DatabaseStore()

_current: ContextVar[Continuation | None] = ContextVar("continuation", default=None)


class Step:
    """One step of a running continuation: its cursor and its checkpoints."""

    def __init__(self, continuation: Continuation, name: str, resumed: bool) -> None:
        self.name = name
        #: True when an earlier execution started this step (its cursor is where it got to).
        self.resumed = resumed
        self._continuation = continuation
        self._open = False

    @property
    def cursor(self) -> Any:
        """The cursor of the last checkpoint (None before the step's first one)."""
        return self._continuation.progress.cursor

    @contextmanager
    def checkpoint(self) -> Iterator[Session]:
        """One transaction of the step's work; the cursor given to `advance` commits with it.

        After the commit, a worker that is shutting down stops the job here and enqueues it
        again; an error rolls back the work and the cursor together.
        """
        if self._open:
            raise ContinuationError(f"step {self.name!r}: checkpoints do not nest")
        self._open = True
        try:
            with self._continuation.saving() as session:
                yield session
        finally:
            self._open = False
        self._continuation.stop_if_stopping()

    def advance(self, cursor: Any) -> None:
        """Set the cursor the open checkpoint commits (any JSON value)."""
        if not self._open:
            raise ContinuationError(
                f"step {self.name!r}: advance() belongs inside `with step.checkpoint()`, so the "
                "cursor commits with the work it covers"
            )
        try:
            json.dumps(cursor)
        except (TypeError, ValueError) as exc:
            raise ContinuationError(f"step {self.name!r}: a cursor is JSON: {exc}") from None
        self._continuation.progress.cursor = cursor


class Continuation:
    """The steps of one execution of a continuable job, and the progress they save."""

    def __init__(
        self,
        job_name: str,
        progress: Progress,
        max_resumptions: int,
        time_slice: float | None = None,
    ) -> None:
        self.job_name = job_name
        #: When this execution stops at a checkpoint to be enqueued again (monotonic clock),
        #: so it never reaches its soft time limit; None: never.
        self.slice_ends = None if time_slice is None else time.monotonic() + time_slice
        self.progress = progress
        self.max_resumptions = max_resumptions
        self._reached: list[str] = []
        self._ran = False  # whether this execution has run a step yet

    def step(self, name: str, run: Callable[[Step], T]) -> T | None:
        """Run `run(step)` unless an earlier execution completed the step; None if skipped."""
        progress = self.progress
        if name in self._reached:
            raise ContinuationError(f"{self.job_name}: step {name!r} is declared twice")
        index = len(self._reached)
        self._reached.append(name)
        if index < len(progress.completed_steps):
            if progress.completed_steps[index] != name:
                raise ContinuationError(
                    f"{self.job_name}: step {name!r} came where the completed step "
                    f"{progress.completed_steps[index]!r} was; steps must come in the same "
                    "order on every run"
                )
            return None  # completed before: never again
        if progress.finished:
            return None  # (a step added after this job finished)
        resumed = progress.current_step == name
        if progress.current_step is not None and not resumed:
            raise ContinuationError(
                f"{self.job_name}: resuming step {progress.current_step!r}, but the job "
                f"reached {name!r} first; steps must come in the same order on every run"
            )
        if self._ran:  # the boundary between two steps is a checkpoint too
            self.stop_if_stopping()
        self._ran = True
        if not resumed:
            progress.current_step, progress.cursor = name, None
        result = run(Step(self, name, resumed))
        with self.saving():
            progress.completed_steps.append(name)
            progress.current_step, progress.cursor = None, None
        return result

    @contextmanager
    def saving(self) -> Iterator[Session]:
        """A transaction that saves the progress; on rollback the progress is as it was."""
        before = self.progress.copy()
        try:
            with store.transaction(self.progress) as session:
                yield session
        except BaseException:
            for item in fields(Progress):
                setattr(self.progress, item.name, getattr(before, item.name))
            raise

    def stop_if_stopping(self) -> None:
        """At a committed checkpoint: end the execution here if the worker is shutting down
        or the execution has used its time slice."""
        if shutdown.stopping():
            raise Interrupted(shutdown=True)
        if self.slice_ends is not None and time.monotonic() >= self.slice_ends:
            raise Interrupted(shutdown=False)


def step(name: str, run: Callable[[Step], T]) -> T | None:
    """Run a step of the current continuable job (see the module's docstring)."""
    continuation = _current.get()
    if continuation is None:
        raise ContinuationError(
            f"step {name!r} outside a continuable job: declare it @job(..., continuable=True)"
        )
    return continuation.step(name, run)


@contextmanager
def running(
    job_name: str,
    task_id: str,
    max_resumptions: int,
    requeue: Callable[[], None],
    time_slice: float | None = None,
) -> Iterator[Continuation]:
    """Around one execution of a continuable job: load its progress, resume it, and on a
    shutdown's checkpoint requeue it (`requeue` enqueues the same task id) or give up.

    After `time_slice` seconds the execution also stops at its next checkpoint and is
    enqueued again (not counted as a resumption): a long walk never reaches its time limit.
    """
    progress = store.load(task_id) or Progress(task_id, job_name)
    continuation = Continuation(job_name, progress, max_resumptions, time_slice)
    extra = {"job": job_name, "task_id": task_id}
    if progress.finished:
        logger.info("job %s[%s] finished before: no step runs again", job_name, task_id)
    elif progress.completed_steps or progress.current_step is not None:
        logger.info(
            "job resumed %s[%s] after steps %s at step %s cursor %s (resumptions %d)",
            job_name,
            task_id,
            progress.completed_steps,
            progress.current_step,
            json.dumps(progress.cursor),
            progress.resumptions,
            extra={**extra, "event": "resumed", "step": progress.current_step},
        )
    token = _current.set(continuation)
    try:
        yield continuation
    except Interrupted as stop:
        where = f"step {progress.current_step} cursor {json.dumps(progress.cursor)}"
        if not stop.shutdown:
            with continuation.saving():
                requeue()
            logger.info(
                "job %s[%s] used its time slice (%g s) at %s; enqueued again to go on there",
                job_name,
                task_id,
                time_slice,
                where,
                extra={**extra, "event": "sliced", "step": progress.current_step},
            )
            raise JobInterrupted(f"time slice over at {where}; enqueued again") from None
        if progress.resumptions >= max_resumptions:
            raise ResumptionLimitExceeded(
                f"{job_name}[{task_id}] stopped for a shutdown {progress.resumptions + 1} "
                f"times, more than its max_resumptions ({max_resumptions}); not enqueued "
                f"again (its progress is kept: {where})"
            ) from None
        with continuation.saving():
            progress.resumptions += 1
            requeue()  # through the outbox: published once this transaction commits
        logger.info(
            "job interrupted %s[%s] by the worker's shutdown at %s; enqueued again to resume "
            "there (resumption %d of %d)",
            job_name,
            task_id,
            where,
            progress.resumptions,
            max_resumptions,
            extra={**extra, "event": "interrupted", "step": progress.current_step},
        )
        raise JobInterrupted(f"stopped at {where}; enqueued again") from None
    else:
        if not progress.finished:
            store.finish(progress)
    finally:
        _current.reset(token)
