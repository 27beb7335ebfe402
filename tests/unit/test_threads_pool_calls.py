"""`app.threads.ThreadsPool` runs Celery's calls as Celery's threads pool does (no worker)."""

from __future__ import annotations

import threading
import time
from typing import Any

from app.threads import ThreadsPool


def _pool(limit: int) -> ThreadsPool:
    pool = ThreadsPool(limit=limit)
    pool.start()
    return pool


def test_calls_run_in_the_pools_threads_with_their_callbacks() -> None:
    pool = _pool(3)
    done: list[tuple[int, str]] = []
    accepted: list[int] = []
    finished = threading.Semaphore(0)

    def job(n: int) -> int:
        return n * 10

    def callback(result: int) -> None:
        done.append((result, threading.current_thread().name))
        finished.release()

    try:
        for n in range(20):
            pool.apply_async(
                job, args=(n,), callback=callback, accept_callback=lambda *_: accepted.append(1)
            )
        for _ in range(20):
            assert finished.acquire(timeout=10)
    finally:
        pool.stop()
    assert sorted(r for r, _ in done) == [n * 10 for n in range(20)]
    assert len(accepted) == 20
    assert {name for _, name in done} <= {f"job-thread-{i}" for i in range(3)}
    assert pool._get_info()["max-concurrency"] == 3


def test_a_call_that_raises_leaves_its_thread_taking_the_next() -> None:
    pool = _pool(1)
    results: list[Any] = []
    ran = threading.Event()

    def broken_callback(_: Any) -> None:
        raise RuntimeError("a callback that raises")

    def callback(result: Any) -> None:
        results.append(result)
        ran.set()

    try:
        pool.apply_async(lambda: 1, callback=broken_callback)
        pool.apply_async(lambda: 2, callback=callback)
        assert ran.wait(timeout=10)
    finally:
        pool.stop()
    assert results == [2]


def test_stop_lets_running_calls_finish_and_drops_those_not_started() -> None:
    """As Celery's pool (shutdown with cancel_futures): a warm shutdown finishes what runs;
    what was only handed over never starts (its message is given back unacknowledged)."""
    pool = _pool(2)
    started: list[int] = []
    finished: list[int] = []
    both_running = threading.Barrier(3)

    def job(n: int) -> None:
        started.append(n)
        if n < 2:
            both_running.wait(timeout=10)
            time.sleep(0.3)
        finished.append(n)

    for n in range(6):
        pool.apply_async(job, args=(n,), callback=lambda _: None)
    both_running.wait(timeout=10)  # the first two run; four wait in the queue
    threads = list(pool._threads)
    pool.stop()
    assert sorted(started) == [0, 1] and sorted(finished) == [0, 1]
    assert len(threads) == 2 and not any(thread.is_alive() for thread in threads)
