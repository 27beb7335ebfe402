"""The embedded default: real PostgreSQL and Redis from wheels, kept in a state folder."""

from __future__ import annotations

from pathlib import Path

import psycopg
import redis
from kombu.utils.url import url_to_parts

from app import embedded
from tests.integration.conftest import libpq_conninfo


def redis_client(broker_url: str) -> redis.Redis:
    socket_path = "/" + url_to_parts(broker_url.replace("redis+socket", "socket")).path
    return redis.Redis(unix_socket_path=socket_path)


def test_embedded_servers_start_keep_their_data_and_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = embedded.ensure_running(state)
    try:
        assert first.started == ("postgres", "redis")
        assert first.database_url is not None and first.broker_url is not None
        with psycopg.connect(libpq_conninfo(first.database_url), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        redis_client(first.broker_url).rpush("kept", "job")

        again = embedded.ensure_running(state)  # idempotent: nothing new started
        assert again.started == ()
        assert again == embedded.Running(first.database_url, first.broker_url, ())
    finally:
        assert embedded.stop(state) == ["redis", "postgres"]

    assert embedded.stop(state) == []  # nothing left running
    restarted = embedded.ensure_running(state)
    try:
        assert restarted.started == ("postgres", "redis")
        assert restarted.database_url is not None and restarted.broker_url is not None
        with psycopg.connect(libpq_conninfo(restarted.database_url)) as conn:
            assert conn.execute("SELECT n FROM kept").fetchall() == [(42,)]
        assert redis_client(restarted.broker_url).lrange("kept", 0, -1) == [b"job"]
    finally:
        embedded.stop(state)
