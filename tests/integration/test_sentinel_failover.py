"""Redis with failover: the service on `sentinel://` URLs, with its own transport.

Each test starts its own primary, replica(s) and three sentinels on loopback (ports 6550-6572,
26550-26572), a real worker (`celery -A app worker`) and a producer process that publishes
through the service's app. The service's settings stay default; only the test's sentinels
declare a primary down after 2 s instead of 30 s, to keep the test short.

Lost = a job whose publish the broker acknowledged to the producer but that never ran. Redis
replicates asynchronously, so what the primary acknowledged and had not yet sent to its
replica when it was killed can be lost: only jobs acknowledged in the moment before the kill.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from app.db import session_scope
from app.devservers.sentinel import SentinelCluster, redis_server
from app.models import Product
from app.scratch import start_celery, stop_celery
from app.settings import redis_client_url
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    ROOT,
    Services,
    flush_broker,
    isolated_broker,
    worker_env,
)
from tests.integration.factories import wait_until

MASTER = "jobs"
#: The Redis database of the test on the harness's own (replica-less) Redis.
DB = 13


def skus_run(prefix: str) -> set[str]:
    with_prefix = select(Product.sku).where(Product.sku.like(f"{prefix}-%"))
    with session_scope() as session:
        return set(session.scalars(with_prefix))


def publish(
    cluster: SentinelCluster, prefix: str, count: int, rate: float, *extra: str, **env: str
) -> subprocess.Popen[str]:
    """The producer process (tests/integration/sentinel_producer.py) on the cluster."""
    script = [sys.executable, "-m", "tests.integration.sentinel_producer"]
    return subprocess.Popen(
        [*script, prefix, str(count), str(rate), *extra],
        cwd=ROOT,
        env={
            **os.environ,
            "BROKER_URL": cluster.url,
            "BROKER_SENTINEL_MASTER": MASTER,
            "RESULT_BACKEND": "",
            **env,
        },
        stdout=subprocess.PIPE,
        text=True,
    )


def acknowledged(lines: list[str]) -> dict[str, float]:
    """sku -> when the broker acknowledged its publish, from the producer's output."""
    found: dict[str, float] = {}
    for line in lines:
        parts = line.split()
        if parts and parts[0] == "ok":
            found[parts[1]] = float(parts[2])
    return found


class Run:
    """A cluster and a worker on it, for one test."""

    def __init__(self, cluster: SentinelCluster, worker: subprocess.Popen[bytes], log: Path):
        self.cluster, self.worker, self.log = cluster, worker, log


@pytest.fixture
def cluster_run(
    request: pytest.FixtureRequest, services: Services, tmp_path: Path
) -> Iterator[Run]:
    if redis_server() is None:
        pytest.skip("needs redis-server on PATH to start a primary, a replica and sentinels")
    redis_ports, sentinel_ports, extra_env = request.param
    cluster = SentinelCluster(
        tmp_path / "servers", redis_ports, sentinel_ports, MASTER, down_after_ms=2000
    )
    try:
        cluster.start()
        log = tmp_path / "worker.log"
        env = worker_env(services, cluster.url, BROKER_SENTINEL_MASTER=MASTER, RESULT_BACKEND="")
        worker = start_celery(
            [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "2"], log, {**env, **extra_env}
        )
        try:
            wait_until(lambda: " ready." in log.read_text(), timeout=60)
            yield Run(cluster, worker, log)
        finally:
            stop_celery(worker, timeout=20)
    finally:
        cluster.stop()


Cluster = tuple[list[int], list[int], dict[str, str]]
SMOKE: Cluster = ([6550], [26550], {})


@pytest.mark.parametrize("cluster_run", [SMOKE], indirect=True)
def test_jobs_run_end_to_end_through_sentinel_on_the_services_transport(
    cluster_run: Run,
) -> None:
    cluster = cluster_run.cluster
    master = cluster.client()
    producer = publish(cluster, "smoke", 20, 50)
    later = publish(cluster, "later", 3, 50, "3")  # countdown 3 s: the scheduled set
    out, _ = producer.communicate(timeout=60)
    out_later, _ = later.communicate(timeout=60)
    assert len(acknowledged(out.splitlines())) == 20, out
    assert len(acknowledged(out_later.splitlines())) == 3, out_later
    # The service's transport, not kombu's stock one: heartbeats and the scheduled set.
    assert master.zcard("jobs_service:workers") >= 1
    assert master.zcard("jobs_service:schedule") == 3
    wait_until(lambda: len(skus_run("smoke")) == 20, timeout=30)
    wait_until(lambda: len(skus_run("later")) == 3, timeout=30)
    wait_until(lambda: master.hlen("jobs_service:inflight") == 0, timeout=10)
    assert master.zcard("jobs_service:schedule") == 0


