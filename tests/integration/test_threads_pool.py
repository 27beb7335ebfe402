"""The threads pool (`--pool threads`) keeps prefork's guarantees (app/threads.py).

Real workers (`celery -A app worker --pool threads`), default settings otherwise:

- 16 threads each hold a database connection at the same time (the engine is sized to the
  pool; SQLAlchemy's default of 5 + 5 would make six of them wait);
- a job past its soft time limit gets SoftTimeLimitExceeded in its thread: its transaction
  rolls back and it is dead-lettered as on prefork (Celery's threads pool has no time limits);
- a threads worker SIGKILLed with jobs in its threads: a live worker takes them back by
  heartbeat and each runs to its effect exactly once;
- a warm shutdown lets the running jobs finish and leaves the unstarted ones queued;
- a worker holds two messages per thread (THREADS_PREFETCH), one with THREADS_PREFETCH=1;
- hostile bytes LPUSHed into the queue are dead-lettered and the worker goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select

from app.db import session_scope
from app.models import DeadLetter, Product
from app.settings import redis_client_url
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    ROOT,
    Services,
    flush_broker,
    isolated_broker,
    producer_for,
    worker_env,
)
from tests.integration.factories import wait_until
from tests.integration.harness_jobs import DB_SPANS_KEY

THREADS = 16


def threads_worker(
    services: Services,
    broker: str,
    log: Path,
    name: str,
    concurrency: int = THREADS,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A threads-pool worker as a process group of its own (so a SIGKILL takes it all)."""
    pool = ["--pool", "threads", "--concurrency", str(concurrency), "--hostname", name]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "app", *HARNESS_WORKER, *ALL_QUEUES, *pool],
            cwd=ROOT,
            env={**worker_env(services, broker), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def client_for(broker: str) -> redis.Redis:
    return redis.Redis.from_url(redis_client_url(broker) or "")


def products(prefix: str) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(Product.sku).where(Product.sku.like(prefix + "%"))))


def dead_letters() -> list[DeadLetter]:
    with session_scope() as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def describe(letter: DeadLetter) -> str:
    error = letter.error_message[:160]
    return f"{letter.job_name}{letter.args} {letter.reason} {letter.error_type}: {error}"


def max_overlap(spans: list[dict[str, Any]]) -> int:
    events = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_every_thread_holds_a_database_connection_at_once(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 13)
    flush_broker(broker)
    client = client_for(broker)
    worker = threads_worker(services, broker, tmp_path / "worker.log", "threads-db@%h")
    try:
        producer = producer_for(broker)
        for i in range(THREADS):
            producer.send_task("jobs.test_db_span", args=[f"span-{i}", 3.0], queue="default")
        wait_until(lambda: client.llen(DB_SPANS_KEY) == THREADS, timeout=90)
    finally:
        stop(worker)

    spans = [json.loads(raw) for raw in client.lrange(DB_SPANS_KEY, 0, -1)]
    assert sorted(s["token"] for s in spans) == sorted(f"span-{i}" for i in range(THREADS))
    # All sixteen held a connection (a transaction open) at the same time, each its own.
    assert max_overlap(spans) == THREADS
    assert len({s["backend"] for s in spans}) == THREADS
    assert dead_letters() == []


def test_a_job_past_its_soft_time_limit_is_stopped_in_its_thread(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 13)
    flush_broker(broker)
    worker = threads_worker(services, broker, tmp_path / "worker.log", "threads-limit@%h", 4)
    try:
        started = time.monotonic()
        # The job would work for 60 s; its soft time limit is 1 s.
        producer_for(broker).send_task(
            "jobs.test_busy_write", args=["threads-limit", 60.0], queue="default"
        )
        wait_until(dead_letters, timeout=30)
        took = time.monotonic() - started
        # The worker goes on: another job runs after the stopped one.
        producer_for(broker).send_task(
            "jobs.test_record_sku", args=["threads-after-limit"], queue="default"
        )
        wait_until(lambda: products("threads-after-limit"), timeout=30)
    finally:
        stop(worker)

    [letter] = dead_letters()
    assert letter.job_name == "jobs.test_busy_write"
    assert letter.reason == "time_limit"
    assert letter.error_type.endswith(".SoftTimeLimitExceeded")  # (billiard's, as on prefork)
    assert took < 30  # stopped at its limit, not after its 60 s of work
    assert products("threads-limit") == []  # its transaction rolled back
    log = (tmp_path / "worker.log").read_text()
    assert "passed its soft time limit" in log


