"""`--only hosts`: recovery after a worker host is cut off from the network, on Redis.

Hosts of their own on this machine (tests/integration/netns.py; root and iproute2): Redis and
PostgreSQL on one, a worker (`celery -A app worker`, default delivery settings) on each of two
others. Each round, the first worker takes two 20 s jobs; the second starts, and once its
heartbeat has run for the timeout (a worker recovers nobody before that), the first worker's
host has its link cut, or its process group is SIGKILLed (the baseline, in the same run, on the
same hosts); the time until both jobs start on the other worker is measured. Reported against
the heartbeat window: a worker is dead once its beat is `WORKER_HEARTBEAT_TIMEOUT` (5 s) old,
and beats every second.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from alembic import command

from app.delivery.records import workers
from app.scratch import alembic_config, recreate_database

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "bench" / "results" / "hosts"
#: Settings the workers never inherit: the benchmark measures the defaults.
OVERRIDES = ("BROKER_VISIBILITY_TIMEOUT", "WORKER_HEARTBEAT_TIMEOUT", "POISON_AFTER")
HEARTBEAT_TIMEOUT, HEARTBEAT_INTERVAL = 5.0, 1.0
#: Long enough to still run when the cut comes (the other worker is started and has beaten for
#: the heartbeat timeout by then: a worker recovers nobody before that).
JOB_SECONDS = 20.0


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"hosts benchmark: {what} not within {timeout:g} s")
        time.sleep(0.05)


class HostWorker:
    """A service worker (with the harness's jobs) on one host, a process group of its own."""

    def __init__(self, host: Any, env: dict[str, str], log: Path) -> None:
        self.host, self.env, self.log = host, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "celery", "-A", "app", "worker"]
        command += ["--include", "tests.integration.harness_jobs", "--queues", "default"]
        command += ["--concurrency", "2", "--without-mingle", "--without-gossip"]
        command += [
            "--loglevel",
            "INFO",
            "--hostname",
            f"{self.host.name}-{uuid.uuid4().hex[:6]}@%h",
        ]
        self.log.write_bytes(b"")
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.host.command(command),
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(lambda: " ready." in self.log.read_text(), 90, f"{self.host.name} ready")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def started(self, sku: str) -> bool:
        return f"'sku': '{sku}'" in self.log.read_text()


def _holds(client: redis.Redis, pid: int) -> int:
    return sum(s.held for s in workers(client) if s.info.get("pid") == pid)


def bench_hosts(rounds: int) -> dict[str, Any]:
    """`rounds` cuts and `rounds` SIGKILLs, alternated; seconds until the held jobs restart."""
    from tests.integration import netns

    if os.geteuid() != 0 or shutil.which("ip") is None or netns.postgres_bin() is None:
        return {
            "name": "recovery after a host is cut off",
            "size": 0,
            "baseline": "n/a",
            "measured": "not run: needs root, iproute2 and PostgreSQL's server binaries",
            "ratio": "n/a",
            "target": "n/a",
            "met": False,
        }
    LOGS.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"cut": [], "kill": []}
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(netns.Network())
        data = network.add("data")
        victim_host, survivor_host = network.add("w1"), network.add("w2")
        redis_args = ["redis-server", "--bind", data.address, "--port", str(netns.REDIS_PORT)]
        redis_args += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        stack.enter_context(
            netns.server(data.command(redis_args), LOGS / "redis.log", signal.SIGTERM)
        )
        pg_args, pg_data = netns.postgres_on(data, LOGS / "postgres.log")
        stack.callback(shutil.rmtree, pg_data, True)
        stack.enter_context(netns.server(pg_args, LOGS / "postgres.log", signal.SIGINT))
        server_url = f"postgresql+psycopg://root@{data.address}:{netns.PG_PORT}/postgres"
        _wait(lambda: netns.accepts(server_url), 60, "PostgreSQL up")
        database_url = recreate_database(server_url, "jobs")
        command.upgrade(alembic_config(database_url), "head")
        broker = f"redis://{data.address}:{netns.REDIS_PORT}/0"
        client = redis.Redis.from_url(broker)
        _wait(lambda: bool(client.ping()), 30, "Redis up")
        env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
        env.update(BROKER_URL=broker, DATABASE_URL=database_url, OUTBOX_RELAY="false")
        from celery import Celery

        producer = Celery("producer", broker=broker)
        producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
        survivor = HostWorker(survivor_host, env, LOGS / "survivor.log")
        victim = HostWorker(victim_host, env, LOGS / "victim.log")
        stack.callback(survivor.kill)
        stack.callback(victim.kill)
        stack.callback(victim_host.restore)
        for index in range(2 * rounds):
            how = "cut" if index % 2 == 0 else "kill"
            client.flushdb()  # (what the last round's killed workers held is no concern here)
            victim.start()
            assert victim.process is not None
            skus = [f"{how}-{index}-{n}" for n in range(2)]
            for sku in skus:
                producer.send_task(
                    "jobs.test_slow_record", args=[sku, JOB_SECONDS], queue="default"
                )
            pid = victim.process.pid
            _wait(lambda p=pid: _holds(client, p) == 2, 30, "the victim holds both jobs")
            _wait(lambda k=skus: all(victim.started(s) for s in k), 30, "both jobs started")
            survivor.start()  # (after the victim holds its jobs, so that it takes none)
            # Once its heartbeat has run for the timeout it may recover; at no fixed phase.
            time.sleep(HEARTBEAT_TIMEOUT + 0.5 + (index % 5) / 4)
            began = time.monotonic()
            if how == "cut":
                victim_host.cut()
            else:
                victim.kill()
            _wait(lambda k=skus: all(survivor.started(s) for s in k), 60, "held jobs run again")
            times[how].append(time.monotonic() - began)
            victim.kill()
            survivor.kill()
            victim_host.restore()
    cut, kill = times["cut"], times["kill"]
    window = HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL
    return {
        "name": "recovery after a host is cut off",
        "size": rounds,
        "baseline": (
            f"the same worker SIGKILLed (same hosts, same run): p50 "
            f"{statistics.median(kill):.1f} s, max {max(kill):.1f} s ({len(kill)} kills)"
        ),
        "measured": (
            f"link down to held jobs running on the other host: p50 "
            f"{statistics.median(cut):.1f} s, max {max(cut):.1f} s ({len(cut)} cuts, 2 jobs each)"
        ),
        "ratio": round(max(cut) / max(kill), 2),
        "target": f"within the heartbeat window ({window:g} s: timeout 5 s + one beat)",
        "met": max(cut) <= window + 1.0,
        "service": times,
        "note": (
            "Default settings. The jobs write no row until they end, so no row lock of the "
            "cut-off host delays them; a job that waits on one runs once PostgreSQL ends the "
            "cut-off session (about 10 s with app.db's keepalives)."
        ),
    }