def run_failover(
    run: Run, prefix: str, wait_replicas: int = 0, rejoin: bool = False
) -> dict[str, Any]:
    """Publish for ~8 s, SIGKILL the primary after ~3 s (and with `rejoin`, start it again as
    a replica once the failover is done); return what was acknowledged, run and lost."""
    cluster = run.cluster
    env = {"BROKER_WAIT_REPLICAS": str(wait_replicas)} if wait_replicas else {}
    producer = publish(cluster, prefix, 800, 100, **env)
    time.sleep(3.0)
    killed_at = time.time()
    old = cluster.kill_primary()
    new = cluster.wait_failover(old)
    failed_over_at = time.time()
    if rejoin:
        cluster.rejoin(old, new)
    out, _ = producer.communicate(timeout=120)
    acked = acknowledged(out.splitlines())
    # Wait for the worker to run all it can: stop once nothing new has run for 12 s (more
    # than the heartbeat recovery's 5 s).
    ran: set[str] = set()
    quiet_since = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 12:
        now = skus_run(prefix)
        if set(acked) <= now:
            ran = now
            break
        if len(now) > len(ran):
            ran, quiet_since = now, time.monotonic()
        time.sleep(0.5)
    lost = sorted(set(acked) - ran, key=lambda s: int(s.rsplit("-", 1)[1]))
    # Where the lost jobs are on the new primary: a lost job is absent; one left "queued" or
    # "held" would be a job stuck by the service, not lost by replication.
    master = cluster.client()
    stored = {
        "queued": " ".join(map(str, master.lrange("default", 0, -1))),
        "held": " ".join(map(str, master.hvals("unacked"))),
        "scheduled": " ".join(map(str, master.hvals("jobs_service:schedule:messages"))),
    }
    where = {
        sku: next((w for w, raw in stored.items() if f'"{sku}"' in raw), "absent") for sku in lost
    }
    failures = [line for line in out.splitlines() if line.startswith("fail ")]
    figures: dict[str, Any] = {
        "acknowledged": len(acked),
        "failed_publishes": len(failures),
        "errors": sorted({line.split()[3] for line in failures}),
        "ran": len(ran & set(acked)),
        "lost": len(lost),
        "lost_skus": lost,
        "lost_where": where,
        "primaries": [old, new, cluster.primary_port()],
        "workers": master.zcard("jobs_service:workers"),
        "killed_at": killed_at,
        "failed_over_in": round(failed_over_at - killed_at, 2),
        "acked_after_failover": sum(1 for t in acked.values() if t > failed_over_at),
        "last_lost_before_kill": [round(killed_at - acked[s], 3) for s in lost],
        "new_primary": new,
    }
    print(f"sentinel failover ({prefix}): {figures}")
    assert run.worker.poll() is None, "the worker died"
    switches = (run.cluster.workdir / f"redis-{run.cluster.sentinel_ports[0]}.log").read_text()
    assert switches.count("+switch-master") == 1, "the sentinels failed over more than once"
    # It reconnected with the service's transport, not kombu's stock sentinel one.
    log = run.log.read_text()
    assert log.count("Connected to app.delivery.transport:SentinelTransport://") >= 2, log[-3000:]
    assert "Connected to sentinel://" not in log
    # Producers followed the failover: they publish to the new primary.
    assert figures["acked_after_failover"], figures
    # Workers followed it: everything acknowledged after the failover ran.
    after = {s for s, t in acked.items() if t > failed_over_at}
    assert after <= ran, sorted(after - ran)[:10]
    # The service kept nothing back: whatever is lost is absent from the new primary.
    assert set(where.values()) <= {"absent"}, figures
    return figures


ASYNC: Cluster = ([6551, 6552], [26551, 26552, 26553], {})
WAITED: Cluster = ([6561, 6562], [26561, 26562, 26563], {})


@pytest.mark.heavy
@pytest.mark.parametrize("cluster_run", [ASYNC], indirect=True)
def test_workers_and_producers_follow_a_failover_and_only_unreplicated_jobs_can_be_lost(
    cluster_run: Run,
) -> None:
    figures = run_failover(cluster_run, "async")
    # Asynchronous replication: a lost job was acknowledged in the moment before the kill,
    # while the replica had not received it yet (on loopback, well under a second).
    assert all(0 <= ago < 1.0 for ago in figures["last_lost_before_kill"]), figures


@pytest.mark.heavy
@pytest.mark.parametrize("cluster_run", [WAITED], indirect=True)
def test_with_broker_wait_replicas_no_acknowledged_job_is_lost_in_a_failover(
    cluster_run: Run,
) -> None:
    # One replica, and every publish waits for it: whichever server the sentinels promote
    # holds every acknowledged job. Until the killed server rejoins as the new primary's
    # replica, publishes raise NotReplicated (the producer's to retry), not acknowledged.
    figures = run_failover(cluster_run, "waited", wait_replicas=1, rejoin=True)
    assert figures["lost"] == 0, figures
    assert set(figures["errors"]) <= {"NotReplicated:", "OperationalError:"}, figures


NOT_REPLICATED = """
from app.delivery.transport import NotReplicated
from app.jobs.base import perform_all_later
from tests.integration.harness_jobs import record_once
for publish in (lambda: record_once.delay("single"),
                lambda: perform_all_later([record_once.s(f"bulk-{i}") for i in range(3)])):
    try:
        publish()
    except NotReplicated as exc:
        print("NotReplicated:", exc)
    else:
        print("published")
"""


def test_with_broker_wait_replicas_a_publish_no_replica_confirms_raises_a_clear_error(
    services: Services,
) -> None:
    broker = isolated_broker(services.broker_url, DB)  # a Redis with no replica at all
    flush_broker(broker)
    result = subprocess.run(
        [sys.executable, "-c", NOT_REPLICATED],
        cwd=ROOT,
        env={**worker_env(services, broker), "BROKER_WAIT_REPLICAS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert all(
        line.startswith("NotReplicated: published to the Redis primary, but 0 of the 1 replica")
        for line in lines
    ), lines
    # The error says "not safe", not "not sent": the jobs are on the primary.
    assert redis.Redis.from_url(redis_client_url(broker) or "").llen("default") == 4