def test_a_killed_threads_worker_loses_nothing_and_doubles_nothing(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 13)
    flush_broker(broker)
    client = client_for(broker)
    count = 40
    doomed = threads_worker(services, broker, tmp_path / "doomed.log", "threads-doomed@%h", 8)
    survivor: subprocess.Popen[bytes] | None = None
    try:
        producer = producer_for(broker)
        ids = {
            f"tk-{i:03}": producer.send_task(
                "jobs.test_slow_record", args=[f"tk-{i:03}", 1.0], queue="default"
            ).id
            for i in range(count)
        }

        def mid_job() -> bool:
            """Some ran, eight held deliveries are jobs not yet committed, and no held one has
            committed. A job that has committed but not yet been acknowledged would rightly
            run again after the kill (at least once), and fail on its sku. The worker holds
            two messages per thread, so "eight held not done" can be the eight waiting ones
            while a running one sits in that window: it must be ruled out itself."""
            records: Any = client.hvals("unacked")  # (before the products: a job committing
            held = b"".join(records)  # in between shows in both, and is ruled out)
            done = set(products("tk-"))
            held_ids = {s for s, i in ids.items() if i.encode() in held}
            return len(done) >= 8 and len(held_ids - done) >= 8 and not held_ids & done

        wait_until(mid_job, timeout=60, every=0.05)
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        survivor = threads_worker(
            services, broker, tmp_path / "survivor.log", "threads-survivor@%h", 8
        )
        wait_until(lambda: len(products("tk-")) == count, timeout=120)
        time.sleep(2)  # a second run of any job would show as a duplicate key now
    finally:
        stop(doomed)
        if survivor is not None:
            stop(survivor)

    assert sorted(products("tk-")) == [f"tk-{i:03}" for i in range(count)]
    # No job ran twice (a second insert would fail on the sku and be dead-lettered).
    assert [describe(letter) for letter in dead_letters()] == []
    log = (tmp_path / "survivor.log").read_text()
    assert "held by worker" in log  # the survivor took the killed worker's jobs back


def test_a_warm_shutdown_finishes_running_jobs_and_leaves_the_rest_queued(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 13)
    flush_broker(broker)
    client = client_for(broker)
    count = 30
    worker = threads_worker(services, broker, tmp_path / "worker.log", "threads-warm@%h", 4)
    try:
        producer = producer_for(broker)
        for i in range(count):
            producer.send_task("jobs.test_slow_record", args=[f"wm-{i:03}", 1.5], queue="default")
        wait_until(lambda: client.hlen("unacked") >= 4, timeout=60)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    finally:
        stop(worker)

    done = products("wm-")
    assert 4 <= len(done) < count  # the running ones finished; the worker stopped early
    assert client.llen("default") == count - len(done)  # the rest is queued again
    assert client.hlen("unacked") == 0  # nothing left held by the stopped worker
    # and a new worker runs exactly the rest
    worker = threads_worker(services, broker, tmp_path / "worker2.log", "threads-warm2@%h", 4)
    try:
        wait_until(lambda: len(products("wm-")) == count, timeout=90)
    finally:
        stop(worker)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 0


def test_a_threads_worker_holds_two_messages_a_thread_or_threads_prefetch(
    services: Services, tmp_path: Path
) -> None:
    """Two held per thread by default (the second starts when a thread frees, with no fetch in
    between), one with THREADS_PREFETCH=1; a warm shutdown gives back the unstarted."""
    broker = isolated_broker(services.broker_url, 13)
    client = client_for(broker)
    for prefetch, held in (("", 4), ("1", 2)):
        flush_broker(broker)
        env = {"THREADS_PREFETCH": prefetch} if prefetch else {}
        log = tmp_path / f"held-{held}.log"
        worker = threads_worker(services, broker, log, f"threads-held{held}@%h", 2, env)
        try:
            producer = producer_for(broker)
            for i in range(8):
                producer.send_task(
                    "jobs.test_slow_record", args=[f"pf{held}-{i}", 4.0], queue="default"
                )
            wait_until(lambda: client.hlen("unacked") >= held, timeout=60)  # noqa: B023
            # (the service's pool: Celery's threads pool, its hand-off lighter; app.threads)
            stats = producer.control.inspect(timeout=10, limit=1).stats() or {}
            pools = [worker_stats["pool"] for worker_stats in stats.values()]
            assert pools and pools[0]["implementation"] == "app.threads:ThreadsPool"
            assert pools[0]["max-concurrency"] == 2 and pools[0]["threads"] == 2
            time.sleep(0.5)  # (long enough for a fetch beyond the window to show)
            assert client.hlen("unacked") == held
            assert client.llen("default") == 8 - held
            assert products(f"pf{held}-") == []  # none finished yet: the counts are the window
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        finally:
            stop(worker)
        assert len(products(f"pf{held}-")) == 2  # the two running finished
        assert client.llen("default") == 6 and client.hlen("unacked") == 0


