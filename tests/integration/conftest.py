"""The integration harness: real PostgreSQL, real Redis, a real Celery worker.

The servers are the ones `DATABASE_URL` / `BROKER_URL` name, or the embedded default when they
are unset (started here and stopped at the end if this run started them). Tests get a database
of their own, `<database>_pytest`, made fresh and migrated with Alembic once per run; every test
starts from empty tables and empty queues.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from alembic import command
from celery.contrib.testing.worker import start_worker
from celery.utils import uuid
from celery.worker import WorkController
from celery.worker import state as worker_state
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app import celery, embedded, scratch
from app.db import dispose_engine, get_engine
from app.devservers.gateway import GatewaySimulator
from app.devservers.smtp import SmtpServer
from app.models import Base
from app.scratch import alembic_config as alembic_config  # (re-exported for the tests)
from app.scratch import drop_database as drop_database
from app.scratch import flush_broker as flush_broker
from app.scratch import libpq_conninfo as libpq_conninfo
from app.scratch import recreate_database as recreate_database
from app.settings import (
    Endpoints,
    get_endpoints,
    get_settings,
    load_settings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Services:
    """What the integration tests run against."""

    database_url: str  # the tests' own database
    server_url: str  # the server's maintenance database, for making more databases
    broker_url: str
    smtp: SmtpServer  # a real SMTP server on loopback, where every email goes
    gateway: GatewaySimulator  # the payment-gateway simulator, over real HTTP


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


def start_services() -> tuple[Services, Callable[[], None]]:
    """Resolve the servers, make and migrate the tests' database, point the app at it.

    Returns the services and the function that undoes all of it. Called from the root
    conftest's `pytest_configure`, before any test module is imported, so that the Celery
    app reads these URLs when it first loads its configuration.
    """
    if celery.configured:
        raise RuntimeError("the Celery app was configured before the harness chose its URLs")
    settings = load_settings()
    started: tuple[str, ...] = ()
    database_url, broker_url = settings.database_url, settings.broker_url
    if database_url is None or broker_url is None:
        running = embedded.ensure_running(
            settings.state_dir, postgres=database_url is None, redis=broker_url is None
        )
        started = running.started
        database_url = database_url or running.database_url
        broker_url = broker_url or running.broker_url
    assert database_url is not None and broker_url is not None
    test_db = f"{make_url(database_url).database}_pytest"
    test_url = recreate_database(database_url, test_db)
    command.upgrade(alembic_config(test_url), "head")

    smtp, gateway = SmtpServer(), GatewaySimulator()
    smtp.start()
    gateway.start()
    pointed = {
        "DATABASE_URL": test_url,
        "BROKER_URL": broker_url,
        "SMTP_HOST": smtp.host,
        "SMTP_PORT": str(smtp.port),
        "PAYMENT_GATEWAY_URL": gateway.url,
        # The in-process worker relays nothing: the outbox tests' rows belong to the brokers
        # of their own workers (worker_env turns the relay on), not to this process's broker.
        "OUTBOX_RELAY": "false",
    }
    saved = {k: os.environ.get(k) for k in pointed}
    os.environ.update(pointed)
    get_settings.cache_clear()
    get_endpoints.cache_clear()
    dispose_engine()

    def stop_services() -> None:
        smtp.stop()
        gateway.stop()
        dispose_engine()
        drop_database(server_url, test_db)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if started:
            embedded.stop(settings.state_dir, started)

    server_url = database_url
    return Services(test_url, server_url, broker_url, smtp, gateway), stop_services


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest) -> Services:
    """The servers and database the harness set up for this run."""
    found = getattr(request.config, "_services", None)
    if found is None:
        pytest.fail("integration services were not started (see tests/conftest.py)")
    assert isinstance(found, Services)
    return found


@pytest.fixture(scope="session")
def endpoints(services: Services) -> Endpoints:
    """The URLs the app resolved: those of `services`."""
    resolved = get_endpoints()
    assert resolved.database_url == services.database_url
    return resolved


@pytest.fixture(scope="session")
def worker(services: Services) -> Iterator[WorkController]:
    """A real Celery worker in this process, consuming the service's queues from the broker."""
    from tests.integration import harness_jobs  # noqa: F401  (registers the harness's jobs)

    with start_worker(
        celery,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30.0,
    ) as controller:
        yield controller


@pytest.fixture(autouse=True)
def clean_state(services: Services) -> Iterator[None]:
    """Every test starts with empty tables and queues, no mail and a fresh gateway."""
    quiesce_worker()
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    services.smtp.reset()
    services.gateway.reset()
    yield


