"""The web view's pages with a large store (`python -m bench.run --only web`).

Seeds 100,000 dead letters (PostgreSQL, one INSERT ... SELECT), 100,000 jobs waiting in the
scheduled set (written as the service writes them: the sorted set and the messages hash),
50 worker processes (heartbeats, worker records, two in-flight jobs each with kombu's `unacked`
records) and 1,000 batches, then times every page in-process through Flask's test client (the
whole request: basic auth, the reads, the template), 15 requests each after 3 warm-ups, and
reports the median and the slowest. Target: every page under 200 ms. Baseline: reading the
whole store, as a page without paging would (every dead letter, every scheduled entry).
"""

from __future__ import annotations

import base64
import json
import statistics
import time
import uuid
from typing import Any

#: Page -> path. The filters pick a job holding 1% of the entries and one holding none (the
#: worst case for a filter: nothing to stop the read early).
PAGES = (
    ("dashboard", "/"),
    ("queues", "/queues"),
    ("busy", "/busy"),
    ("scheduled", "/scheduled"),
    ("scheduled, later page", "/scheduled?offset=50000"),
    ("scheduled ?job= (1%)", "/scheduled?job=jobs.send_email"),
    ("scheduled ?job= (none)", "/scheduled?job=jobs.none_such"),
    ("retries", "/retries"),
    ("dead", "/dead"),
    ("dead, older page", "/dead?before=50000"),
    ("dead ?job= (1%)", "/dead?job=jobs.send_email"),
    ("dead ?job= (none)", "/dead?job=jobs.none_such"),
    ("dead letter", "/dead/{dead_id}"),
    ("batches", "/batches"),
    ("recurring", "/recurring"),
    ("flow", "/flow"),
)
TARGET_MS = 200.0
WARMUP, ROUNDS = 3, 15


