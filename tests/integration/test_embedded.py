"""The embedded default: real PostgreSQL and Redis from wheels, kept in a state folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from kombu.utils.url import url_to_parts

from app import embedded
from tests.integration.conftest import libpq_conninfo

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only


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


#: The command `run` wraps: says it is up, then waits to be stopped.
WAITING_COMMAND = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"


def _alive(pid: int) -> bool:
    # A zombie has exited: the daemonized Redis is reaped by init, which may take a while.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm-to-run", "ctrl-c-to-the-terminal-group"],
)
def test_run_stops_its_command_and_the_servers_it_started_on_sigterm_as_on_ctrl_c(
    tmp_path: Path, signum: int, to_group: bool
) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    run = subprocess.Popen(
        [sys.executable, "-m", "app.embedded", "run", "--", sys.executable, "-c", WAITING_COMMAND],
        env={**env, "APP_STATE_DIR": str(state)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        assert run.stdout is not None
        command_pid = int(run.stdout.readline())
        redis_pid = int((state / "redis" / "redis.pid").read_text())
        assert _alive(redis_pid) and embedded._postgres_running(state / "postgres")

        if to_group:
            os.killpg(run.pid, signum)
        else:
            os.kill(run.pid, signum)  # the wrapper alone, as a process manager does
        run.wait(timeout=60)

        assert not _alive(command_pid)
        assert not _alive(redis_pid)
        assert not embedded._postgres_running(state / "postgres")
    finally:
        if run.poll() is None:
            run.kill()
        embedded.stop(state)
