"""app.delivery.envelope: what reaches Celery's consumer is a message it can make a request of.

Messages that Celery itself builds pass; each shape that made Celery's consumer raise (and
stop the worker), or that it would refuse only after taking the message, is named with its
reason. The property-based test in tests/integration/test_hostile_fuzz.py runs a real worker.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from typing import Any

import pytest
from kombu.transport.virtual import Channel
from kombu.utils import json as kombu_json

from app import celery
from app.delivery.envelope import checked_task, describe, envelope_problem, task_problem


def known(name: str) -> bool:
    return name in {"jobs.process_order", "jobs.update_inventory"}


def envelope(protocol: int = 2, **options: Any) -> dict[str, Any]:
    """A message exactly as Celery and kombu put it in Redis."""
    headers, properties, body, _ = celery.amqp.create_task_message(
        "a-task-id", "jobs.process_order", (42,), {}, **options
    )
    if protocol == 1:
        headers = {}
        body = {"task": "jobs.process_order", "id": "a-task-id", "args": [42], "kwargs": {}}
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    return {
        "body": encoded,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            "body_encoding": "base64",
            "delivery_tag": "tag",
            "delivery_info": {"exchange": "", "routing_key": "default"},
            "priority": 0,
        },
    }


def with_body(message: dict[str, Any], body: Any) -> dict[str, Any]:
    message = copy.deepcopy(message)
    message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return message


def changed(path: str, value: Any) -> dict[str, Any]:
    message = envelope()
    *parents, last = path.split(".")
    target = message
    for name in parents:
        target = target[name]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return message


DELETE = object()


@pytest.mark.parametrize("protocol", [1, 2])
def test_celerys_own_messages_pass(protocol: int) -> None:
    assert task_problem(envelope(protocol), known) is None
    assert task_problem(envelope(2, countdown=30, expires=60, retries=2), known) is None


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ([1, 2, 3], "the envelope is a JSON array, not an object"),
        (changed("properties", None), "properties is missing"),
        (changed("properties.delivery_info", "x"), "delivery_info is string"),
        (changed("properties.body_encoding", "rot13"), "is not base64"),
        (changed("headers", [1]), "headers is array"),
        (changed("body", 5), "body is number"),
    ],
)
def test_envelopes_kombu_cannot_read_are_named(message: Any, reason: str) -> None:
    problem = envelope_problem(message)
    assert problem is not None and reason in problem


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (changed("headers.id", DELETE), "id is missing, not a task id"),
        (changed("headers.id", 7), "id is number"),
        (changed("headers.task", "jobs.drop_tables"), "no job is registered as 'jobs.drop_tables'"),
        (changed("headers.eta", "next tuesday"), "is not an ISO 8601 time"),
        (changed("headers.expires", 5), "expires is number"),
        (changed("headers.retries", "3"), "retries is '3'"),
        (changed("headers.timelimit", [1]), "timelimit is [1]"),
        (changed("headers.timelimit", ["a", None]), "timelimit holds 'a'"),
        (changed("headers.argsrepr", {}), "argsrepr is object"),
        (changed("headers.job_executions", {"x": "y"}), "job_executions"),
        (changed("content-type", "application/x-python-serialize"), "is not accepted"),
        (changed("body", "bm90IGpzb24="), "the body is not JSON"),
        (changed("body", "***"), "not valid base64"),
        (with_body(envelope(), [[42], {}]), "[args, kwargs, embed]"),
        (with_body(envelope(), {"a": 1}), "[args, kwargs, embed]"),
        (with_body(envelope(), ["args", {}, {}]), "args is string"),
        (with_body(envelope(), [[42], [], {}]), "kwargs is array"),
        (with_body(envelope(), [[42], {}, []]), "embed is array"),
        (with_body(envelope(), [[42], {}, {"callbacks": [1]}]), "callbacks is not a list"),
        (with_body(envelope(), [[42], {}, {"chord": "x"}]), "chord is not a signature"),
        (changed("headers", {}), "no headers.task"),
        (with_body(changed("headers", {}), {"task": "jobs.process_order"}), "id is missing"),
    ],
)
def test_messages_celerys_consumer_would_raise_on_are_named(message: Any, reason: str) -> None:
    problem = task_problem(message, known)
    assert problem is not None and reason in problem, problem


def test_what_a_dead_letter_shows_of_a_raw_message() -> None:
    raw = json.dumps(envelope()).encode()
    assert describe(raw) == {
        "task_id": "a-task-id",
        "job_name": "jobs.process_order",
        "args": [42],
        "kwargs": {},
    }
    assert describe(b"\x80garbage")["job_name"] is None


def test_kombus_decoder_accepts_what_passes() -> None:
    """Every body that passes decodes with kombu's own base64 codec."""
    message = envelope()
    assert task_problem(message, known) is None
    assert Channel.codecs["base64"].decode(message["body"])


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("where", ["envelope", "body"])
def test_nesting_is_measured_the_same_with_the_raw_text_given(where: str) -> None:
    # Given the text a message was decoded from, the check counts its brackets before walking
    # it: a text with few brackets cannot nest deep, one with many is walked.
    for levels, deep in ((100, False), (101, True)):
        message = envelope()
        if where == "envelope":
            message["headers"]["x-deep"] = _nested(levels - 1)  # the envelope is a level
        else:
            message = with_body(message, [[_nested(levels - 1)], {}, None])  # body, args
        raw = json.dumps(message).encode()
        for problem in (task_problem(message, known, raw), task_problem(message, known)):
            assert (problem is not None and "deeper than 100 levels" in problem) is deep
    brackets = json.dumps(envelope()).replace("{", "").replace("[", "")
    assert envelope_problem(envelope(), brackets.encode()) is None


