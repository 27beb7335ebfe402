"""Several hosts, one service: a worker host cut off from the network mid-run.

Five hosts on one machine (tests/integration/netns.py): Redis and PostgreSQL, each an instance
of this test's own, on one; a worker (`celery -A app worker`, concurrency 2, the default
delivery settings) on each of three others; the test process, with the SMTP server and the
payment-gateway simulator, on the bridge between them. A few thousand mixed jobs with
database effects run; mid-run one worker host's link goes down. Nothing tells anyone: its
Redis and PostgreSQL connections just go silent.

- What it held goes back to the queues once its heartbeat lapses (5 s by default), and runs on
  the two other hosts.
- When the link comes back, the cut-off worker finds itself declared dead; what it finishes
  late changes nothing twice (the jobs' idempotency), and its late acknowledgements touch
  nothing (each delivery has its own tag; the settle script finds the record gone).
- Every effect happens exactly once.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from alembic import command

from app.db import dispose_engine
from app.delivery.records import Keys, workers
from app.devservers.gateway import GatewaySimulator
from app.devservers.smtp import SmtpServer
from app.settings import get_endpoints, get_settings
from tests.integration.conftest import alembic_config, recreate_database
from tests.integration.factories import wait_until
from tests.integration.netns import (
    PG_PORT,
    REDIS_PORT,
    Host,
    Network,
    accepts,
    postgres_on,
    require_namespaces,
    server,
)
from tests.integration.test_worker_crash import (
    CrashingWorker,
    effects,
    enqueue_mixed_jobs,
    settled,
)

#: The shipped heartbeat settings (celeryconfig: 1 s beats, WORKER_HEARTBEAT_TIMEOUT 5 s).
HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT = 1.0, 5.0
#: How long the cut host stays cut off at most (it is plugged back once its jobs ran elsewhere),
#: and at least: past the heartbeat timeout and the database's keepalive detection (app.db).
CUT_FOR, CUT_AT_LEAST = 30.0, 12.0


@dataclass
class Cluster:
    """The hosts, their servers, and the URLs the test process and the workers use."""

    network: Network
    data: Host
    worker_hosts: list[Host]
    broker: str
    database_url: str
    smtp: SmtpServer
    gateway: GatewaySimulator

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.broker)


@contextlib.contextmanager
def pointed_at(**values: str) -> Iterator[None]:
    """This process's settings (and database engine) aimed at other servers for a while."""
    saved = {k: os.environ.get(k) for k in values}

    def reload() -> None:
        get_settings.cache_clear()
        get_endpoints.cache_clear()
        dispose_engine()

    os.environ.update(values)
    reload()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reload()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    require_namespaces()
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(Network())
        data = network.add("data")
        worker_hosts = [network.add(f"w{i}") for i in (1, 2, 3)]
        redis_args = ["redis-server", "--bind", data.address, "--port", str(REDIS_PORT)]
        redis_args += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        stack.enter_context(
            server(data.command(redis_args), tmp_path / "redis.log", signal.SIGTERM)
        )
        pg_args, pg_data = postgres_on(data, tmp_path / "postgres.log")
        stack.callback(shutil.rmtree, pg_data, True)
        stack.enter_context(server(pg_args, tmp_path / "postgres.log", signal.SIGINT))
        server_url = f"postgresql+psycopg://root@{data.address}:{PG_PORT}/postgres"
        wait_until(lambda: accepts(server_url), timeout=60)
        database_url = recreate_database(server_url, "jobs")
        command.upgrade(alembic_config(database_url), "head")
        broker = f"redis://{data.address}:{REDIS_PORT}/0"
        wait_until(lambda: redis.Redis.from_url(broker).ping(), timeout=30)
        smtp = SmtpServer(network.gateway)
        gateway = GatewaySimulator(network.gateway)
        smtp.start()
        stack.callback(smtp.stop)
        gateway.start()
        stack.callback(gateway.stop)
        stack.enter_context(
            pointed_at(
                DATABASE_URL=database_url,
                BROKER_URL=broker,
                SMTP_HOST=smtp.host,
                SMTP_PORT=str(smtp.port),
                PAYMENT_GATEWAY_URL=gateway.url,
            )
        )
        yield Cluster(network, data, worker_hosts, broker, database_url, smtp, gateway)


