"""The threads pool: `celery -A app worker --pool threads --concurrency N`.

For jobs that mostly wait on the network (send_email on SMTP, process_payment on the gateway),
one process running N jobs in threads does more than N/2 prefork processes on two cores. What
the service adds to Celery's own pool, so that the guarantees are prefork's:

- **Database connections.** Each thread runs its job in a session of its own (the session
  scope and its after-commit callbacks live in context variables, per thread); the process's
  one engine keeps `N + 2` connections (one per thread, and the worker's own threads: the
  outbox relay), so a job never waits for a connection another thread holds.
- **Time limits.** Celery's threads pool enforces none. A watchdog thread raises
  `SoftTimeLimitExceeded` in a job's thread at its soft limit, as prefork's SIGUSR1 does, and
  `TimeLimitExceeded` at its hard limit (a thread cannot be killed, as a prefork process is).
  Both are raised when the thread next runs Python code: a call blocked in C (a socket read
  with no timeout) returns first. Each job's own retry and dead-letter handling takes it from
  there, as on prefork.
- **Prefetch.** The worker holds two messages per thread (THREADS_PREFETCH), where prefork
  holds one per process: a thread whose job ends takes the next at once, instead of waiting
  idle while the event loop acknowledges and fetches (a no-op drain: 1.4x). A message arriving
  behind the held ones waits for up to `concurrency` of them to start, about one job's run.
  THREADS_PREFETCH=1 holds one per thread; `--prefetch-multiplier N` overrides both. Short
  jobs grow the window up to four per thread, as many as the worker runs in THREADS_HOLD_AHEAD
  (20 ms; `hold_window`, app.delivery.window).
- **Hand-off.** `ThreadsPool` is Celery's pool with its jobs put on one queue its threads
  take from, rather than submitted to a `ThreadPoolExecutor` (a `Future` and its locks per
  job, which nothing read): 7% less of the worker's CPU a no-op job, the same stop.
- **Delivery.** Fetch, in-flight records, heartbeats and acknowledgements are the main
  process's, whatever the pool: a worker killed mid-job is recovered by heartbeat as on
  prefork, and a warm shutdown lets running jobs finish and returns the rest to their queues.

Connected to `worker_init` (`configure`, which puts `ThreadsPool` in the worker's place for
Celery's); `job_started` / `job_finished` are called as a job's
`__call__` starts and ends (`app.running`).
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from celery.concurrency.base import apply_target
from celery.concurrency.thread import TaskPool
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from app import db
from app.delivery import rabbitmq
from app.delivery.window import MOST_PER_THREAD
from app.settings import get_settings

logger = logging.getLogger(__name__)

#: How often the watchdog looks at the running jobs' deadlines (seconds).
WATCH_INTERVAL = 0.1
#: Connections beyond one per thread: the outbox relay's, and one spare.
EXTRA_CONNECTIONS = 2


@dataclass
class _Deadlines:
    task_id: str
    name: str
    soft_at: float | None
    hard_at: float | None
    soft_sent: bool = False
    hard_sent: bool = False


_running: dict[int, _Deadlines] = {}  # thread ident -> the job it runs
_lock = threading.Lock()
_watchdog: threading.Thread | None = None


def is_threads_pool(worker: Any) -> bool:
    pool_cls = getattr(worker, "pool_cls", None)
    name = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
    return str(name).rsplit(".", 1)[-1] in ("thread", "threads")


class ThreadsPool(TaskPool):  # type: ignore[misc]
    """Celery's threads pool, its jobs handed to its threads through one queue.

    Celery's pool submits each job to a `ThreadPoolExecutor`: a `Future` (and its `Condition`)
    per job, the executor's locks and idle semaphore, none of which anything here reads. This
    one puts the same call (Celery's `apply_target`, its callbacks and accept callback) on a
    `SimpleQueue` its threads take from. What Celery's does is kept: `stop` (a warm shutdown)
    lets running jobs finish and drops the calls not started, whose messages were never
    acknowledged (the transport gives them back); an exception escaping a call is swallowed,
    as the executor's future swallowed it, and logged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # (Celery's __init__ makes the executor this pool replaces.)
        super(TaskPool, self).__init__(*args, **kwargs)
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    # (Celery starts and stops its pool from the worker's main thread.)
    def on_start(self) -> None:
        self._threads = [
            threading.Thread(target=self._take, name=f"job-thread-{n}", daemon=True)
            for n in range(self.limit)
        ]
        for thread in self._threads:
            thread.start()

    def _take(self) -> None:
        calls = self._calls
        while True:
            call = calls.get()
            if call is None:
                return
            try:
                apply_target(*call)
            except BaseException:  # the executor's future kept it; nothing read it
                logger.exception("a job's call raised past Celery's tracer")
            del call

    def on_apply(
        self,
        target: Any,
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        **_: Any,
    ) -> None:
        self._calls.put((target, args, kwargs, callback, accept_callback))

    def on_stop(self) -> None:
        while True:  # the calls not started are dropped, as cancelled futures were
            try:
                self._calls.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._calls.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._threads = []
        super(TaskPool, self).on_stop()

    def _get_info(self) -> dict[str, Any]:
        return {**super(TaskPool, self)._get_info(), "threads": len(self._threads)}


