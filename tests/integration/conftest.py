"""The integration harness: real PostgreSQL, real Redis, a real Celery worker.

The servers are the ones `DATABASE_URL` / `BROKER_URL` name, or the embedded default when they
are unset (started here and stopped at the end if this run started them). Tests get a database
of their own, `<database>_pytest`, made fresh and migrated with Alembic once per run; every test
starts from empty tables and empty queues.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from celery.contrib.testing.worker import start_worker
from celery.worker import WorkController
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app import celery, embedded
from app.db import dispose_engine, get_engine
from app.models import Base
from app.settings import Endpoints, get_endpoints, get_settings, load_settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Services:
    """What the integration tests run against."""

    database_url: str  # the tests' own database
    server_url: str  # the server's maintenance database, for making more databases
    broker_url: str


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


def libpq_conninfo(sqlalchemy_url: str) -> str:
    """The libpq form of a SQLAlchemy URL, for psycopg connections outside the engine."""
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


def recreate_database(server_url: str, name: str) -> str:
    """Drop and create database `name` on the server of `server_url`; return its URL."""
    with psycopg.connect(libpq_conninfo(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    """Drop database `name` if it exists."""
    with psycopg.connect(libpq_conninfo(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic_config(database_url: str) -> Config:
    """An Alembic config for the project's migrations, aimed at `database_url`."""
    config = Config(os.path.join(ROOT, "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


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

    saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "BROKER_URL")}
    os.environ["DATABASE_URL"] = test_url
    os.environ["BROKER_URL"] = broker_url
    get_settings.cache_clear()
    get_endpoints.cache_clear()
    dispose_engine()

    def stop_services() -> None:
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
    return Services(test_url, server_url, broker_url), stop_services


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
    """Every test starts with empty tables and empty queues."""
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    celery.control.purge()
    yield
