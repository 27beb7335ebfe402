"""How the scheduled set reads a message's due time and what an entry carries (no Redis)."""

from __future__ import annotations

import base64
import json

from app.delivery.scheduled import due_time, entry_header, member_base, without_eta


def protocol_2(eta: object, **headers: object) -> dict[str, object]:
    return {
        "body": base64.b64encode(json.dumps([[1], {}, {}]).encode()).decode(),
        "headers": {"task": "jobs.x", "id": "abc", "eta": eta, "retries": 0, **headers},
        "properties": {"body_encoding": "base64"},
    }


def protocol_1(eta: object) -> dict[str, object]:
    body = {"task": "jobs.x", "id": "abc", "args": [1], "kwargs": {}, "eta": eta}
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "headers": {},
        "properties": {"body_encoding": "base64"},
    }


def test_the_due_time_comes_from_the_header_or_a_protocol_1_body() -> None:
    assert due_time(protocol_2("2030-01-01T00:00:00+00:00")) == 1893456000.0
    assert due_time(protocol_1("2030-01-01T00:00:00+00:00")) == 1893456000.0
    assert due_time(protocol_2("2030-01-01T01:00:00+01:00")) == 1893456000.0


def test_a_time_without_a_zone_is_utc_as_celery_reads_it() -> None:
    assert due_time(protocol_2("2030-01-01T00:00:00")) == 1893456000.0


def test_no_eta_or_an_unreadable_one_means_not_scheduled() -> None:
    for eta in (None, "", "tomorrow", 5, ["2030"], "9999-99-99"):
        assert due_time(protocol_2(eta)) is None
        assert due_time(protocol_1(eta)) is None
    assert due_time({"headers": "nope", "body": "%%%"}) is None


def test_an_entry_names_its_list_job_attempt_and_error() -> None:
    header = json.loads(
        entry_header(
            "default",
            "prefix.default",
            protocol_2("2030-01-01", retries=2, job_last_error="Timeout: slow"),
        )
    )
    assert header == {
        "queue": "default",
        "key": "prefix.default",
        "task": "jobs.x",
        "id": "abc",
        "retries": 2,
        "error": "Timeout: slow",
    }
    assert member_base(protocol_2(None)) == "abc"
    assert member_base({"headers": {"id": 7}}) == ""


def test_run_now_takes_the_eta_out_of_either_protocol() -> None:
    assert due_time(without_eta(protocol_2("2030-01-01T00:00:00+00:00"))) is None
    assert due_time(without_eta(protocol_1("2030-01-01T00:00:00+00:00"))) is None
    body = json.loads(base64.b64decode(str(without_eta(protocol_1("2030-01-01"))["body"])))
    assert body["args"] == [1] and body["eta"] is None