def configure(sender: Any = None, **_: Any) -> None:
    """`worker_init`: on the threads pool, use `ThreadsPool`, size the database pool, set the
    prefetch and start the watchdog."""
    if not is_threads_pool(sender):
        return
    sender.pool_cls = ThreadsPool
    concurrency = int(getattr(sender, "concurrency", 0) or 1)
    db.size_pool(concurrency + EXTRA_CONNECTIONS)
    prefetch = prefetch_multiplier(sender)
    window = hold_window(sender, concurrency, prefetch)
    held = f"{concurrency * prefetch}"
    if window is not None:
        # Celery's window is the most; the channel holds less while the jobs are slower.
        prefetch = window[2]
        held = f"{window[0] * window[1]} to {concurrency * prefetch}, with the pace,"
    sender.prefetch_multiplier = prefetch
    options = sender.app.conf.broker_transport_options
    sender.app.conf.broker_transport_options = {**(options or {}), "hold_window": window}
    start_watchdog()
    logger.info(
        "threads pool (ThreadsPool): %d threads, %s messages held, %d database connections, "
        "time limits by watchdog",
        concurrency,
        held,
        concurrency + EXTRA_CONNECTIONS,
    )


def hold_window(worker: Any, threads: int, prefetch: int) -> tuple[int, int, int, float] | None:
    """The channel's hold window (app.delivery.window) for `threads` threads holding `prefetch`
    each at least: up to MOST_PER_THREAD each when THREADS_HOLD_AHEAD is above 0; None (the
    prefetch alone) when it is 0, when the worker was given its multiplier
    (`--prefetch-multiplier N`, held as given), when that is already the most, or on
    RabbitMQ."""
    settings = get_settings()
    if rabbitmq.is_amqp(settings.broker_url):
        return None  # (the window is the Redis transport's: RabbitMQ holds the prefetch)
    ahead = settings.threads_hold_ahead
    given = getattr(worker, "prefetch_multiplier", None)
    if given is not None and int(given) != int(worker.app.conf.worker_prefetch_multiplier):
        return None
    if ahead <= 0 or not 1 <= prefetch < MOST_PER_THREAD:
        return None
    return (threads, prefetch, MOST_PER_THREAD, ahead)


def prefetch_multiplier(worker: Any) -> int:
    """The threads pool's prefetch multiplier: THREADS_PREFETCH (2), unless the worker was
    given another than the configured one (`--prefetch-multiplier N`).

    With one message per thread, a thread whose job ends waits idle for the event loop to
    acknowledge, fetch and hand it the next; a second message per thread is there already (as
    Dramatiq holds two per thread by default). The cost: a message arriving behind them may
    wait for up to `concurrency` held messages to start first, about one job's run."""
    configured = worker.app.conf.worker_prefetch_multiplier
    given = getattr(worker, "prefetch_multiplier", None)
    if given is not None and int(given) != int(configured):
        return int(given)  # (0 included: Celery's "no limit")
    return get_settings().threads_prefetch


def start_watchdog() -> None:
    global _watchdog
    with _lock:
        if _watchdog is not None and _watchdog.is_alive():
            return
        _watchdog = threading.Thread(target=_watch, name="time-limit-watchdog", daemon=True)
        _watchdog.start()


def _limit(request_value: Any, task_value: Any, default: Any) -> float | None:
    for value in (request_value, task_value, default):
        if value:
            return float(value)
    return None


#: Each app's configured (soft, hard) limits, read once: a lookup in Celery's configuration
#: costs more than the rest of a job's start here.
_configured_limits: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def _configured(app: Any) -> tuple[Any, Any]:
    limits = _configured_limits.get(app)
    if limits is None:
        conf = app.conf
        limits = _configured_limits[app] = (conf.task_soft_time_limit, conf.task_time_limit)
    return limits


def job_started(task_id: str = "", task: Any = None, **_: Any) -> None:
    """A job starts in its thread (`app.running`): note its deadlines (only while a watchdog
    runs)."""
    if _watchdog is None or task is None:
        return
    # (A task run inline inside a job does not come here: app.running keeps the outer job's
    # limits. An entry left by a job whose end was cut short is replaced.)
    ident = threading.get_ident()
    hard, soft = (getattr(task.request, "timelimit", None) or (None, None))[:2]
    soft_default, hard_default = _configured(task.app)
    soft = _limit(soft, task.soft_time_limit, soft_default)
    hard = _limit(hard, task.time_limit, hard_default)
    now = time.monotonic()
    deadlines = _Deadlines(
        task_id, task.name, now + soft if soft else None, now + hard if hard else None
    )
    with _lock:
        _running[ident] = deadlines


def job_finished(task_id: str = "", **_: Any) -> None:
    """A job's `__call__` ends in its thread (`app.running`): forget its deadlines, and any
    limit exception the watchdog raised that has not reached it yet (it must not hit the
    worker's own code)."""
    if _watchdog is None:
        return
    ident = threading.get_ident()
    with _lock:
        deadlines = _running.get(ident)
        if deadlines is None or deadlines.task_id != task_id:
            return
        del _running[ident]
        if deadlines.soft_sent or deadlines.hard_sent:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)


def _raise_in(ident: int, exception: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exception))


def check(now: float | None = None) -> None:
    """One look at the running jobs: raise each limit that has passed, once."""
    now = time.monotonic() if now is None else now
    with _lock:
        for ident, job in _running.items():
            if job.hard_at is not None and now >= job.hard_at and not job.hard_sent:
                job.hard_sent = True
                logger.error(
                    "job %s[%s] passed its hard time limit; raising TimeLimitExceeded in its "
                    "thread (a thread cannot be killed)",
                    job.name,
                    job.task_id,
                )
                _raise_in(ident, TimeLimitExceeded)
            elif job.soft_at is not None and now >= job.soft_at and not job.soft_sent:
                job.soft_sent = True
                logger.warning(
                    "job %s[%s] passed its soft time limit; raising SoftTimeLimitExceeded",
                    job.name,
                    job.task_id,
                )
                _raise_in(ident, SoftTimeLimitExceeded)


def _watch() -> None:
    while True:
        time.sleep(WATCH_INTERVAL)
        try:
            check()
        except Exception:  # the watchdog must outlive any one bad look
            logger.exception("time-limit watchdog")
