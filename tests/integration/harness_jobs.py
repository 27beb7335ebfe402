"""Jobs that exist only for integration tests of the harness and the job layer."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select, update

from app import celery
from app.db import session_scope
from app.delivery.flow import Limit, Rate
from app.delivery.rabbitmq import undelayed_routing_key
from app.jobs.base import EXECUTIONS_HEADER, job
from app.jobs.policies import RetryOn
from app.models import Product


class Boom(RuntimeError):
    """Raised on purpose after a write, to show the scope rolls it back."""


@celery.task(name="tests.create_product")
def create_product(sku: str, inventory: int, fail_after_write: bool = False) -> int:
    """Insert a product in one transaction; optionally fail after the insert."""
    with session_scope() as session:
        product = Product(sku=sku, name=sku.title(), inventory=inventory, price=Decimal("1.00"))
        session.add(product)
        session.flush()
        if fail_after_write:
            raise Boom(f"failing after writing {sku}")
        return product.id


class FirstProblem(Exception):
    """Retried after 1 s, 3 attempts."""


class SecondProblem(Exception):
    """Retried after 2 s, 2 attempts."""


#: What `scripted_on_worker` raises per execution, by token; None means succeed.
SCRIPTS: dict[str, list[type[Exception] | None]] = {}
EXECUTIONS: list[dict[str, Any]] = []


@job(
    "jobs.test_scripted_on_worker",
    retry_on=[
        RetryOn(FirstProblem, wait=1, attempts=3, jitter=0),
        RetryOn(SecondProblem, wait=2, attempts=2, jitter=0),
    ],
)
def scripted_on_worker(token: str) -> str:
    """Record this execution, then raise what the script says next."""
    request = scripted_on_worker.request
    EXECUTIONS.append(
        {
            "token": token,
            "started": time.time(),
            "attempt": request.retries + 1,
            "executions": dict(getattr(request, EXECUTIONS_HEADER, None) or {}),
            # (without the delay prefix a retry that waited in RabbitMQ arrives under)
            "queue": undelayed_routing_key(request.delivery_info.get("routing_key") or ""),
        }
    )
    outcome = SCRIPTS[token].pop(0)
    if outcome is not None:
        raise outcome(f"{token} execution {len(EXECUTIONS)}")
    return "succeeded"


@job("jobs.test_record_sku", queue_as="default")
def record_sku(sku: str) -> int:
    """Insert a product named `sku` and return its id."""
    return int(create_product.run(sku, 0))


@job("jobs.test_sleepy_write", soft_time_limit=1, time_limit=10)
def sleepy_write(sku: str, seconds: float) -> int:
    """Insert a product, then take longer than the soft time limit inside the transaction."""
    with session_scope() as session:
        product = Product(sku=sku, name=sku, inventory=0, price=Decimal(1))
        session.add(product)
        session.flush()
        time.sleep(seconds)
        return product.id


@job("jobs.test_stubborn", soft_time_limit=1, time_limit=2)
def stubborn(seconds: float) -> None:
    """Ignore the soft time limit and outlive the hard one."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        time.sleep(seconds)


@job("jobs.test_slow_record")
def slow_record(sku: str, seconds: float) -> int:
    """Work for `seconds`, then insert a product named `sku`."""
    time.sleep(seconds)
    return int(create_product.run(sku, 0))