def encoded_body(text: bytes) -> dict[str, Any]:
    message = envelope()
    message["body"] = base64.b64encode(text).decode()
    return message


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (b'[[42], {"note": "plain"}, {"callbacks": null}]', True),
        # kombu's JSON turns {"__type__": ..., "__value__": ...} into a value (a datetime here)
        (kombu_json.dumps([[dt.datetime(2026, 1, 2, 3, 4, 5)], {}, {}]).encode(), False),
        # a key escaped as \u...: it could spell __type__
        (b'[[42], {"\\u005f_type__": "datetime", "__value__": "2026-01-02T03:04:05"}, {}]', False),
        (b'[["caf\\u00e9"], {}, {}]', False),
        ('[["café"], {}, {}]'.encode(), True),
    ],
    ids=["plain", "kombu-typed value", "escaped key", "escaped text", "raw utf-8"],
)
def test_a_checked_body_is_handed_on_only_where_it_is_what_kombu_decodes(
    text: bytes, kept: bool
) -> None:
    # The transport hands the body the checks decoded to kombu's message as its payload, so
    # that Celery's worker does not decode it twice more: only where it is exactly what
    # kombu's own decoding gives.
    message = encoded_body(text)
    problem, body = checked_task(message, known)

    assert problem is None
    assert (body is not None) is kept
    if kept:
        assert body == kombu_json.loads(text)
        assert type(body) is list


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[[42], {}, {}]".encode("utf-16"), "the body is not UTF-8 text"),
        ("[[42], {}, {}]".encode("utf-32"), "the body is not UTF-8 text"),
        (b'[["\xed\xa0\x80"], {}, {}]', "the body is not UTF-8 text"),  # a lone surrogate
        ("[[42], {}, {}]".encode("utf-8-sig"), "the body is not JSON"),  # a byte-order mark
    ],
    ids=["utf-16", "utf-32", "lone surrogate", "utf-8 bom"],
)
def test_a_body_json_loads_reads_but_kombu_does_not_is_named(text: bytes, reason: str) -> None:
    # json.loads given these bytes decodes them; kombu's decoding (strict UTF-8, then JSON)
    # raises, and Celery's consumer would drop the message with only a log line.
    with pytest.raises(ValueError):
        kombu_json.loads(text)
    assert json.loads(text) is not None

    assert checked_task(encoded_body(text), known) == (reason, None)


def test_a_message_with_a_problem_hands_on_no_body() -> None:
    assert checked_task(changed("headers.task", "jobs.nobody"), known)[1] is None