def held_by(client: redis.Redis, pid: int) -> dict[str, str]:
    """The deliveries (tag -> task id) the worker process `pid` holds, by its records."""
    keys = Keys()
    found = {}
    for state in workers(client):
        if state.info.get("pid") != pid:
            continue
        members: Any = client.smembers(keys.held(state.worker))
        for raw in members:
            tag = bytes(raw).decode()
            record: Any = client.hget("unacked", tag)
            match = re.search(rb'"id": "([0-9a-f-]{36})"', bytes(record or b""))
            if match:
                found[tag] = match.group(1).decode()
    return found


def finished_ids(logs: list[Path]) -> set[str]:
    """Task ids the job layer reported finished in `logs`."""
    pattern = re.compile(r"job finished [\w.]+\[([0-9a-f-]{36})\]")
    return {m.group(1) for log in logs for m in pattern.finditer(log.read_text())}


@pytest.mark.heavy
def test_a_worker_host_cut_off_mid_run_loses_nothing_and_doubles_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client()
    scenario = enqueue_mixed_jobs(cluster.broker)
    assert scenario.expected >= 3000
    env = {**os.environ, "OUTBOX_RELAY": "true"}
    hosts = cluster.worker_hosts
    logs = [tmp_path / f"{host.name}.log" for host in hosts]
    started = [
        CrashingWorker(env, log, prefix=host.command([]), name=host.name)
        for host, log in zip(hosts, logs, strict=True)
    ]
    cut_host, cut_worker, cut_log = hosts[0], started[0], logs[0]
    try:
        for worker in started:
            worker.start()
        # Mid-run: the first host holds deliveries, and some jobs are done.
        assert cut_worker.process is not None
        pid = cut_worker.process.pid
        wait_until(lambda: len(finished_ids(logs)) > 300 and held_by(client, pid), timeout=90)
        cut_host.cut()
        cut = time.monotonic()
        held = held_by(client, pid)
        assert held, "the cut-off host held nothing at the cut"
        # Its heartbeat lapses; a worker on another host puts what it held back.
        wait_until(lambda: not any(w.info.get("pid") == pid for w in workers(client)), 30, 0.1)
        recovered_after = time.monotonic() - cut
        # ...and they run there (the job layer logs each finish).
        others = logs[1:]
        wait_until(
            lambda: set(held.values()) <= finished_ids(others),
            timeout=CUT_FOR - (time.monotonic() - cut),
            every=0.2,
        )
        ran_after = time.monotonic() - cut
        time.sleep(max(0.0, CUT_AT_LEAST - ran_after))
        cut_host.restore()
        print(
            f"cut off holding {len(held)} deliveries; put back after {recovered_after:.1f} s, "
            f"all run on the other hosts after {ran_after:.1f} s "
            f"(heartbeat timeout {HEARTBEAT_TIMEOUT:g} s, beats every {HEARTBEAT_INTERVAL:g} s)"
        )
        # Plugged back in, the cut-off worker reaches Redis again, and its late
        # acknowledgements of what was taken from it are refused.
        back = time.monotonic()
        wait_until(lambda: "reaches Redis again" in cut_log.read_text(), timeout=60)
        wait_until(lambda: settled(client), timeout=180, every=1.0)
    finally:
        cut_host.restore()
        for worker in started:
            worker.stop()

    assert recovered_after <= HEARTBEAT_TIMEOUT + 3 * HEARTBEAT_INTERVAL
    # Those blocked by row locks its open transactions held ran once the database ended its
    # sessions (app.db's server-side keepalives: about 10 s).
    assert ran_after <= 25
    text = cut_log.read_text()
    after = text.split("reaches Redis again", 1)[1]
    assert "recovered" in "".join(log.read_text() for log in logs[1:])
    # Whatever the cut-off worker finished late was acknowledged into nothing: the records of
    # the deliveries the others took over are gone, and nothing is held or queued.
    keys = Keys()
    assert int(client.hlen(keys.inflight)) == 0 and int(client.hlen("unacked")) == 0
    stale_acks = text.count("was acknowledged after it had been taken back")
    finished_late = after.count("job finished")
    done = effects(scenario, cluster.smtp, cluster.gateway)
    lost = scenario.expected - sum(done.values())
    print(
        f"took effect: {done}; lost: {lost}; late acknowledgements refused: {stale_acks}; "
        f"jobs the cut-off worker finished after the link came back: {finished_late} "
        f"(plugged back after {back - cut:.1f} s); "
        f"gateway requests {cluster.gateway.requests}, emails {len(cluster.smtp.messages)}"
    )
    assert lost == 0
    # It had something to acknowledge late (a job it was running at the cut), and each such
    # acknowledgement found the delivery gone.
    assert stale_acks >= 1
