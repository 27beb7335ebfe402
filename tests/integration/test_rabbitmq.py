"""RabbitMQ as the broker, for real: the machine's RabbitMQ at 127.0.0.1:5672 (guest/guest).

The tests make one virtual host of their own for the session (`jobs_t_<pid>`), deleted at the
end, and purge its queues between tests. Two real workers run on it as an operator would run
them on RabbitMQ, one worker per queue group (app/delivery/rabbitmq.py, README "RabbitMQ"):

- `urgent`: `-Q urgent`, one process;
- `rest`: `-Q default,low`, two prefork processes.

What is shown: the queues are quorum queues with a delivery limit and a dead-letter exchange,
and what they dead-letter reaches the PostgreSQL dead-letter store (a message that keeps
killing its process as `poison`, an unknown job as `malformed`, a job out of retries as
`exhausted`); delays wait in RabbitMQ (Celery's native delayed delivery), never in a worker,
and never run early; a worker per queue keeps urgent jobs from waiting behind a low backlog;
a SIGKILLed worker's job is requeued by RabbitMQ and completes exactly once; flow control,
which lives in Redis, is not applied (a unique job is enqueued twice, with a warning).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection
from sqlalchemy import func, select

from app.celery_app import JobsCelery
from app.db import session_scope
from app.delivery import rabbitmq
from app.models import DeadLetter, Product
from app.settings import QUEUES, get_settings
from tests.integration.conftest import HARNESS_WORKER, ROOT, Services, worker_env
from tests.integration.factories import wait_until

HOST, PORT = "127.0.0.1", 5672
#: The queues the tests purge between tests (the delay queues are listed as found).
SERVICE_QUEUES = (*QUEUES, rabbitmq.DEAD_LETTER_QUEUE)


def _unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not installed (the tests make and delete a virtual host with it)"
    try:
        socket.create_connection((HOST, PORT), timeout=2).close()
    except OSError as exc:
        return f"RabbitMQ is not reachable at {HOST}:{PORT} ({exc})"
    return None


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


@dataclass(frozen=True)
class Rabbit:
    """The session's virtual host."""

    vhost: str

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{PORT}/{self.vhost}"

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue of the virtual host, by name: its type and arguments."""
        out = rabbitmqctl(
            "list_queues",
            "-p",
            self.vhost,
            "name",
            "type",
            "arguments",
            "--formatter",
            "json",
        )
        found = {q["name"]: q for q in json.loads(out)}
        for queue in found.values():  # (each argument is [name, type, value])
            queue["arguments"] = {a[0]: a[-1] for a in queue["arguments"]}
        return found

    def depth(self, name: str) -> tuple[int, int]:
        """(ready, consumers) of one queue, by a passive declare; (0, 0) if it does not exist."""
        with Connection(self.url) as conn:
            channel = conn.channel()
            try:
                _, ready, consumers = channel.queue_declare(name, passive=True)
            except conn.channel_errors:
                return 0, 0
            return int(ready), int(consumers)

    def purge(self) -> None:
        names = [*SERVICE_QUEUES, *(rabbitmq_delay_queues())]
        with Connection(self.url) as conn:
            for name in names:
                channel = conn.channel()
                try:
                    channel.queue_purge(name)
                except conn.channel_errors:
                    pass  # not declared yet
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()


def rabbitmq_delay_queues() -> list[str]:
    """Celery's native delayed delivery queues: one per power of two seconds."""
    return [f"celery_delayed_{level}" for level in range(28)]


@pytest.fixture(scope="session")
def rabbit() -> Iterator[Rabbit]:
    """A virtual host of this session's own, deleted at the end."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    vhost = f"jobs_t_{os.getpid()}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield Rabbit(vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


class Worker:
    """`celery -A app worker` on the virtual host, a process group that can be SIGKILLed."""

    def __init__(self, name: str, queues: str, concurrency: int, env: dict[str, str]) -> None:
        self.name, self.queues, self.concurrency, self.env = name, queues, concurrency, env
        self.log = Path(env["RABBIT_TEST_LOGS"]) / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.write_bytes(b"")
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", "app"),
                    *HARNESS_WORKER,
                    *("--queues", self.queues, "--pool", "prefork"),
                    *("--concurrency", str(self.concurrency), "--hostname", f"{self.name}@%h"),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        wait_until(lambda: b" ready." in self.log.read_bytes(), timeout=60)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def crash(self) -> None:
        """SIGKILL the worker and its pool, as a lost host."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Fleet:
    rabbit: Rabbit
    urgent: Worker
    rest: Worker
    producer: Any