@job("jobs.test_kill_my_process")
def kill_my_process(token: str) -> None:
    """Die outright in the process running the job, as a segfault or the OOM killer would."""
    import os
    import signal

    EXECUTIONS.append({"token": token, "pid": os.getpid()})
    print(f"kill_my_process {token} in {os.getpid()}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


@job("jobs.test_requeue_then_record")
def requeue_then_record(sku: str, requeues: int) -> int:
    """Ask to be requeued `requeues` times (counted in the broker's Redis), then record `sku`."""
    from celery.exceptions import Reject

    client = _broker_client()
    if int(client.incr(f"test:requeues:{sku}")) <= requeues:
        raise Reject("not yet", requeue=True)
    return int(create_product.run(sku, 0))


@job("jobs.test_kill_my_worker")
def kill_my_worker(token: str) -> None:
    """Take the whole worker down with the job, as a host lost mid-job would."""
    import os
    import signal

    print(f"kill_my_worker {token} in {os.getpid()}", flush=True)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _broker_client() -> Any:
    from app.delivery.clients import broker_client

    return broker_client()


#: Where `record_run` appends: one JSON entry per execution, in the broker's Redis.
RUNS_KEY = "test:runs"


@job("jobs.test_record_run")
def record_run(token: str) -> None:
    """Append {token, time, task id, attempt} to the broker's `test:runs` list: each execution
    of a scheduled job leaves one entry, with the time it started."""
    _record(token, record_run.request)


@job("jobs.test_slow_run")
def slow_run(token: str, seconds: float) -> None:
    """Work for `seconds`, then record the execution as `record_run` does (a job run again
    after its worker died records twice, and fails nothing)."""
    time.sleep(seconds)
    _record(token, slow_run.request)


def _record(token: str, request: Any) -> None:
    import json

    entry = {"token": token, "at": time.time(), "id": request.id, "attempt": request.retries + 1}
    _broker_client().rpush(RUNS_KEY, json.dumps(entry))


class NotYet(RuntimeError):
    """Raised on purpose until a job's scripted failures are used up."""


@job("jobs.test_fail_then_record", retry_on=[RetryOn(NotYet, wait=6, jitter=0, attempts=5)])
def fail_then_record(token: str, failures: int) -> None:
    """Fail `failures` times (counted in the broker's Redis), each retried 6 s later, then
    record the run as `record_run` does."""
    if int(_broker_client().incr(f"test:failures:{token}")) <= failures:
        raise NotYet(f"{token}: not yet")
    _record(token, fail_then_record.request)


@celery.task(name="tests.retry_once", bind=True)
def retry_once(self: Any, token: str) -> None:
    """A plain Celery task (not a job) that retries itself once, 3 s later, with Celery's own
    `Task.retry`, then records the run as `record_run` does."""
    if self.request.retries == 0:
        raise self.retry(countdown=3)
    _record(token, self.request)


@job("jobs.test_always_fails", retry_on=[RetryOn(NotYet, wait=2, jitter=0, attempts=3)])
def always_fails(token: str) -> None:
    """Fail every time: retried twice, 2 s apart, then dead-lettered."""
    raise NotYet(f"{token}: never")


# Flow control (tests/integration/test_flow_control.py) -------------------------------------

#: Where the flow-control jobs append {token, group, start, end, admitted, id, pid}.
FLOW_KEY = "test:flow"
#: The task id of every run that started (a killed run records its start and no end).
FLOW_STARTED_KEY = "test:flow:started"


def _record_span(token: str, group: str, request: Any, seconds: float) -> None:
    import json
    import os

    start = time.time()
    _broker_client().rpush(FLOW_STARTED_KEY, request.id)
    time.sleep(seconds)
    entry = {
        "token": token,
        "group": group,
        "start": start,
        "end": time.time(),
        "admitted": getattr(request, "job_admitted_at", None),
        "id": request.id,
        "attempt": request.retries + 1,
        "pid": os.getpid(),
    }
    _broker_client().rpush(FLOW_KEY, json.dumps(entry))


@job(
    "jobs.test_limited",
    limits_concurrency=Limit(to=2, key=lambda token, group, seconds: group, duration=120),
)
def limited(token: str, group: str, seconds: float) -> None:
    """At most two per group at once; records when it ran."""
    _record_span(token, group, limited.request, seconds)


@job("jobs.test_rated", rate_limit=Rate(5, per=1.0, key=lambda token, group: group))
def rated(token: str, group: str) -> None:
    """At most five per group start in any second; records when it was admitted and ran."""
    _record_span(token, group, rated.request, 0)


@job("jobs.test_unique", unique_for=120, unique_key=lambda token, seconds: token)
def unique(token: str, seconds: float) -> None:
    """One per token queued, scheduled or running at once."""
    _record_span(token, "unique", unique.request, seconds)


@job("jobs.test_unique_record", unique_for=120, unique_key=lambda token, n: token)
def unique_record(token: str, n: int) -> int:
    """One per token queued or running at once (on Redis); records a product `token-n`."""
    return int(create_product.run(f"{token}-{n}", 0))


@job("jobs.test_expiring", expires_in=2)
def expiring(token: str) -> None:
    """Skipped when still queued 2 s after it was enqueued."""
    _record_span(token, "expiring", expiring.request, 0)


@job("jobs.test_serial", limits_concurrency=Limit(to=1, duration=120))
def serial(token: str, seconds: float) -> None:
    """One at a time across every worker; records when it ran."""
    _record_span(token, "serial", serial.request, seconds)


# Batches (tests/integration/test_batches.py) ---------------------------------------------

#: Where `batch_callback` appends {label, batch, event, at, id}.
BATCH_CALLBACKS_KEY = "test:batch:callbacks"


@job("jobs.test_batch_callback")
def batch_callback(label: str) -> None:
    """A batch callback: records that it ran, with the batch and event its header names."""
    import json

    request = batch_callback.request
    fired = getattr(request, "job_batch_callback", None) or {}
    entry = {
        "label": label,
        "batch": fired.get("batch"),
        "event": fired.get("event"),
        "at": time.time(),
        "id": request.id,
    }
    _broker_client().rpush(BATCH_CALLBACKS_KEY, json.dumps(entry))


@job("jobs.test_batch_noop")
def batch_noop(n: int) -> None:
    """A member that does nothing but count its runs."""
    _broker_client().hincrby("test:batch:runs", str(n), 1)


@job("jobs.test_nest")
def nest(level: int, depth: int) -> None:
    """Inside a batch: below `depth`, create a child batch (with callbacks labelled by level)
    holding a leaf job and the next level."""
    from app.jobs.batches import Batch

    if level >= depth:
        return
    child = Batch.create(
        f"level {level + 1}",
        on_complete=batch_callback.s(f"complete-{level + 1}"),
        on_success=batch_callback.s(f"success-{level + 1}"),
    )
    with child.jobs():
        batch_noop.delay(level)
        nest.delay(level + 1, depth)


@job("jobs.test_grow")
def grow(remaining: int) -> None:
    """Add the next generation to this job's own batch, until `remaining` runs out."""
    from app.jobs.batches import Batch

    batch_noop.delay(1000 + remaining)  # not in a jobs() block: not a member
    if remaining:
        batch = Batch.current()
        assert batch is not None
        with batch.jobs():
            grow.delay(remaining - 1)


@job("jobs.test_barrier")
def barrier(token: str, parties: int) -> None:
    """Wait until `parties` runs with this token have started, then return at once: two
    members of a batch finishing at the same instant."""
    client = _broker_client()
    client.incr(f"test:barrier:{token}")
    deadline = time.time() + 30
    while int(client.get(f"test:barrier:{token}") or 0) < parties and time.time() < deadline:
        time.sleep(0.001)


# Continuations (tests/integration/test_continuations.py) -----------------------------------


class WalkHiccup(Exception):
    """Raised once by `continuable_walk` after it made progress; retried after 1 s."""


#: Tokens whose walk has raised its hiccup already; the cursor each execution started at.
HICCUPS: set[str] = set()
walk_starts: list[tuple[str, Any]] = []


@job(
    "jobs.test_continuable_walk",
    continuable=True,
    retry_on=[RetryOn(WalkHiccup, wait=1, attempts=3, jitter=0)],
)
def continuable_walk(prefix: str, fail_at: int) -> None:
    """Add 1 to the inventory of each product whose sku starts with `prefix`, ten a checkpoint;
    once, raise in the middle of the checkpoint that reaches the `fail_at`-th product."""
    from app.jobs.continuable import Step, step

    def walk(s: Step) -> None:
        walk_starts.append((prefix, s.cursor))
        while True:
            with s.checkpoint() as session:
                ids = list(
                    session.scalars(
                        select(Product.id)
                        .where(Product.sku.startswith(prefix), Product.id > (s.cursor or 0))
                        .order_by(Product.id)
                        .limit(10)
                    )
                )
                session.execute(
                    update(Product)
                    .where(Product.id.in_(ids))
                    .values(inventory=Product.inventory + 1)
                )
                walked = sum(1 for _ in ids) + _walked(session, prefix, s.cursor)
                if walked >= fail_at and prefix not in HICCUPS:
                    HICCUPS.add(prefix)
                    raise WalkHiccup(f"{prefix}: after {walked - len(ids)} products")
                if ids:
                    s.advance(ids[-1])
            if len(ids) < 10:
                return

    step("walk", walk)


def _walked(session: Any, prefix: str, cursor: Any) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Product)
            .where(Product.sku.startswith(prefix), Product.id <= (cursor or 0))
        )
        or 0
    )


