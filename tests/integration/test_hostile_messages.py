"""Messages a buggy or hostile producer could send, published straight to the broker.

Each has a stated outcome, and the worker keeps processing the good jobs queued around them.
"""

from __future__ import annotations

import json
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu.connection import Connection
from sqlalchemy import func, select

from app.db import session_scope
from app.models import DeadLetter, InventoryAudit, Product, User
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


@dataclass(frozen=True)
class Hostile:
    """A message, and what must become of it."""

    name: str
    outcome: str  # "rejected": refused before any job ran; "discarded"; "dead-lettered";
    # "applied": harmless data, processed as any other
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
            "rejected",
            b"{not json",
            headers=task_headers(inventory),
            log_says="Can't decode message body",
        ),
        Hostile(
            "pickle payload",
            "rejected",
            pickle.dumps(((product, 1000), {}, {})),
            "application/x-python-serialize",
            headers=task_headers(inventory),
            log_says="ContentDisallowed",
        ),
        Hostile(
            "YAML payload",
            "rejected",
            b"- [1, 1000]\n",
            "application/x-yaml",
            headers=task_headers(inventory),
            log_says="ContentDisallowed",
        ),
        hostile(
            "unknown task name",
            "rejected",
            "jobs.drop_all_tables",
            1,
            log_says="Received unregistered task of type 'jobs.drop_all_tables'",
        ),
        Hostile(
            "missing headers",
            "rejected",
            call(inventory, product, 1000)[0],
            headers={},
            log_says="Received invalid task message",
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
            log_says="unknown email type",
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

    with celery_process(
        [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "1"], worker_env(services, broker), log
    ):
        wait_until(lambda: audits() == expected_audits, timeout=90)
        wait_until(lambda: scalar(select(func.count()).select_from(DeadLetter)), timeout=60)

    text = log.read_text()
    for message in table:
        if message.log_says:
            assert message.log_says in text, f"{message.name}: {message.log_says!r} not logged"
    # Only the good jobs and the harmless SQL-looking key changed the stock; nothing else ran.
    assert reload(Product, product).inventory == 10 + expected_audits
    assert reload(Product, bystander).inventory == 7
    assert scalar(select(func.count()).select_from(User)) == 1
    with session_scope() as session:
        [entry] = session.scalars(select(DeadLetter))
        assert (entry.job_name, entry.args, entry.attempts) == (
            "jobs.update_inventory",
            [999_999, 1000],
            3,
        )
        keys = set(session.scalars(select(InventoryAudit.idempotency_key)))
    assert "'; DROP TABLE products; --" in keys
    assert "k" * 100 not in text  # the megabytes never reached a log line


def audits() -> int:
    return int(scalar(select(func.count()).select_from(InventoryAudit)))
