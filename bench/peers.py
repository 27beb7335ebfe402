"""The peers benchmark (issue 20): the service's worker beside stock Celery and Dramatiq.

One run, one Redis database, the same no-op body everywhere (INCR a Redis counter), `count`
messages queued before each worker starts. A side's rate is its steady-state drain: the time
from the counter's first `WARMUP` increments to the last, so start-up is not timed. Sides:

- stock Celery 5.7 on kombu's own Redis transport (`bench.stock_app`), prefork 2,
  `task_acks_late`, prefetch 1, `task_reject_on_worker_lost`: the baseline;
- the service's worker (`celery -A app`, its whole celeryconfig), `jobs.bench_incr` through the
  job layer, prefork 2;
- the service's worker on the threads pool: two workers of 8 threads (Dramatiq's default
  shape, the one compared), and one of 16 (`--pool threads --concurrency 16`);
- Dramatiq 2 on its Redis broker (`bench.dramatiq_app`), 2 processes x 1 thread, and 2 x 8
  (its default thread count).

The sides run in turn, `rounds` times, the order rotated each round.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.keys import INCR_COUNTER

Starter = Callable[[], list[subprocess.Popen[bytes]]]

#: Increments before a side's clock starts (its start-up and first fetches are not timed).
WARMUP = 100


def _publish_celery(count: int, task_name: str) -> None:
    from celery import Celery

    producer = Celery("bench", broker=os.environ["BROKER_URL"])
    with producer.producer_or_acquire() as p, p.batch(max_size=1000):
        for i in range(count):
            producer.send_task(task_name, args=[i], queue="default", producer=p, ignore_result=True)


def _publish_dramatiq(count: int) -> None:
    from bench.dramatiq_app import incr

    for i in range(count):
        incr.send(i)


def _dramatiq(processes: int, threads: int) -> subprocess.Popen[bytes]:
    from bench.run import ROOT, WORKER_LOG

    command = [sys.executable, "-m", "dramatiq", "bench.dramatiq_app"]
    command += ["--processes", str(processes), "--threads", str(threads), "--queues", "default"]
    with open(WORKER_LOG, "ab") as out:
        return subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """The worker and every process it started (Dramatiq's workers outlive a SIGQUIT of their
    parent), each side's before the next side's messages are queued."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _side_rate(
    count: int,
    publish: Callable[[], None],
    start: Callable[[], list[subprocess.Popen[bytes]]],
    what: str,
) -> float:
    """Queue `count` messages, start the worker, and time the counter from WARMUP to `count`."""
    from bench.run import redis_client, wait_for

    client = redis_client()
    client.flushdb()
    publish()
    processes = start()
    try:
        counted = lambda: int(client.get(INCR_COUNTER) or 0)  # noqa: E731
        wait_for(lambda: counted() >= WARMUP, 120, f"{what}: start-up", processes[0], poll=0.002)
        began, first = time.perf_counter(), counted()
        wait_for(lambda: counted() >= count, 60 + count / 20, f"{what}: drain", processes[0])
        seconds = time.perf_counter() - began
        time.sleep(0.3)  # a duplicate run would show as a count above `count`
        final = counted()
        if final != count:
            raise RuntimeError(f"{what}: {final} runs counted for {count} messages")
        return (count - first) / seconds
    finally:
        for process in processes:
            stop_group(process)


def bench_peers(count: int, rounds: int = 2) -> dict[str, Any]:
    from bench.run import celery_worker

    # The threaded sides drain several times faster: they get five times the messages, so
    # that their start-up (two processes, not started in the same instant) weighs as little.
    many = 5 * count

    def service(concurrency: int, pool: str | None = None, workers: int = 1) -> Starter:
        return lambda: [
            celery_worker(False, concurrency, f"peer{i}@%h", own_session=True, pool=pool)
            for i in range(workers)
        ]

    def service_jobs(n: int) -> Callable[[], None]:
        return lambda: _publish_celery(n, "jobs.bench_incr")

    sides: dict[str, tuple[int, Callable[[], None], Starter]] = {
        "stock": (
            count,
            lambda: _publish_celery(count, "bench.incr"),
            lambda: [celery_worker(True, 2, own_session=True)],
        ),
        "service": (count, service_jobs(count), service(2)),
        "service_threads": (many, service_jobs(many), service(16, "threads")),
        "service_threads_2x8": (many, service_jobs(many), service(8, "threads", workers=2)),
        "dramatiq_2x1": (count, lambda: _publish_dramatiq(count), lambda: [_dramatiq(2, 1)]),
        "dramatiq_2x8": (many, lambda: _publish_dramatiq(many), lambda: [_dramatiq(2, 8)]),
    }
    names = list(sides)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            size, publish, start = sides[name]
            rates[name].append(_side_rate(size, publish, start, name))
    mean = {name: statistics.fmean(values) for name, values in rates.items()}
    vs_stock = mean["service"] / mean["stock"]
    # Dramatiq's default is a process per core with 8 threads each: the service's like of it
    # is two threads workers of 8 (one process of 16 is held to one core by its GIL).
    threads_vs_dramatiq = mean["service_threads_2x8"] / mean["dramatiq_2x8"]
    one_process = mean["service_threads"] / mean["dramatiq_2x8"]

    def listed(name: str) -> str:
        return ", ".join(f"{r:.0f}" for r in rates[name])

    return {
        "name": "peers: no-op drain beside stock Celery and Dramatiq",
        "size": count,
        "baseline": (
            f"stock Celery prefork 2: {listed('stock')} jobs/s; Dramatiq 2x1: "
            f"{listed('dramatiq_2x1')}; Dramatiq 2x8: {listed('dramatiq_2x8')}"
        ),
        "measured": (
            f"service prefork 2: {listed('service')} jobs/s ({vs_stock:.2f}x stock); "
            f"service threads 2x8: {listed('service_threads_2x8')} ({threads_vs_dramatiq:.2f}x "
            f"Dramatiq 2x8); service threads 16 (one process): {listed('service_threads')} "
            f"({one_process:.2f}x)"
        ),
        "ratio": round(vs_stock, 3),
        "target": "service prefork >= 0.95x stock; service threads 2x8 >= Dramatiq 2x8",
        "met": vs_stock >= 0.95 and threads_vs_dramatiq >= 1.0,
        "jobs_per_s": {name: [round(r, 1) for r in values] for name, values in rates.items()},
        "ratio_vs_stock": round(vs_stock, 3),
        "threads_vs_dramatiq_2x8": round(threads_vs_dramatiq, 3),
        "threads_16_vs_dramatiq_2x8": round(one_process, 3),
        "note": (
            f"{rounds} rounds, the order rotated; {count} messages for the prefork and 2x1 "
            f"sides, {many} for the threaded ones; rates from the counter's {WARMUP}th "
            "increment to the last; every side ran each message exactly once (checked)."
        ),
    }