def quiesce_worker(timeout: float = 60.0) -> None:
    """Leave nothing of earlier tests to run: empty queues, an idle in-process worker.

    Jobs an earlier test enqueued (a follow-up email, a retry scheduled for later) would
    otherwise run during the next test, or hold locks its TRUNCATE waits on.
    """
    deadline = time.monotonic() + timeout
    while True:
        # A connection of its own: a pooled one may have been shut by a forked child (py-amqp
        # shuts the socket it inherited when the child closes its copy of the pool).
        with celery.connection_for_write() as connection:
            purged = celery.control.purge(connection=connection)
        active = list(worker_state.active_requests)
        due = [r for r in worker_state.reserved_requests if not r.eta]
        if not purged and not active and not due:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"worker still busy after {timeout} s: {active + due}")
        time.sleep(0.05)
    for request in list(worker_state.reserved_requests):  # retries waiting for their ETA
        worker_state.revoked.add(request.id)
    clear_scheduled(get_endpoints().broker_url)  # retries and countdowns waiting in Redis


def clear_scheduled(broker_url: str) -> None:
    """Delete every job waiting in the scheduled set of `broker_url` (a Redis broker), and
    the flow-control records of jobs that were purged."""
    import redis

    from app.delivery.records import Keys
    from app.settings import redis_client_url

    client_url = redis_client_url(broker_url)
    if client_url is not None:
        keys = Keys()
        client = redis.Redis.from_url(client_url)
        client.delete(keys.schedule, keys.schedule_messages, keys.limits)
        # Flow control held by jobs that will now never run (their unique keys, their slots).
        for pattern in (keys.unique, keys.limit, keys.rate):
            stale = list(client.scan_iter(match=pattern + "*"))
            if stale:
                client.delete(*stale)


@pytest.fixture
def smtp(services: Services) -> SmtpServer:
    """The SMTP server every email of this run goes to."""
    return services.smtp


@pytest.fixture
def gateway(services: Services) -> GatewaySimulator:
    """The payment-gateway simulator the payment job charges through."""
    return services.gateway


class FinishedJobs(logging.Handler):
    """Collects the job layer's `job finished` records, from every worker thread."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "finish":
            with self._lock_records:
                self.records.append(record)

    def outcomes(self, task_id: str) -> list[str]:
        """The outcomes of the executions of `task_id` so far, in order."""
        with self._lock_records:
            return [
                str(getattr(r, "outcome", ""))
                for r in self.records
                if getattr(r, "task_id", None) == task_id
            ]

    def wait(self, task_id: str, executions: int, timeout: float = 60.0) -> list[str]:
        """Wait until `task_id` finished `executions` times; return the outcomes."""
        deadline = time.monotonic() + timeout
        while len(found := self.outcomes(task_id)) < executions:
            if time.monotonic() > deadline:
                raise AssertionError(f"{task_id} finished {len(found)} of {executions} times")
            time.sleep(0.05)
        return found


@pytest.fixture
def finished_jobs() -> Iterator[FinishedJobs]:
    """What the job layer reports finishing while the test runs."""
    handler = FinishedJobs()
    logger = logging.getLogger("app.jobs")
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


def deliver_twice(job: Any, *args: Any, **kwargs: Any) -> str:
    """Publish the same message twice (one task id), as a broker redelivery would."""
    task_id: str = uuid()
    job.apply_async(args, kwargs, task_id=task_id)
    job.apply_async(args, kwargs, task_id=task_id)
    return task_id


def run_at_once(call: Callable[[], Any], copies: int = 2) -> list[Any]:
    """Run `copies` of `call` in threads released together; return results or exceptions."""
    barrier = threading.Barrier(copies)
    results: list[Any] = [None] * copies

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = call()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def isolated_broker(broker_url: str, db: int) -> str:
    """The same Redis server, another database (app.scratch); skips where the broker is not
    Redis."""
    try:
        return scratch.isolated_broker(broker_url, db)
    except scratch.NotRedis as exc:
        raise pytest.skip.Exception(str(exc)) from None


@contextmanager
def celery_process(args: list[str], env: dict[str, str], log: Path) -> Iterator[Popen[bytes]]:
    """`celery -A app ARGS` as a child process, logging to `log`; stopped with SIGTERM."""
    process = scratch.start_celery(args, log, env)
    try:
        yield process
    finally:
        scratch.stop_celery(process)


#: Arguments of a worker subprocess that also runs the harness's jobs.
HARNESS_WORKER = [
    "worker",
    "--include",
    "tests.integration.harness_jobs",
    "--without-mingle",
    "--without-gossip",
    "--loglevel",
    "INFO",
]
ALL_QUEUES = ["--queues", "urgent,default,low"]


def producer_for(broker: str) -> Any:
    """A bare Celery app that publishes to `broker` (as another service would)."""
    from celery import Celery

    producer = Celery("producer", broker=broker)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    return producer


def worker_env(services: Services, broker: str, **extra: str) -> dict[str, str]:
    """The environment of a worker subprocess on `broker` and the tests' database (its outbox
    relay on, as by default: the in-process worker's is off, see `start_services`)."""
    return {
        **os.environ,
        "BROKER_URL": broker,
        "DATABASE_URL": services.database_url,
        "OUTBOX_RELAY": "true",
        **extra,
    }


def run_cli(
    services: Services, *args: str, broker: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`jobs-service ARGS` in a child process, on the tests' database and `broker`."""
    environment = {
        **os.environ,
        "DATABASE_URL": services.database_url,
        "BROKER_URL": broker or services.broker_url,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
