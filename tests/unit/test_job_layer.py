"""The job layer: per-exception retry and discard, dynamic queues, redaction, hooks, helpers.

These run jobs inline (`perform_now`) with enqueued jobs captured, so no broker or database is
needed; tests/integration/test_job_layer_worker.py shows the same policies on a real worker.
"""

from __future__ import annotations

import gc
import logging
import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Task
from celery.canvas import Signature
from celery.result import AsyncResult
from statsd import StatsClient

from app import celery
from app.db import session_scope
from app.jobs import instrumentation, policies
from app.jobs.base import EXECUTIONS_HEADER, perform_all_later, route_by_queue_as
from app.jobs.errors import DeserializationError
from app.jobs.testing import EnqueuedJobs
from tests.unit import jobs_for_tests as jobs
from tests.unit.jobs_for_tests import Flaky, Gone, Shaky, Unexpected

FLAKY = f"{Flaky.__module__}.Flaky"
SHAKY = f"{Shaky.__module__}.Shaky"


@pytest.fixture(autouse=True)
def fresh_script() -> Iterator[None]:
    jobs.SCRIPT.clear()
    jobs.RUNS.clear()
    jobs.DISCARDED.clear()
    jobs.HOOK_LOG.clear()
    policies._rng.seed(1234)
    yield


def retry_options(enqueued: EnqueuedJobs) -> list[tuple[dict[str, int], float]]:
    """(executions header, countdown) of each captured retry, in order."""
    return [
        (p.options["headers"][EXECUTIONS_HEADER], p.options["countdown"]) for p in enqueued.jobs
    ]


def test_a_job_is_a_real_celery_task_under_its_stable_name() -> None:
    assert isinstance(jobs.scripted, Task)
    assert celery.tasks["jobs.test_scripted"].name == jobs.scripted.name == "jobs.test_scripted"
    assert isinstance(jobs.scripted.s(1), Signature)


def test_a_retried_exception_is_enqueued_again_with_its_wait_and_count(
    enqueued_jobs: EnqueuedJobs,
) -> None:
    jobs.SCRIPT[:] = [Flaky]
    expected_wait = RetryWait.polynomial(executions=1, seed=1234)

    assert jobs.scripted.perform_now(5) is None

    [(executions, countdown)] = retry_options(enqueued_jobs)
    assert executions == {FLAKY: 1}
    assert countdown == pytest.approx(expected_wait)
    enqueued_jobs.assert_enqueued(jobs.scripted, args=[5], queue="default", count=1)


def test_attempts_are_counted_per_exception_class(enqueued_jobs: EnqueuedJobs) -> None:
    # Flaky twice (of 3 allowed) and Shaky once (of 2 allowed): it still gets to succeed.
    jobs.SCRIPT[:] = [Flaky, Shaky, Flaky, None]
    jobs.scripted.perform_now(5)
    seen = retry_options(enqueued_jobs)

    while enqueued_jobs.perform_enqueued_jobs(limit=1):
        seen += retry_options(enqueued_jobs)

    assert [executions for executions, _ in seen] == [
        {FLAKY: 1},
        {FLAKY: 1, SHAKY: 1},
        {FLAKY: 2, SHAKY: 1},
    ]
    assert 10 <= seen[1][1] < 11.5  # Shaky waits 10 s plus up to 15 % jitter
    assert len(jobs.RUNS) == 4
    enqueued_jobs.assert_no_enqueued()


def test_when_attempts_run_out_the_job_fails_for_good_with_a_replayable_log_line(
    enqueued_jobs: EnqueuedJobs, caplog: pytest.LogCaptureFixture
) -> None:
    jobs.SCRIPT[:] = [Flaky, Flaky, Flaky, None]
    jobs.scripted.perform_now(5, note="n")

    with pytest.raises(Flaky), caplog.at_level(logging.ERROR, logger="app.jobs"):
        enqueued_jobs.perform_enqueued_jobs()

    assert len(jobs.RUNS) == 3
    enqueued_jobs.assert_no_enqueued()
    [line] = [r.getMessage() for r in caplog.records if "failed for good" in r.getMessage()]
    assert "after 3 executions" in line
    assert "send_task('jobs.test_scripted', args=[5], kwargs={'note': 'n'}, queue=" in line


def test_a_discarded_exception_runs_its_callback_once_and_ends_the_job(
    enqueued_jobs: EnqueuedJobs,
) -> None:
    jobs.SCRIPT[:] = [Gone]

    assert jobs.scripted.perform_now(5) is None

    assert jobs.DISCARDED == [("jobs.test_scripted", "run 1")]
    enqueued_jobs.assert_no_enqueued()