# The threads pool (tests/integration/test_threads_pool.py) -----------------------------------

#: Where `db_span` appends {token, start, end, backend pid}: when each held a connection.
DB_SPANS_KEY = "test:db_spans"


@job("jobs.test_db_span")
def db_span(token: str, seconds: float) -> None:
    """Hold a database connection (a transaction open) for `seconds`, and record when."""
    import json

    from sqlalchemy import text

    with session_scope() as session:
        backend = session.scalar(text("SELECT pg_backend_pid()"))
        start = time.time()
        time.sleep(seconds)
        end = time.time()
    entry = {"token": token, "start": start, "end": end, "backend": backend}
    _broker_client().rpush(DB_SPANS_KEY, json.dumps(entry))


@job("jobs.test_busy_write", soft_time_limit=1, time_limit=20)
def busy_write(sku: str, seconds: float) -> int:
    """Insert a product, then work in Python (short sleeps) past the soft time limit."""
    with session_scope() as session:
        product = Product(sku=sku, name=sku, inventory=0, price=Decimal(1))
        session.add(product)
        session.flush()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        return product.id


@job("jobs.test_record_once", queue_as="default")
def record_once(sku: str) -> None:
    """Insert a product named `sku` unless it exists: a redelivery changes nothing."""
    from sqlalchemy.dialects.postgresql import insert

    with session_scope() as session:
        session.execute(
            insert(Product)
            .values(sku=sku, name=sku, inventory=0, price=Decimal(1))
            .on_conflict_do_nothing(index_elements=["sku"])
        )