def test_hostile_bytes_pushed_into_redis_do_not_stop_a_threads_worker(
    services: Services, tmp_path: Path
) -> None:
    """What a buggy producer in another language writes, LPUSHed straight into the queue
    (below kombu's encoder): each is dead-lettered, the good jobs around them run."""
    import base64

    broker = isolated_broker(services.broker_url, 13)
    flush_broker(broker)
    client = client_for(broker)
    unknown_job = {
        "body": base64.b64encode(json.dumps([[1], {}, {}]).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "jobs.no_such_job", "id": "threads-unknown"},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "threads-unknown",
            "delivery_info": {"exchange": "", "routing_key": "default"},
            "priority": 0,
        },
    }
    hostile = [b"\xf7 not json", b"null", b'["an", "array"]', json.dumps(unknown_job).encode()]
    producer = producer_for(broker)
    producer.send_task("jobs.test_record_sku", args=["threads-hostile-0"], queue="default")
    for raw in hostile:
        client.lpush("default", raw)
    producer.send_task("jobs.test_record_sku", args=["threads-hostile-1"], queue="default")
    worker = threads_worker(services, broker, tmp_path / "worker.log", "threads-hostile@%h", 4)
    try:
        wait_until(lambda: len(products("threads-hostile-")) == 2, timeout=60)
        wait_until(lambda: len(dead_letters()) == len(hostile), timeout=30)
        assert worker.poll() is None  # still running
        producer.send_task("jobs.test_record_sku", args=["threads-hostile-2"], queue="default")
        wait_until(lambda: len(products("threads-hostile-")) == 3, timeout=30)
    finally:
        stop(worker)
    assert {letter.reason for letter in dead_letters()} == {"malformed"}
    assert client.llen("default") == 0 and client.hlen("unacked") == 0


def test_short_jobs_grow_the_held_window_to_four_a_thread_and_no_further(
    services: Services, tmp_path: Path
) -> None:
    """With the default settings, a threads worker of 2 draining jobs of about a millisecond
    holds more than its floor of two a thread (its pace fills THREADS_HOLD_AHEAD) and never
    more than four; with THREADS_HOLD_AHEAD=0, two a thread at most. Each job runs once."""
    from tests.integration.harness_jobs import RUNS_KEY

    broker = isolated_broker(services.broker_url, 13)
    client = client_for(broker)
    count = 3000
    for ahead, least, most in (("", 5, 8), ("0", 1, 4)):
        flush_broker(broker)
        producer = producer_for(broker)
        with producer.connection_for_write() as connection, connection.Producer() as publisher:
            for i in range(count):
                producer.send_task(
                    "jobs.test_record_run",
                    args=[f"w{ahead}-{i}"],
                    queue="default",
                    producer=publisher,
                )
        env = {"THREADS_HOLD_AHEAD": ahead} if ahead else {}
        log = tmp_path / f"window-{ahead or 'default'}.log"
        worker = threads_worker(services, broker, log, f"threads-window{ahead}@%h", 2, env)
        held: list[int] = []
        try:
            deadline = time.monotonic() + 120
            while client.llen(RUNS_KEY) < count and time.monotonic() < deadline:
                held.append(int(client.hlen("unacked")))
                time.sleep(0.002)
        finally:
            stop(worker)
        runs = [json.loads(entry)["token"] for entry in client.lrange(RUNS_KEY, 0, -1)]
        assert sorted(runs) == sorted(f"w{ahead}-{i}" for i in range(count))
        assert least <= max(held) <= most, (ahead, max(held))
