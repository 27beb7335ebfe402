"""Scratch databases, scratch Redis databases and worker processes, for the tests, the
benchmarks and the demo.

A run makes its own PostgreSQL database on the configured server (dropped and created fresh,
then migrated with Alembic), uses other databases of the same Redis server for queues that no
other worker consumes, and starts `celery -A app ...` as child processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from alembic.config import Config
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent


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
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


class NotRedis(ValueError):
    """The broker is not Redis, so it has no numbered databases to isolate queues in."""


def isolated_broker(broker_url: str, db: int) -> str:
    """The same Redis server, another database: queues no in-process worker consumes."""
    parts = urlsplit(broker_url)
    in_use = parts.query.removeprefix("virtual_host=") or parts.path.strip("/") or "0"
    if str(db) == in_use:
        raise ValueError(f"database {db} is the broker's own database; pick another")
    if parts.scheme == "redis+socket":  # (urlunsplit would drop the empty host's "//")
        return f"{broker_url.split('?')[0]}?virtual_host={db}"
    if parts.scheme in ("redis", "rediss"):
        return urlunsplit(parts._replace(path=f"/{db}"))
    raise NotRedis(f"needs a Redis broker, not {parts.scheme}")


def flush_broker(broker_url: str) -> None:
    """Empty the Redis database of `broker_url` (an isolated one, see isolated_broker)."""
    from app.delivery.clients import broker_client

    client = broker_client(broker_url)
    if client is None:
        raise NotRedis(f"needs a Redis broker, not {urlsplit(broker_url).scheme}")
    client.flushdb()


def start_celery(
    args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`celery -A app ARGS` as a child process in the project's root, its output added to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "app", *args],
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_celery(
    process: subprocess.Popen[bytes], signum: int = signal.SIGTERM, timeout: float = 60
) -> None:
    """Send `signum` (SIGTERM: a warm shutdown) and wait; SIGKILL if it has not ended in time."""
    if process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