def test_an_exception_no_policy_covers_propagates(enqueued_jobs: EnqueuedJobs) -> None:
    jobs.SCRIPT[:] = [Unexpected]

    with pytest.raises(Unexpected):
        jobs.scripted.perform_now(5)
    enqueued_jobs.assert_no_enqueued()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("five",), "argument 'item_id' must be an integer, got 'five'"),
        ((0,), "argument 'item_id' must be positive, got 0"),
        ((True,), "argument 'item_id' must be an integer, got True"),
        ((1, 2, 3, 4), "arguments do not fit"),
        ((), "arguments do not fit"),
    ],
)
def test_arguments_that_do_not_fit_are_discarded_with_a_log_line(
    args: tuple[Any, ...], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="app.jobs"):
        result = jobs.scripted.apply(args, task_id="task-123")

    assert result.successful() and result.result is None
    assert jobs.RUNS == []
    [line] = [r.getMessage() for r in caplog.records if "discarded" in r.getMessage()]
    assert "jobs.test_scripted[task-123]" in line
    assert reason in line


def test_arguments_that_do_not_fit_are_refused_at_enqueue(enqueued_jobs: EnqueuedJobs) -> None:
    with pytest.raises(DeserializationError, match="must be positive"):
        jobs.scripted.delay(-3)
    enqueued_jobs.assert_no_enqueued()


def test_the_queue_is_chosen_from_the_arguments_at_enqueue_time(
    enqueued_jobs: EnqueuedJobs,
) -> None:
    jobs.place_order.delay(1, True)
    jobs.place_order.delay(2, False)
    jobs.place_order.apply_async((3, True), queue="low")  # the caller's choice wins

    enqueued_jobs.assert_enqueued(jobs.place_order, args=[1, True], queue="urgent")
    enqueued_jobs.assert_enqueued(jobs.place_order, args=[2, False], queue="default")
    enqueued_jobs.assert_enqueued(jobs.place_order, args=[3, True], queue="low")


def test_a_job_sent_by_name_through_the_app_is_routed_by_its_queue_as() -> None:
    route = celery.amqp.router.route({}, "jobs.test_place_order", (1, True), {})
    assert route["queue"].name == "urgent"
    assert route_by_queue_as("jobs.test_notify", (1, "x"), {}, {}) == {"queue": "low"}
    assert route_by_queue_as("not.a.job", (), {}, {}) is None


def test_personal_data_stays_out_of_the_message_repr_and_the_logs(
    enqueued_jobs: EnqueuedJobs, caplog: pytest.LogCaptureFixture
) -> None:
    jobs.notify.delay(7, "receipt", email="ada@example.com")
    [captured] = enqueued_jobs.jobs
    assert "ada@example.com" not in captured.options["argsrepr"]
    assert "[REDACTED]" in captured.options["argsrepr"]

    with caplog.at_level(logging.DEBUG, logger="app.jobs"):
        enqueued_jobs.perform_enqueued_jobs()
    assert caplog.records
    assert "ada@example.com" not in caplog.text
    assert "customer_id': 7" in caplog.text


def test_start_and_finish_lines_name_the_job_task_queue_attempt_and_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="app.jobs"):
        jobs.scripted.apply((9,), task_id="t-9")

    start, finish = (r for r in caplog.records if r.name == "app.jobs")
    assert "job started jobs.test_scripted[t-9] queue=inline attempt=1" in start.getMessage()
    assert "job finished jobs.test_scripted[t-9] queue=inline attempt=1 outcome=success" in (
        finish.getMessage()
    )
    assert finish.__dict__["duration"] >= 0


