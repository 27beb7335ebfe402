"""Continuations' API (app.jobs.continuable), with progress kept in memory instead of the
database: step order, completed steps skipped, the cursor kept, the stop at a checkpoint of a
stopping worker, and the bound on resumptions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
from celery.utils import uuid
from sqlalchemy.orm import Session

from app import shutdown
from app.jobs import continuable
from app.jobs.base import job
from app.jobs.continuable import ContinuationError, ResumptionLimitExceeded, Step, step
from app.jobs.errors import JobDeclarationError
from app.jobs.policies import RetryOn
from app.jobs.testing import EnqueuedJobs
from app.services.continuations import Progress


class MemoryStore:
    """Progress saved at each transaction's end, as the database store commits it."""

    def __init__(self) -> None:
        self.saved: dict[str, Progress] = {}

    def load(self, task_id: str) -> Progress | None:
        found = self.saved.get(task_id)
        return found.copy() if found else None

    @contextmanager
    def transaction(self, progress: Progress) -> Iterator[Session]:
        yield cast(Session, None)  # the test steps write nothing else
        self.saved[progress.task_id] = progress.copy()

    def finish(self, progress: Progress) -> None:
        progress.finished = True
        self.saved[progress.task_id] = progress.copy()


class Hiccup(Exception):
    """Raised once by a step after it made progress; retried at once."""


#: What the steps did, in order: ("a",), ("walk", item), ("c",).
ran: list[tuple[Any, ...]] = []
#: Per run: the item at which `walk` raises Hiccup (once) and at which the worker "stops".
PLAN: dict[str, Any] = {}


@job(
    "jobs.test_three_steps",
    continuable=True,
    max_resumptions=2,
    retry_on=[RetryOn(Hiccup, wait=1, attempts=3, jitter=0)],
)
def three_steps(items: int) -> int:
    step("a", lambda s: first(s))
    step("walk", lambda s: walk(s, items))
    step("c", lambda s: ran.append(("c",)))
    return len(ran)


def first(s: Step) -> None:
    ran.append(("a",))
    if PLAN.pop("stop_in_a", False):
        shutdown.announce()  # a step without checkpoints: the job stops before the next


def walk(s: Step, items: int) -> None:
    PLAN.setdefault("cursors_seen", []).append((s.cursor, s.resumed))
    start = 0 if s.cursor is None else s.cursor + 1
    for item in range(start, items):
        with s.checkpoint():
            ran.append(("walk", item))
            if PLAN.get("fail_at") == item:
                PLAN.pop("fail_at")
                raise Hiccup(f"after item {item - 1}, during {item}")
            s.advance(item)
            if PLAN.get("stop_after") == item:
                PLAN.pop("stop_after")
                shutdown.announce()  # SIGTERM reaches the worker while this batch commits


@pytest.fixture(autouse=True)
def memory_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryStore]:
    store = MemoryStore()
    monkeypatch.setattr(continuable, "store", store)
    ran.clear()
    PLAN.clear()
    shutdown.reset()
    yield store
    shutdown.reset()


def run(task_id: str, items: int = 5, **options: Any) -> Any:
    return three_steps.apply([items], task_id=task_id, throw=True, **options).get()


def test_steps_run_in_order_each_once_and_the_job_is_marked_finished(
    memory_store: MemoryStore,
) -> None:
    task_id = uuid()
    assert run(task_id, items=3) == 5
    assert ran == [("a",), ("walk", 0), ("walk", 1), ("walk", 2), ("c",)]
    saved = memory_store.saved[task_id]
    assert (saved.completed_steps, saved.finished) == (["a", "walk", "c"], True)


def test_a_finished_job_delivered_again_runs_no_step(memory_store: MemoryStore) -> None:
    task_id = uuid()
    run(task_id, items=2)
    ran.clear()
    run(task_id, items=2)
    assert ran == []


def test_a_step_that_raises_resumes_from_its_last_cursor_and_completed_steps_are_skipped(
    memory_store: MemoryStore, enqueued_jobs: EnqueuedJobs
) -> None:
    task_id = uuid()
    PLAN["fail_at"] = 3

    assert run(task_id) is None  # the retry is enqueued
    saved = memory_store.saved[task_id]
    assert (saved.completed_steps, saved.current_step, saved.cursor) == (["a"], "walk", 2)
    [retry] = enqueued_jobs.jobs
    assert retry.task_id == task_id

    enqueued_jobs.perform_enqueued_jobs()
    # The failed item 3 rolled back with its cursor, so it runs again; 0-2 and "a" do not.
    walked = [("walk", i) for i in (0, 1, 2, 3, 3, 4)]
    assert ran == [("a",), *walked, ("c",)]
    assert PLAN["cursors_seen"] == [(None, False), (2, True)]


