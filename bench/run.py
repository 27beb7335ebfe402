"""`make bench`: each benchmark beside its baseline, measured in the same run.

Prints a table, writes bench/results/latest.json and BENCHMARKS.md. Runs against the
configured DATABASE_URL / BROKER_URL, or the embedded default. `--quick` scales sizes down.
So far: job-layer overhead, bulk enqueue, keyset vs OFFSET paging, daily report vs bare SQL
(the other benchmarks of the benchmark issue are not built yet).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def prepare_environment() -> None:
    """Point the app at a benchmark database and a spare Redis database, before it loads."""
    from sqlalchemy.engine import make_url

    from app import embedded
    from app.settings import load_settings

    settings = load_settings()
    database_url, broker_url = settings.database_url, settings.broker_url
    if database_url is None or broker_url is None:
        running = embedded.ensure_running(
            settings.state_dir, postgres=database_url is None, redis=broker_url is None
        )
        database_url = database_url or running.database_url
        broker_url = broker_url or running.broker_url
    assert database_url and broker_url
    bench_db = f"{make_url(database_url).database}_bench"
    from tests.integration.conftest import alembic_config, isolated_broker, recreate_database

    url = recreate_database(database_url, bench_db)
    from alembic import command

    command.upgrade(alembic_config(url), "head")
    os.environ["DATABASE_URL"] = url
    os.environ["BROKER_URL"] = isolated_broker(broker_url, 14)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def redis_client() -> Any:
    import redis

    from app.settings import redis_client_url

    return redis.Redis.from_url(redis_client_url(os.environ["BROKER_URL"]) or "")


def worker(concurrency: int = 1) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "app",
            "worker",
            "--include",
            "bench.tasks",
            "--queues",
            "urgent,default,low",
            "--concurrency",
            str(concurrency),
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def drain_seconds(task_name: str, count: int) -> float:
    """Publish `count` messages of a no-op, then time one worker draining them."""
    from celery import Celery

    client = redis_client()
    client.flushdb()
    producer = Celery("bench", broker=os.environ["BROKER_URL"])
    with producer.producer_or_acquire() as p, p.batch(max_size=1000):
        for i in range(count):
            producer.send_task(task_name, args=[i], queue="default", producer=p, ignore_result=True)
    process = worker()
    try:
        start = None
        while True:
            left = int(client.llen("default")) + int(client.hlen("unacked"))
            if start is None and left < count:
                start = time.perf_counter()  # the worker has begun
            if left == 0:
                return time.perf_counter() - (start or time.perf_counter())
            time.sleep(0.01)
    finally:
        process.terminate()
        process.wait(timeout=60)


def bench_overhead(size: int) -> dict[str, Any]:
    bare = drain_seconds("bench.bare_noop", size)
    layered = drain_seconds("jobs.bench_noop", size)
    return {
        "name": "job-layer overhead",
        "size": size,
        "baseline": f"bare @app.task: {size / bare:.0f} jobs/s",
        "measured": f"job layer: {size / layered:.0f} jobs/s",
        "ratio": round(layered / bare, 3),
        "target": "<= 1.10 (time ratio)",
        "met": layered / bare <= 1.10,
    }


def bench_bulk(size: int) -> dict[str, Any]:
    from app.jobs.base import perform_all_later
    from bench.tasks import bench_noop

    client = redis_client()
    client.flushdb()
    loop_count = max(1000, size // 20)
    loop = timed(lambda: [bench_noop.delay(i) for i in range(loop_count)]) / loop_count
    client.flushdb()
    bulk = timed(lambda: perform_all_later(bench_noop.s(i) for i in range(size))) / size
    client.flushdb()
    return {
        "name": "bulk enqueue",
        "size": size,
        "baseline": f".delay() loop: {1 / loop:.0f} jobs/s ({loop_count} jobs)",
        "measured": f"perform_all_later: {1 / bulk:.0f} jobs/s",
        "ratio": round(loop / bulk, 1),
        "target": ">= 20x faster",
        "met": loop / bulk >= 20,
    }


def bench_paging(sizes: list[int]) -> dict[str, Any]:
    from sqlalchemy import insert, select

    from app.db import session_scope
    from app.models import Dataset, Record
    from app.services.datasets import BATCH_SIZE, process_next_batch

    rows = []
    for size in sizes:
        with session_scope() as session:
            dataset = Dataset(name=f"bench-{size}")
            session.add(dataset)
            session.flush()
            dataset_id = dataset.id
            for start in range(0, size, 20_000):
                session.execute(
                    insert(Record),
                    [
                        {"dataset_id": dataset_id, "payload": {}}
                        for _ in range(min(20_000, size - start))
                    ],
                )

        def keyset(dataset_id: int = dataset_id) -> None:
            while True:
                with session_scope() as session:
                    if process_next_batch(session, dataset_id).completed:
                        return

        def offset(dataset_id: int = dataset_id) -> None:  # the guide's OFFSET paging
            offset_at = 0
            while True:
                with session_scope() as session:
                    ids = list(
                        session.scalars(
                            select(Record.id)
                            .where(Record.dataset_id == dataset_id)
                            .order_by(Record.id)
                            .offset(offset_at)
                            .limit(BATCH_SIZE)
                        )
                    )
                if not ids:
                    return
                offset_at += BATCH_SIZE

        rows.append(
            {
                "records": size,
                "keyset_s": round(timed(keyset), 2),
                "offset_s": round(timed(offset), 2),
            }
        )
    first, last = rows[0], rows[-1]
    growth = last["records"] / first["records"]
    return {
        "name": "large dataset paging",
        "size": sizes,
        "baseline": "OFFSET: " + ", ".join(f"{r['records']:,}: {r['offset_s']} s" for r in rows),
        "measured": "keyset: " + ", ".join(f"{r['records']:,}: {r['keyset_s']} s" for r in rows),
        "ratio": round(last["offset_s"] / max(last["keyset_s"], 1e-9), 1),
        "target": f"keyset grows ~linearly (x{growth:.0f} records)",
        "met": last["keyset_s"] / max(first["keyset_s"], 1e-9) <= growth * 1.5,
        "rows": rows,
    }


def bench_report(size: int) -> dict[str, Any]:
    from sqlalchemy import text

    from app.db import session_scope
    from app.services.reports import create_daily_report, report_data

    day = dt.date(2026, 1, 15)
    with session_scope() as session:
        session.execute(
            text(
                "INSERT INTO users (email, created_at) SELECT 'bench' || g || "
                "'@example.com', :day FROM generate_series(1, 1000) g"
            ),
            {"day": dt.datetime(2026, 1, 15, 12, tzinfo=dt.UTC)},
        )
        session.execute(
            text(
                "INSERT INTO orders (user_id, status, total, created_at, processed_at) "
                "SELECT 1 + (g % 1000), 'processed', 9.99, :start + (g % 2592000) * interval '1 s',"
                " :start + (g % 2592000) * interval '1 s' FROM generate_series(1, :n) g"
            ),
            {"start": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "n": size},
        )
        session.execute(text("ANALYZE orders"))

    def bare() -> None:
        with session_scope() as session:
            report_data(session, day, "UTC")

    def job() -> None:
        with session_scope() as session:
            create_daily_report(session, day + dt.timedelta(days=int(time.time()) % 7), "UTC")

    bare_s = min(timed(bare) for _ in range(3))
    job_s = min(timed(job) for _ in range(3))
    return {
        "name": "daily report",
        "size": size,
        "baseline": f"bare SQL aggregate: {bare_s * 1000:.1f} ms",
        "measured": f"daily_report service: {job_s * 1000:.1f} ms",
        "ratio": round(job_s / bare_s, 2),
        "target": "<= 1.5x",
        "met": job_s / bare_s <= 1.5,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a quick look")
    args = parser.parse_args()
    prepare_environment()
    quick = args.quick
    started = time.perf_counter()
    results = [
        bench_overhead(2_000 if quick else 20_000),
        bench_bulk(10_000 if quick else 100_000),
        bench_paging([10_000, 30_000] if quick else [100_000, 300_000, 1_000_000]),
        bench_report(100_000 if quick else 1_000_000),
    ]
    elapsed = time.perf_counter() - started
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(
        json.dumps(
            {"machine": machine, "quick": quick, "seconds": round(elapsed), "results": results},
            indent=2,
            default=str,
        )
    )
    lines = [
        f"| {r['name']} | {r['baseline']} | {r['measured']} | {r['ratio']} | "
        f"{r['target']} | {'yes' if r['met'] else 'NO'} |"
        for r in results
    ]
    table = "\n".join(
        [
            "| benchmark | baseline | measured | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
            *lines,
        ]
    )
    print(table)
    print(f"({elapsed:.0f} s on {machine})")
    if not quick:
        (ROOT / "BENCHMARKS.md").write_text(
            "# Benchmarks\n\nProduced by `make bench` on " + machine + f", "
            f"{dt.date.today().isoformat()}, in {elapsed:.0f} s. Ratios compare against a "
            "baseline measured in the same run.\n\n" + table + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
