"""The job's thread notes its log context and deadlines itself (app.running), without Celery's
task_prerun / task_postrun signals, which then are not sent at all."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, Task, signals

from app import celery, running, threads
from app.jobs.base import job
from app.logs import CORRELATION_HEADER, JobContext, current_correlation_id

SEEN: list[tuple[str, Any, Any]] = []


def _context(where: str) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, where, (), None)
    JobContext().filter(record)
    SEEN.append((where, getattr(record, "job", None), getattr(record, "correlation_id", None)))


@job("jobs.test_running_inner")
def inner() -> None:
    _context("inner")


@job("jobs.test_running_outer")
def outer() -> None:
    _context("outer before")
    inner.apply(throw=True)  # (perform_now's way in: an eager run inline)
    _context("outer after")


@celery.task(name="tests.running_plain")
def plain() -> None:
    _context("plain")


STACKS: list[tuple[str, int, bool]] = []


def _stack(where: str, task: Any) -> None:
    request = task.request
    STACKS.append((where, len(task.request_stack.stack), request.called_directly))


@celery.task(name="tests.running_plain_stack", bind=True)
def plain_stack(self: Any, depth: int) -> None:
    _stack(f"plain {depth}", self)
    if depth:
        plain_stack(depth - 1)  # inline: its own request, called directly


@job("jobs.test_running_stack")
def job_stack() -> None:
    _stack("job", job_stack)
    plain_stack(0)


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    SEEN.clear()
    yield
    assert running._entered == {}  # nothing is left noted after a run


def test_a_job_notes_its_context_and_an_inline_job_keeps_the_outer_ones() -> None:
    outer.apply(headers={CORRELATION_HEADER: "req-9"}, throw=True)

    assert SEEN == [
        ("outer before", "jobs.test_running_outer", "req-9"),
        ("inner", "jobs.test_running_outer", "req-9"),
        ("outer after", "jobs.test_running_outer", "req-9"),
    ]
    _context("caller")  # an eager run leaves nothing in its caller's thread
    assert SEEN[-1] == ("caller", None, None)
    assert current_correlation_id.get() is None


def test_a_plain_task_of_the_app_notes_its_context_too() -> None:
    plain.apply(throw=True)
    _context("caller")
    assert SEEN == [("plain", "tests.running_plain", None), ("caller", None, None)]


def test_the_log_context_outlives_the_call_until_the_outcome_is_logged() -> None:
    """In a worker, Celery logs "succeeded" (or the failure) after `__call__` returns: the
    context is still there, and `after_return` then clears it."""
    request = SimpleNamespace(id="t-1", is_eager=False, headers={CORRELATION_HEADER: "c-1"})
    entered = running.enter(outer, request)
    running.leave(entered, eager=False)
    _context("celery's success line")
    running.outcome_logged()
    _context("after")
    assert SEEN == [
        ("celery's success line", "jobs.test_running_outer", "c-1"),
        ("after", None, None),
    ]


def test_deadlines_are_noted_on_entry_and_forgotten_on_leaving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(threads, "_watchdog", threading.current_thread())  # "a watchdog runs"
    request = SimpleNamespace(id="t-2", is_eager=False, headers={}, timelimit=(30, 20))
    monkeypatch.setattr(type(outer), "request", property(lambda self: request), raising=False)
    ident = threading.get_ident()

    entered = running.enter(outer, request)
    noted = threads._running.get(ident)
    running.leave(entered, eager=False)
    running.outcome_logged()

    assert noted is not None and (noted.task_id, noted.name) == ("t-2", outer.name)
    assert noted.soft_at is not None and noted.hard_at is not None
    assert round(noted.hard_at - noted.soft_at) == 10
    assert ident not in threads._running


def _receivers() -> set[Any]:
    return {id(r) for r in signals.task_prerun.receivers + signals.task_postrun.receivers}


def test_the_signals_are_connected_only_for_a_task_of_another_class() -> None:
    before = _receivers()
    running.connect_signals_if_needed(SimpleNamespace(app=celery))
    assert _receivers() == before  # the app's tasks all note their own: Celery sends nothing
    assert not signals.task_prerun.receivers and not signals.task_postrun.receivers

    other = Celery("other", set_as_current=False)
    other.conf.task_always_eager = False

    @other.task(name="tests.running_foreign", base=Task)
    def foreign() -> None:
        _context("foreign")

    running.connect_signals_if_needed(SimpleNamespace(app=other))
    try:
        assert signals.task_prerun.receivers and signals.task_postrun.receivers
        foreign.apply(throw=True)
    finally:
        signals.task_prerun.disconnect(dispatch_uid="running-prerun")
        signals.task_postrun.disconnect(dispatch_uid="running-postrun")
    _context("caller")
    assert SEEN == [("foreign", "tests.running_foreign", None), ("caller", None, None)]


def test_a_limit_exception_at_the_end_of_a_job_leaves_its_thread_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watchdog's exception can arrive as the job's call ends: the thread's next job is
    still noted as its own, not taken for an inline call inside a job that never ends."""
    from celery.exceptions import SoftTimeLimitExceeded

    def cut_short(task_id: str = "", **_: Any) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(threads, "_watchdog", threading.current_thread())  # "a watchdog runs"
    ident = threading.get_ident()
    request = SimpleNamespace(id="t-3", is_eager=False, headers={})
    entered = running.enter(outer, request)
    finish = threads.job_finished
    monkeypatch.setattr(threads, "job_finished", cut_short)
    with pytest.raises(SoftTimeLimitExceeded):
        running.leave(entered, eager=False)
    monkeypatch.setattr(threads, "job_finished", finish)
    running.outcome_logged()
    assert running._entered == {}
    assert threads._running[ident].task_id == "t-3"  # its deadlines were not forgotten

    next_job = SimpleNamespace(id="t-4", is_eager=False, headers={})
    assert running.enter(inner, next_job) is True
    _context("next job")
    noted = threads._running[ident]
    running.leave(True, eager=False)
    running.outcome_logged()
    assert SEEN == [("next job", "jobs.test_running_inner", None)]
    assert noted.task_id == "t-4"  # the next job's deadlines replace the stale ones
    assert ident not in threads._running


def test_the_tracer_runs_the_body_under_its_own_request_and_an_inline_call_pushes_one() -> None:
    """Celery's tracer pushes the request; the app's tasks run their body under it, as the
    tracer runs a task with no `__call__` of its own (Celery's `__call__` would push a second
    copy). A call inline in the body goes through Celery's `__call__`: a request of its own."""
    STACKS.clear()
    plain_stack.apply(args=[1], throw=True)
    job_stack.apply(throw=True)
    assert STACKS == [
        ("plain 1", 1, False),
        ("plain 0", 2, False),  # (Celery's copy of the task's request it runs in)
        ("job", 1, False),
        ("plain 0", 1, True),
    ]