def test_a_stopping_worker_ends_the_job_at_its_next_checkpoint_and_enqueues_it_again(
    memory_store: MemoryStore, enqueued_jobs: EnqueuedJobs
) -> None:
    task_id = uuid()
    PLAN["stop_after"] = 1

    run(task_id)

    assert ran == [("a",), ("walk", 0), ("walk", 1)]  # nothing after the checkpoint
    saved = memory_store.saved[task_id]
    assert (saved.current_step, saved.cursor, saved.resumptions) == ("walk", 1, 1)
    assert not saved.finished
    [again] = enqueued_jobs.jobs
    assert (again.task_id, list(again.args), again.queue) == (task_id, [5], "default")

    shutdown.reset()  # the next worker
    enqueued_jobs.perform_enqueued_jobs()
    assert ran[3:] == [("walk", 2), ("walk", 3), ("walk", 4), ("c",)]
    assert memory_store.saved[task_id].finished


def test_the_boundary_between_steps_is_a_checkpoint(
    memory_store: MemoryStore, enqueued_jobs: EnqueuedJobs
) -> None:
    task_id = uuid()
    PLAN["stop_in_a"] = True

    run(task_id)

    assert ran == [("a",)]
    saved = memory_store.saved[task_id]
    assert (saved.completed_steps, saved.current_step, saved.resumptions) == (["a"], None, 1)
    shutdown.reset()
    enqueued_jobs.perform_enqueued_jobs()
    walked = [("walk", i) for i in range(5)]
    assert ran == [("a",), *walked, ("c",)]


def test_past_max_resumptions_the_job_fails_with_a_clear_error_and_is_not_enqueued_again(
    memory_store: MemoryStore, enqueued_jobs: EnqueuedJobs
) -> None:
    task_id = uuid()
    memory_store.saved[task_id] = Progress(
        task_id, three_steps.name, ["a"], "walk", 1, resumptions=2
    )
    PLAN["stop_after"] = 2

    with pytest.raises(ResumptionLimitExceeded) as raised:
        run(task_id)

    assert str(raised.value) == (
        f"jobs.test_three_steps[{task_id}] stopped for a shutdown 3 times, more than its "
        "max_resumptions (2); not enqueued again (its progress is kept: step walk cursor 2)"
    )
    enqueued_jobs.assert_no_enqueued()
    assert memory_store.saved[task_id].cursor == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (lambda: (step("x", lambda s: None), step("x", lambda s: None)), "declared twice"),
        (lambda: step("x", lambda s: s.advance(1)), "belongs inside"),
        (lambda: step("x", lambda s: _checkpoint_with(s, object())), "a cursor is JSON"),
    ],
    ids=["same name twice", "advance outside a checkpoint", "cursor not JSON"],
)
def test_misused_steps_are_refused(body: Callable[[], Any], message: str) -> None:
    @job(f"jobs.test_misuse_{abs(hash(message))}", continuable=True)
    def misuse() -> None:
        body()

    with pytest.raises(ContinuationError, match=message):
        misuse.perform_now()


def _checkpoint_with(s: Step, cursor: Any) -> None:
    with s.checkpoint():
        s.advance(cursor)


def test_steps_that_come_in_another_order_than_the_saved_progress_are_refused(
    memory_store: MemoryStore,
) -> None:
    task_id = uuid()
    memory_store.saved[task_id] = Progress(task_id, three_steps.name, ["walk"], None, None)
    with pytest.raises(ContinuationError, match="came where the completed step 'walk' was"):
        run(task_id)


def test_step_outside_a_continuable_job_is_refused() -> None:
    with pytest.raises(ContinuationError, match="declare it @job"):
        step("x", lambda s: None)


def test_max_resumptions_needs_a_continuable_job_and_a_count() -> None:
    with pytest.raises(JobDeclarationError, match="needs continuable=True"):
        job("jobs.test_not_continuable", max_resumptions=3)
    with pytest.raises(JobDeclarationError, match="whole number >= 0"):
        job("jobs.test_negative", continuable=True, max_resumptions=-1)


@job("jobs.test_sliced", continuable=True, soft_time_limit=0.1, time_limit=10)
def sliced(items: int) -> None:
    def slow_walk(s: Step) -> None:
        start = 0 if s.cursor is None else s.cursor + 1
        for item in range(start, items):
            with s.checkpoint():
                time.sleep(0.02)
                ran.append(("walk", item))
                s.advance(item)

    step("walk", slow_walk)


def test_a_long_step_stops_at_a_checkpoint_after_half_its_soft_time_limit_and_goes_on(
    memory_store: MemoryStore, enqueued_jobs: EnqueuedJobs
) -> None:
    task_id = uuid()

    sliced.apply([10], task_id=task_id, throw=True).get()

    first = len(ran)
    assert 2 <= first < 10  # stopped after 0.05 s of 0.02 s checkpoints
    [again] = enqueued_jobs.jobs
    assert again.task_id == task_id
    assert memory_store.saved[task_id].resumptions == 0  # not a shutdown: not counted
    while enqueued_jobs.jobs:
        enqueued_jobs.perform_enqueued_jobs(limit=1)
    assert ran == [("walk", i) for i in range(10)]