def test_metrics_time_the_job_and_count_each_outcome(
    enqueued_jobs: EnqueuedJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(1)
    client = StatsClient("127.0.0.1", sink.getsockname()[1], prefix="test")
    monkeypatch.setattr(instrumentation, "metrics", lambda: client)
    jobs.SCRIPT[:] = [Flaky, Gone]

    jobs.scripted.perform_now(1)  # retry
    enqueued_jobs.perform_enqueued_jobs()  # discard
    jobs.scripted.perform_now(2)  # success
    with pytest.raises(Unexpected):
        jobs.SCRIPT[:] = [Unexpected]
        jobs.scripted.perform_now(3)  # failure

    lines = []
    while True:
        try:
            lines.append(sink.recv(4096).decode())
        except TimeoutError:
            break
    sink.close()
    counters = [line for line in lines if line.endswith("|c")]
    assert counters == [
        f"test.jobs.test_scripted.{o}:1|c" for o in ("retry", "discard", "success", "failure")
    ]
    durations = [line for line in lines if ".duration:" in line]
    assert len(durations) == 4 and all(d.endswith("|ms") for d in durations)
    waits = [line for line in lines if ".queue_wait:" in line]
    assert len(waits) == 1  # only the retry went through a queue; perform_now runs inline


def test_around_perform_hooks_wrap_the_body() -> None:
    jobs.hooked.perform_now()
    assert jobs.HOOK_LOG == ["before jobs.test_hooked attempt 1", "body", "after jobs.test_hooked"]


def test_perform_all_later_pauses_the_garbage_collector_only_while_it_runs(
    enqueued_jobs: EnqueuedJobs,
) -> None:
    seen: list[bool] = []

    def signatures() -> Iterator[Signature]:
        for i in range(1, 3):
            seen.append(gc.isenabled())
            yield jobs.scripted.s(i)

    assert gc.isenabled()
    perform_all_later(signatures())
    assert seen == [False, False] and gc.isenabled()
    with pytest.raises(DeserializationError):
        perform_all_later([jobs.scripted.s("bad")])
    assert gc.isenabled()  # back on after a call that raised
    gc.disable()  # a caller that runs with the collector off keeps it off
    try:
        perform_all_later([jobs.scripted.s(3)])
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert len(enqueued_jobs) == 3


def test_perform_all_later_checks_every_call_before_enqueueing_any(
    enqueued_jobs: EnqueuedJobs,
) -> None:
    with pytest.raises(DeserializationError):
        perform_all_later([jobs.scripted.s(1), jobs.scripted.s("bad")])
    enqueued_jobs.assert_no_enqueued()

    results = perform_all_later(
        [jobs.scripted.s(i) for i in range(1, 4)] + [jobs.place_order.s(9, True)]
    )

    assert len(results) == 4 == len(enqueued_jobs)
    assert [p.task_id for p in enqueued_jobs.jobs] == [r.id for r in results]
    # The ids, without an AsyncResult each; an AsyncResult for any item read.
    assert results.ids == [p.task_id for p in enqueued_jobs.jobs]
    assert results[-1].id == results.ids[-1] and isinstance(results[0], AsyncResult)
    assert [r.id for r in results[1:3]] == results.ids[1:3]
    with pytest.raises(IndexError):
        results[4]
    enqueued_jobs.assert_enqueued(jobs.place_order, args=[9, True], queue="urgent")


# The seed's spec, in two short tests ---------------------------------------------------------


def test_processes_the_order() -> None:
    assert jobs.place_order.perform_now(42, False) == 42


def test_enqueues_email_notification(enqueued_jobs: EnqueuedJobs) -> None:
    jobs.place_order.perform_now(42, False)
    enqueued_jobs.assert_enqueued(jobs.notify, args=[42, "order_confirmation"], queue="low")


class RetryWait:
    """Expected waits, computed independently of the policy code."""

    @staticmethod
    def polynomial(executions: int, seed: int, jitter: float = 0.15) -> float:
        delay = executions**4
        return delay + random.Random(seed).random() * delay * jitter + 2


# Enqueue after commit (a session that is never used opens no connection) --------------------


def test_a_job_enqueued_inside_a_transaction_waits_for_the_commit(
    enqueued_jobs: EnqueuedJobs,
) -> None:
    with session_scope():
        jobs.notify.delay(1, "inside")
        enqueued_jobs.assert_no_enqueued()
    enqueued_jobs.assert_enqueued(jobs.notify, args=[1, "inside"], count=1)


def test_a_job_enqueued_inside_a_transaction_that_rolls_back_is_dropped(
    enqueued_jobs: EnqueuedJobs,
) -> None:
    with pytest.raises(KeyError), session_scope():
        jobs.notify.delay(1, "inside")
        perform_all_later([jobs.notify.s(2, "bulk")])
        raise KeyError("rollback")
    enqueued_jobs.assert_no_enqueued()


def test_outside_a_transaction_a_job_is_enqueued_at_once(enqueued_jobs: EnqueuedJobs) -> None:
    jobs.notify.delay(1, "outside")
    enqueued_jobs.assert_enqueued(jobs.notify, args=[1, "outside"])