def _message(job: str, task_id: str, args: list[Any], eta: str, queue: str) -> dict[str, Any]:
    """A Celery protocol 2 message as kombu's Redis transport stores it."""
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": job, "id": task_id, "eta": eta, "retries": 0},
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def seed_dead_letters(size: int) -> int:
    """`size` dead letters, 1% of them jobs.send_email; the id of one in the middle."""
    from sqlalchemy import text

    from app.db import session_scope

    with session_scope() as session:
        session.execute(
            text(
                "INSERT INTO dead_letters (task_id, job_name, queue, args, kwargs, headers, "
                "reason, error_type, error_message, traceback, attempts) "
                "SELECT gen_random_uuid()::text, "
                "CASE WHEN g % 100 = 0 THEN 'jobs.send_email' ELSE 'jobs.process_order' END, "
                "'default', jsonb_build_array(g), '{}'::jsonb, '{}'::jsonb, 'exhausted', "
                "'app.jobs.errors.Boom', 'failed number ' || g, "
                "'Traceback (most recent call last):\n  File \"x.py\", line 1\nBoom', 5 "
                "FROM generate_series(1, :size) AS g"
            ),
            {"size": size},
        )
        session.execute(
            text(
                "INSERT INTO job_batches (description, callbacks, total, pending) "
                "SELECT 'bench batch ' || g, '{}'::jsonb, 100, g % 101 "
                "FROM generate_series(1, 1000) AS g"
            )
        )
        middle = session.execute(
            text("SELECT id FROM dead_letters ORDER BY id OFFSET :half LIMIT 1"),
            {"half": size // 2},
        ).scalar_one()
    return int(middle)


def seed_scheduled(client: Any, prefix: str, size: int) -> None:
    """`size` jobs due over the next day, 1% jobs.send_email, in the service's scheduled set."""
    import datetime as dt

    from app.delivery import scheduled
    from app.delivery.records import Keys

    keys = Keys(prefix)
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        for i in range(size):
            job = "jobs.send_email" if i % 100 == 0 else "jobs.process_order"
            task_id = str(uuid.uuid4())
            due = now + 60 + i * 0.8
            eta = dt.datetime.fromtimestamp(due, dt.UTC).isoformat()
            payload = _message(job, task_id, [i], eta, "default")
            header = scheduled.entry_header("default", "default", payload)
            pipe.hset(keys.schedule_messages, task_id, f"{header}\n{json.dumps(payload)}")
            pipe.zadd(keys.schedule, {task_id: due})
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()


def seed_workers(client: Any, prefix: str, workers: int, running: int = 2) -> None:
    """`workers` worker processes with fresh heartbeats, each running `running` jobs."""
    from app.delivery.records import Keys

    keys = Keys(prefix)
    seconds, micros = client.time()
    now = float(seconds) + float(micros) / 1e6
    with client.pipeline(transaction=False) as pipe:
        for w in range(workers):
            worker = f"bench-host.{10000 + w}.{uuid.uuid4().hex[:8]}"
            info = {"host": "bench-host", "pid": 10000 + w, "queues": ["urgent", "default", "low"]}
            pipe.zadd(keys.workers, {worker: now})
            pipe.set(keys.worker_info + worker, json.dumps({**info, "concurrency": running}))
            for _ in range(running):
                tag = str(uuid.uuid4())
                payload = _message("jobs.process_order", str(uuid.uuid4()), [w], "", "default")
                pipe.sadd(keys.held(worker), tag)
                pipe.hset(keys.inflight, tag, json.dumps([worker, "default", "", 0]))
                pipe.hset(prefix + "unacked", tag, json.dumps([payload, "", "default"]))
        pipe.execute()


def _time_pages(web: Any, headers: dict[str, str], dead_id: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {}
    for name, path in PAGES:
        url = path.format(dead_id=dead_id)
        samples = []
        for round_ in range(WARMUP + ROUNDS):
            began = time.perf_counter()
            response = web.get(url, headers=headers)
            elapsed = (time.perf_counter() - began) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {response.status_code}")
            if round_ >= WARMUP:
                samples.append(elapsed)
        timings[name] = samples
    return timings


def bench_web(size: int, workers: int) -> dict[str, Any]:
    from sqlalchemy import text

    from app.db import session_scope
    from app.delivery import scheduled
    from app.operations import broker_redis
    from app.services import dead_letters
    from app.web import WebSettings, create_app

    client, prefix = broker_redis()
    client.flushdb()
    began = time.perf_counter()
    dead_id = seed_dead_letters(size)
    seed_scheduled(client, prefix, size)
    seed_workers(client, prefix, workers)
    seeding = time.perf_counter() - began
    try:
        with session_scope() as session:
            session.execute(text("ANALYZE dead_letters"))
        web = create_app(WebSettings("127.0.0.1", 0, "admin", "bench")).test_client()
        token = base64.b64encode(b"admin:bench").decode()
        timings = _time_pages(web, {"Authorization": f"Basic {token}"}, dead_id)
        # The baseline: what a page without paging would read.
        full_dead = time.perf_counter()
        with session_scope() as session:
            read = len(dead_letters.entries(session, limit=size + 1))
        full_dead = time.perf_counter() - full_dead
        full_scheduled = time.perf_counter()
        waiting = sum(1 for _ in scheduled.entries(client, prefix))
        full_scheduled = time.perf_counter() - full_scheduled
        assert read == size and waiting == size, (read, waiting)
    finally:
        client.flushdb()
        with session_scope() as session:
            session.execute(text("DELETE FROM dead_letters"))
            session.execute(text("DELETE FROM job_batches"))
    medians = {name: statistics.median(s) for name, s in timings.items()}
    slowest = {name: max(s) for name, s in timings.items()}
    worst_name = max(medians, key=lambda n: medians[n])
    worst_max = max(slowest.values())
    pages = ", ".join(f"{n} {medians[n]:.1f}/{slowest[n]:.1f}" for n in medians)
    return {
        "name": "web view pages",
        "size": size,
        "baseline": (
            f"reading the whole store: {size:,} dead letters {full_dead * 1000:.0f} ms, "
            f"{size:,} scheduled jobs {full_scheduled * 1000:.0f} ms"
        ),
        "measured": (
            f"slowest page median {medians[worst_name]:.1f} ms ({worst_name}), "
            f"slowest single request {worst_max:.1f} ms"
        ),
        "ratio": round(medians[worst_name] / TARGET_MS, 3),
        "target": f"every page < {TARGET_MS:.0f} ms (ratio: slowest median / target)",
        "met": worst_max < TARGET_MS,
        "note": (
            f"{size:,} dead letters, {size:,} scheduled jobs, {workers} workers with 2 jobs "
            f"running each, 1,000 batches (seeded in {seeding:.0f} s); per page, median/max ms "
            f"of {ROUNDS} requests through Flask's test client: {pages}"
        ),
        "pages_ms": {
            n: {"median": round(medians[n], 2), "max": round(slowest[n], 2)} for n in medians
        },
    }