def _producer(url: str) -> Any:
    """Another service's producer on the virtual host, set up as the service's own (its queues
    declared as quorum queues, so Celery sends delays through RabbitMQ's delay queues)."""
    app = JobsCelery("producer", broker=url, set_as_current=False)
    app.conf.update(
        task_queues=rabbitmq.task_queues(QUEUES, get_settings().poison_after - 1),
        task_default_queue="default",
        task_default_exchange=rabbitmq.JOBS_EXCHANGE,
        task_default_exchange_type="topic",
        task_default_routing_key="default",
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return app


@pytest.fixture(scope="module")
def fleet(
    rabbit: Rabbit, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """The two workers on the virtual host, with the default settings."""
    env = worker_env(services, rabbit.url)
    env.pop("RESULT_BACKEND", None)
    env["RABBIT_TEST_LOGS"] = str(tmp_path_factory.mktemp("rabbit"))
    urgent = Worker("urgent", "urgent", 1, env)
    rest = Worker("rest", "default,low", 2, env)
    for worker in (urgent, rest):
        worker.start()
    try:
        for worker in (urgent, rest):
            worker.wait_ready()
        yield Fleet(rabbit, urgent, rest, _producer(rabbit.url))
    finally:
        for worker in (urgent, rest):
            worker.stop()


@pytest.fixture
def on_rabbit(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet, with empty queues before and after the test."""
    fleet.rabbit.purge()
    yield fleet
    fleet.rabbit.purge()


def product_count(prefix: str) -> int:
    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Product).where(Product.sku.like(f"{prefix}%"))
            )
            or 0
        )


def dead_letters() -> list[DeadLetter]:
    with session_scope() as session:
        found = list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))
        session.expunge_all()
        return found


def test_queues_are_quorum_queues_with_a_delivery_limit_and_a_dead_letter_exchange(
    on_rabbit: Fleet,
) -> None:
    queues = on_rabbit.rabbit.queues()
    for name in QUEUES:
        arguments = queues[name]["arguments"]
        assert queues[name]["type"] == "quorum", name
        assert arguments["x-delivery-limit"] == get_settings().poison_after - 1
        assert arguments["x-dead-letter-exchange"] == rabbitmq.DEAD_LETTER_EXCHANGE
        assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert queues[rabbitmq.DEAD_LETTER_QUEUE]["type"] == "quorum"
    # The delay queues of native delayed delivery are quorum queues too: no plugin.
    assert queues["celery_delayed_0"]["type"] == "quorum"

    for queue in QUEUES:
        on_rabbit.producer.send_task("jobs.test_record_sku", [f"q-{queue}"], queue=queue)
    wait_until(lambda: product_count("q-") == 3, timeout=30)


def test_a_message_that_keeps_killing_its_process_is_dead_lettered_as_poison(
    on_rabbit: Fleet,
) -> None:
    on_rabbit.producer.send_task("jobs.test_kill_my_process", ["poison-1"], queue="default")

    entries = wait_until(dead_letters, timeout=60)
    assert [(e.job_name, e.reason, e.queue) for e in entries] == [
        ("jobs.test_kill_my_process", "poison", "default")
    ]
    assert entries[0].args == ["poison-1"]
    # Handed out POISON_AFTER times, as on Redis: each time its pool process died.
    assert on_rabbit.rest.text().count("kill_my_process poison-1 in") == (
        get_settings().poison_after
    )
    assert on_rabbit.rabbit.depth(rabbitmq.DEAD_LETTER_QUEUE)[0] == 0  # acknowledged


def test_an_unknown_job_is_dead_lettered_as_malformed(on_rabbit: Fleet) -> None:
    on_rabbit.producer.send_task("jobs.no_such_job", [1, "x"], queue="low")

    entries = wait_until(dead_letters, timeout=30)
    assert [(e.job_name, e.reason, e.queue, e.args) for e in entries] == [
        ("jobs.no_such_job", "malformed", "low", [1, "x"])
    ]
    assert "jobs.no_such_job" in (entries[0].raw_message or "") or entries[0].raw_message


def test_a_message_in_a_refused_content_type_is_dead_lettered_not_lost(on_rabbit: Fleet) -> None:
    headers = {"task": "jobs.test_record_sku", "id": "yaml-1", "argsrepr": "", "kwargsrepr": ""}
    with Connection(on_rabbit.rabbit.url) as conn:
        conn.Producer().publish(
            b"- [refused]\n- {}\n- {}\n",
            exchange=rabbitmq.JOBS_EXCHANGE,
            routing_key="default",
            headers=headers,
            content_type="application/x-yaml",
            content_encoding="utf-8",
        )

    entries = wait_until(dead_letters, timeout=30)
    assert [(e.task_id, e.job_name, e.reason, e.queue) for e in entries] == [
        ("yaml-1", "jobs.test_record_sku", "malformed", "default")
    ]
    assert "application/x-yaml" in entries[0].error_message
    assert "refused" in (entries[0].raw_message or "")
    assert product_count("") == 0


def test_a_delayed_job_waits_in_rabbitmq_not_in_a_worker_and_never_runs_early(
    on_rabbit: Fleet,
) -> None:
    sent = time.time()
    on_rabbit.producer.send_task("jobs.test_record_sku", ["later-5s"], countdown=5)

    # It waits in RabbitMQ's delay queues (5 s: 4 s, then 1 s), which no worker consumes, and
    # not in the service's queues. (Passive declares: rabbitmqctl's counts lag by seconds.)
    delays = [on_rabbit.rabbit.depth(f"celery_delayed_{level}") for level in range(3)]
    assert sum(ready for ready, _ in delays) == 1, delays
    assert all(consumers == 0 for _, consumers in delays), delays
    assert [on_rabbit.rabbit.depth(name)[0] for name in QUEUES] == [0, 0, 0]
    # A delay under a second (Celery alone raises on it with quorum queues) runs, not early.
    short_sent = time.time()
    on_rabbit.producer.send_task("jobs.test_record_sku", ["later-short"], countdown=0.3)

    wait_until(lambda: product_count("later-") == 2, timeout=30)
    with session_scope() as session:
        created = {
            p.sku: p.created_at.timestamp()
            for p in session.scalars(select(Product).where(Product.sku.like("later-%")))
        }
    assert created["later-5s"] >= sent + 5
    assert created["later-short"] >= short_sent + 0.3
    assert created["later-5s"] < sent + 15


def test_a_job_out_of_retries_is_dead_lettered_after_retries_that_waited_in_rabbitmq(
    on_rabbit: Fleet,
) -> None:
    sent = time.time()
    on_rabbit.producer.send_task("jobs.test_always_fails", ["never"])

    entries = wait_until(dead_letters, timeout=60)
    # Its queue is `default`, not the delay-prefixed key its retries arrived under.
    assert [(e.job_name, e.reason, e.attempts, e.queue) for e in entries] == [
        ("jobs.test_always_fails", "exhausted", 3, "default")
    ]
    # Three attempts, 2 s apart: the two waits passed in RabbitMQ's delay queues.
    assert entries[0].failed_at.timestamp() >= sent + 4


def test_a_worker_per_queue_keeps_urgent_jobs_from_waiting_behind_a_low_backlog(
    on_rabbit: Fleet,
) -> None:
    for n in range(40):
        on_rabbit.producer.send_task("jobs.test_slow_record", [f"backlog-{n}", 0.25], queue="low")
    wait_until(lambda: product_count("backlog-") >= 2, timeout=30)
    for n in range(5):
        on_rabbit.producer.send_task("jobs.test_record_sku", [f"urgent-{n}"], queue="urgent")

    wait_until(lambda: product_count("urgent-") == 5, timeout=30)
    # The low backlog (two processes, 0.25 s a job: 5 s of work) is still mostly there.
    assert product_count("backlog-") <= 20
    wait_until(lambda: product_count("backlog-") == 40, timeout=60)


def test_a_sigkilled_workers_job_is_requeued_by_rabbitmq_and_completes_once(
    on_rabbit: Fleet,
) -> None:
    worker = on_rabbit.rest
    on_rabbit.producer.send_task("jobs.test_slow_record", ["crash-1", 4.0], queue="default")
    started = "job started jobs.test_slow_record"
    wait_until(lambda: _runs(worker.text(), started, "crash-1") == 1, timeout=30)

    worker.crash()  # mid-job: the whole worker, pool and all
    killed_at = time.monotonic()
    # RabbitMQ requeues it as the connection closes: ready again, with nobody consuming it
    # (within seconds, where Redis needs its 5 s heartbeat window).
    wait_until(lambda: on_rabbit.rabbit.depth("default") == (1, 0), timeout=5)
    first_log = worker.text()
    worker.start()  # the replacement
    worker.wait_ready()

    wait_until(lambda: product_count("crash-") == 1, timeout=60)
    recovered_in = time.monotonic() - killed_at
    assert product_count("crash-") == 1
    assert _runs(first_log, started, "crash-1") == 1
    assert _runs(worker.text(), started, "crash-1") == 1  # the rerun, in the replacement
    time.sleep(1)
    assert product_count("crash-") == 1
    assert recovered_in < 60


def _runs(log: str, started: str, token: str) -> int:
    """How many runs of the job with argument `token` the worker's log shows starting."""
    return sum(1 for line in log.splitlines() if started in line and token in line)


def test_flow_control_is_not_applied_on_rabbitmq_a_unique_job_is_enqueued_twice_with_a_warning(
    on_rabbit: Fleet, services: Services
) -> None:
    # The job layer enqueues, in a process whose broker is RabbitMQ (as a producer of this
    # service would): unique_for needs Redis, so both copies are enqueued and both run.
    code = (
        "from tests.integration.harness_jobs import unique_record as job; "
        "job.delay('flow', 1); job.delay('flow', 2)"
    )
    env = worker_env(services, on_rabbit.rabbit.url)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "unique_for needs a Redis broker; enqueued without it" in done.stderr

    wait_until(lambda: product_count("flow-") == 2, timeout=30)
