"""Declaring flow control: what a job accepts, what it refuses with a clear error, and the keys
a call maps to."""

from __future__ import annotations

from typing import Any

import pytest

from app.delivery import flow
from app.delivery.flow import Limit, Rate
from app.delivery.records import Keys
from app.jobs.base import _admission, job
from app.jobs.errors import JobDeclarationError
from app.jobs.send_email import _unique_per_order


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Limit(to=0), "Limit(to=...)"),
        (lambda: Limit(to=True), "Limit(to=...)"),
        (lambda: Limit(to=2, duration=0), "Limit(duration=...)"),
        (lambda: Limit(to=2, duration=float("inf")), "Limit(duration=...)"),
        (lambda: Limit(to=2, key="import_id"), "Limit(key=...)"),  # type: ignore[arg-type]
        (lambda: Rate(0), "Rate(limit)"),
        (lambda: Rate(5, per=-1), "Rate(per=...)"),
        (lambda: Rate(5, key=3), "Rate(key=...)"),  # type: ignore[arg-type]
    ],
)
def test_bad_limits_are_refused_where_they_are_written(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unique_for": 0}, "unique_for must be positive seconds"),
        ({"unique_for": "1h"}, "unique_for must be positive seconds"),
        ({"expires_in": -5}, "expires_in must be positive seconds"),
        ({"unique_key": lambda x: x}, "unique_key needs unique_for"),
        ({"unique_for": 60, "unique_key": "x"}, "unique_key must be a callable"),
        ({"limits_concurrency": 2}, "limits_concurrency must be a Limit"),
        ({"rate_limit": 5}, "rate_limit must be a Rate"),
    ],
)
def test_bad_flow_options_fail_the_declaration(options: dict[str, Any], message: str) -> None:
    with pytest.raises(JobDeclarationError, match=message):
        job("jobs.unit_bad_flow", **options)(noop)


def noop(x: Any) -> None:
    """A job body."""


def grouped(group: str, n: int) -> None:
    """A job body."""


def test_a_string_rate_limit_stays_celerys_own_per_worker_limit() -> None:
    declared = job("jobs.unit_celery_rate", rate_limit="10/m")(noop)
    assert declared.rate_limit == "10/m" and declared.flow_rate is None
    limited = job("jobs.unit_flow_rate", rate_limit=Rate(3, per=2))(noop)
    assert limited.rate_limit is None and limited.flow_rate == Rate(3, per=2)


def test_keys_name_the_job_and_the_group_and_a_key_function_may_opt_a_call_out() -> None:
    assert flow.key_part("jobs.a", None, (1,), {}) == "jobs.a"
    assert flow.key_part("jobs.a", lambda n: n % 2, (7,), {}) == "jobs.a:1"
    assert flow.key_part("jobs.a", lambda n: None, (7,), {}) is None
    long = flow.key_part("jobs.a", lambda n: "x" * 500, (7,), {})
    assert long is not None and len(long) < 230 and long.startswith("jobs.a:xxx")
    assert long != flow.key_part("jobs.a", lambda n: "x" * 499 + "y", (7,), {})


def test_the_worker_reads_a_messages_controls_from_its_arguments_by_either_protocol() -> None:
    import base64
    import json

    serial = job("jobs.unit_limited", limits_concurrency=Limit(to=2, key=lambda group, n: group))(
        grouped
    )
    body = base64.b64encode(json.dumps([["g", 1], {}, {}]).encode()).decode()
    payload = {
        "headers": {"task": serial.name, "id": "t-2"},
        "body": body,
        "properties": {"body_encoding": "base64"},
    }
    keys = Keys("p:")
    assert _admission(payload, keys) == (
        "t-2",
        [flow.Control("limit", "p:jobs_service:limit:jobs.unit_limited:g", 2, 900.0)],
    )
    protocol_1 = {
        "body": base64.b64encode(
            json.dumps({"task": serial.name, "id": "t-1", "args": ["h", 2]}).encode()
        ).decode(),
        "properties": {"body_encoding": "base64"},
    }
    assert _admission(protocol_1, keys) == (
        "t-1",
        [flow.Control("limit", "p:jobs_service:limit:jobs.unit_limited:h", 2, 900.0)],
    )
    other = {**payload, "headers": {"task": "jobs.unit_celery_rate", "id": "x"}}
    assert _admission(other, keys) is None  # no concurrency or rate limit: nothing to decide


def test_the_order_confirmation_is_unique_per_order_and_other_emails_are_not() -> None:
    assert _unique_per_order(1, "order_confirmation", "k", {"order_id": 7}) == "order:7"
    assert _unique_per_order(1, "order_confirmation", context={"order_id": 7}) == "order:7"
    assert _unique_per_order(1, "daily_report", None, {"order_id": 7}) is None
    assert _unique_per_order(1, "order_confirmation", None, None) is None
