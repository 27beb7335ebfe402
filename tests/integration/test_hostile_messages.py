"""Messages a buggy or hostile producer could send, published straight to the broker.

Each has a stated outcome, and the worker keeps processing the good jobs queued around them.
A message that cannot become a request (not JSON, not accepted, no job of that name, no task
header) never reaches Celery's consumer: app.delivery's transport dead-letters it ("malformed",
with the reason app.delivery.envelope gives and its raw bytes). tests/integration/
test_hostile_fuzz.py generates such messages by the thousand; these are the named cases.
"""

from __future__ import annotations

import base64
import json
import pickle
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from sqlalchemy import func, select

from app.db import session_scope
from app.models import DeadLetter, InventoryAudit, Product, User
from app.settings import redis_client_url
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    worker_env,
)
from tests.integration.factories import make_product, make_user, reload, scalar, wait_until

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only


@dataclass(frozen=True)
class Hostile:
    """A message, and what must become of it."""

    name: str
    outcome: str  # "malformed": dead-lettered by the transport before any job ran;
    # "discarded"; "dead-lettered" (by the job layer); "applied": harmless data, processed
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, Any] | None = None
    log_says: str = ""


def task_headers(task: str) -> dict[str, Any]:
    return {
        "lang": "py",
        "task": task,
        "id": str(uuid.uuid4()),
        "retries": 0,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "hostile@test",
    }


