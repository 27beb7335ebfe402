"""Structured log lines and the correlation id that follows work from job to job."""

from __future__ import annotations

import json
import logging

from app.jobs.testing import EnqueuedJobs
from app.logs import CORRELATION_HEADER, JobContext, JsonFormatter, current_correlation_id
from tests.unit import jobs_for_tests as jobs


def test_a_json_line_has_time_level_message_and_the_job_fields() -> None:
    record = logging.LogRecord(
        "app.jobs", logging.INFO, __file__, 1, "job finished %s", ("x",), None
    )
    for name, value in {
        "job": "jobs.x",
        "task_id": "t1",
        "queue": "low",
        "attempt": 2,
        "duration": 0.5,
        "outcome": "success",
    }.items():
        setattr(record, name, value)

    line = json.loads(JsonFormatter().format(record))

    assert line["message"] == "job finished x" and line["level"] == "INFO"
    assert {k: line[k] for k in ("job", "task_id", "queue", "attempt", "duration", "outcome")} == {
        "job": "jobs.x",
        "task_id": "t1",
        "queue": "low",
        "attempt": 2,
        "duration": 0.5,
        "outcome": "success",
    }
    assert "time" in line


def test_lines_written_during_a_job_carry_its_correlation_id() -> None:
    token = current_correlation_id.set("req-42")
    try:
        record = logging.LogRecord("anything", logging.INFO, __file__, 1, "hello", (), None)
        JobContext().filter(record)
    finally:
        current_correlation_id.reset(token)
    assert json.loads(JsonFormatter().format(record))["correlation_id"] == "req-42"


def test_jobs_a_job_enqueues_carry_its_correlation_id(enqueued_jobs: EnqueuedJobs) -> None:
    jobs.place_order.apply((7, False), headers={CORRELATION_HEADER: "req-7"})

    [child] = enqueued_jobs.matching(jobs.notify)
    assert child.options["headers"][CORRELATION_HEADER] == "req-7"
    assert current_correlation_id.get() is None  # nothing leaks past the job