def call(task: str, *args: Any, **kwargs: Any) -> tuple[bytes, dict[str, Any]]:
    body = json.dumps(
        [list(args), kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    ).encode()
    return body, task_headers(task)


def cases(product: int, user: int) -> list[Hostile]:
    def hostile(
        name: str, outcome: str, task: str, *args: Any, log_says: str = "", **kwargs: Any
    ) -> Hostile:
        body, headers = call(task, *args, **kwargs)
        return Hostile(name, outcome, body, headers=headers, log_says=log_says)

    inventory = "jobs.update_inventory"
    return [
        Hostile(
            "body that is not JSON",
            "malformed",
            b"{not json",
            headers=task_headers(inventory),
            log_says="the body is not JSON",
        ),
        Hostile(
            "pickle payload",
            "malformed",
            pickle.dumps(((product, 1000), {}, {})),
            "application/x-python-serialize",
            headers=task_headers(inventory),
            log_says="content-type 'application/x-python-serialize' is not accepted (JSON only)",
        ),
        Hostile(
            "YAML payload",
            "malformed",
            b"- [1, 1000]\n",
            "application/x-yaml",
            headers=task_headers(inventory),
            log_says="content-type 'application/x-yaml' is not accepted (JSON only)",
        ),
        hostile(
            "unknown task name",
            "malformed",
            "jobs.drop_all_tables",
            1,
            log_says="no job is registered as 'jobs.drop_all_tables'",
        ),
        Hostile(
            "missing headers",
            "malformed",
            call(inventory, product, 1000)[0],
            headers={},
            log_says="no headers.task, and the body is not a protocol 1 object",
        ),
        hostile(
            "wrong argument count", "discarded", inventory, product, log_says="arguments do not fit"
        ),
        hostile(
            "wrong types",
            "discarded",
            inventory,
            str(product),
            "1000",
            log_says="must be an integer",
        ),
        hostile("negative id", "discarded", inventory, -5, 1000, log_says="must be positive"),
        hostile(
            "absurd number", "discarded", inventory, product, 10**15, log_says="must be between"
        ),
        hostile(
            "several megabytes",
            "discarded",
            inventory,
            product,
            1000,
            "k" * 3_000_000,
            log_says="more than the 262144 allowed",
        ),
        hostile(
            "SQL in an email type",
            "discarded",
            "jobs.send_email",
            user,
            "x'); DROP TABLE users; --",
            log_says="argument 'email_type' must be an email type (one of order_confirmation",
        ),
        hostile(
            "SQL in an idempotency key",
            "applied",
            inventory,
            product,
            1,
            "'; DROP TABLE products; --",
        ),
        hostile("id of no row", "dead-lettered", inventory, 999_999, 1000),
    ]


def publish(connection: Connection, queue: str, message: Hostile) -> None:
    connection.default_channel.basic_publish(
        connection.default_channel.prepare_message(
            message.body,
            content_type=message.content_type,
            content_encoding="utf-8",
            headers=message.headers or {},
            properties={"delivery_info": {}},
        ),
        exchange="",
        routing_key=queue,
    )


def good_job(connection: Connection, product: int, key: str) -> Hostile:
    body, headers = call("jobs.update_inventory", product, 1, key)
    good = Hostile(f"good {key}", "applied", body, headers=headers)
    publish(connection, "default", good)
    return good


def test_each_hostile_message_meets_its_outcome_and_good_jobs_go_on(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 8)
    flush_broker(broker)
    product, user, bystander = make_product(inventory=10), make_user(), make_product(inventory=7)
    table = cases(product, user)
    with Connection(broker) as connection:
        for i, message in enumerate(table):
            good_job(connection, product, f"good-before-{i}")
            publish(connection, "default", message)
        good_job(connection, product, "good-last")
    log = tmp_path / "worker.log"
    expected_audits = len(table) + 1 + 1  # the good jobs, and the SQL-in-a-key change
    malformed = [m for m in table if m.outcome == "malformed"]

    with celery_process(
        [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "1"], worker_env(services, broker), log
    ):
        wait_until(lambda: audits() == expected_audits, timeout=90)
        # The malformed messages, and `id of no row` once its retries are exhausted.
        wait_until(lambda: dead_letters() == len(malformed) + 1, timeout=60)

    text = log.read_text()
    for message in table:
        if message.log_says:
            assert message.log_says in text, f"{message.name}: {message.log_says!r} not logged"
    for message in malformed:  # app.delivery.transport's line, with envelope.py's reason
        line = f"taken out of circulation for the dead-letter store: {message.log_says}"
        assert line in text, f"{message.name}: not taken out by the transport"
    # Only the good jobs and the harmless SQL-looking key changed the stock; nothing else ran.
    assert reload(Product, product).inventory == 10 + expected_audits
    assert reload(Product, bystander).inventory == 7
    assert scalar(select(func.count()).select_from(User)) == 1
    with session_scope() as session:
        [entry] = session.scalars(select(DeadLetter).where(DeadLetter.reason != "malformed"))
        assert (entry.reason, entry.job_name, entry.args, entry.attempts) == (
            "exhausted",
            "jobs.update_inventory",
            [999_999, 1000],
            3,
        )
        entries = session.scalars(select(DeadLetter).where(DeadLetter.reason == "malformed"))
        by_reason = {e.error_message: e for e in entries}
        assert set(by_reason) == {m.log_says for m in malformed}
        for message in malformed:  # each kept with its raw envelope, headers included
            found = by_reason[message.log_says]
            assert found.raw_message is not None and found.queue == "default", message.name
            if message.headers:
                assert message.headers["id"] in found.raw_message, message.name
        keys = set(session.scalars(select(InventoryAudit.idempotency_key)))
    assert "'; DROP TABLE products; --" in keys
    assert "k" * 100 not in text  # the megabytes never reached a log line


def audits() -> int:
    return int(scalar(select(func.count()).select_from(InventoryAudit)))


def dead_letters() -> int:
    return int(scalar(select(func.count()).select_from(DeadLetter)))


def raw_message(task: str, body: bytes) -> bytes:
    """A protocol 2 message written by hand around `body`, bytes as a producer wrote them (not
    through Python's JSON encoder): kombu's Redis envelope, the body in base64."""
    task_id = str(uuid.uuid4())
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {**task_headers(task), "id": task_id, "root_id": task_id},
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "default"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


EMBED = b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'


def test_a_job_gets_its_arguments_as_kombu_decodes_them_whatever_the_bytes(
    services: Services, tmp_path: Path
) -> None:
    """The worker decodes a message's body once where that is what kombu's decoding gives
    (app.delivery.envelope.checked_task); these bodies are where a plain json.loads would
    differ: escapes (one spelling `__type__`), kombu's typed values, raw UTF-8, UTF-16."""
    broker = isolated_broker(services.broker_url, 8)
    flush_broker(broker)
    bodies = {
        # \\u escapes, a surrogate pair among them
        "escaped": b'[["caf\\u00e9-\\ud83d\\ude00-esc", 3], {}, ' + EMBED + b"]",
        # the same characters as raw UTF-8 (the body decoded once and handed on)
        "raw": '[["café-😀-raw", 4], {}, '.encode() + EMBED + b"]",
        # kombu's typed value: a Decimal, stored as an integer
        "typed": b'[["typed", {"__type__": "decimal", "__value__": "5"}], {}, ' + EMBED + b"]",
        # `__type__` spelled with an escape: kombu's decoder reads it as the typed value too
        "typed-escaped": b'[["typed-esc", {"\\u005f_type__": "decimal", "__value__": "6"}], {}, '
        + EMBED
        + b"]",
        # UTF-16: json.loads would read it; kombu decodes UTF-8, so it is malformed
        "utf16": '[["utf16", 7], {}, {}]'.encode("utf-16"),
    }
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    for body in bodies.values():
        client.lpush("default", raw_message("tests.create_product", body))
    log = tmp_path / "worker.log"
    expected = {"café-😀-esc": 3, "café-😀-raw": 4, "typed": 5, "typed-esc": 6}

    def made() -> dict[str, int]:
        with session_scope() as session:
            rows = session.execute(select(Product.sku, Product.inventory)).all()
        return {sku: inventory for sku, inventory in rows}

    with celery_process(
        [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "1"], worker_env(services, broker), log
    ):
        wait_until(lambda: len(made()) == len(expected) and dead_letters() == 1, timeout=90)
        time.sleep(0.5)  # nothing more comes

    assert made() == expected
    with session_scope() as session:
        [letter] = session.scalars(select(DeadLetter))
    assert letter.reason == "malformed"
    assert letter.raw_message is not None and "utf16" not in made()
