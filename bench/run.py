"""`make bench`: each benchmark beside its baseline, measured in the same run.

Prints a table, writes bench/results/latest.json and (on a full run of every benchmark)
BENCHMARKS.md. Runs against the configured DATABASE_URL / BROKER_URL, or the embedded default,
in the database `<db>_bench` and Redis database 14. `--quick` scales sizes down; `--only NAME`
(repeatable) runs some of them. The benchmarks, each against its baseline:

- job-layer overhead: no-op jobs through the job layer on the service's worker vs stock Celery
  (same delivery settings, same body) and vs a bare task of the service's app, one worker each
- bulk enqueue: `perform_all_later` vs a loop of `.delay()`
- large dataset paging: keyset vs OFFSET, at three sizes
- daily report: the report service vs the bare aggregate, over a day holding 1,000,000 orders
- hot-row inventory: 20,000 `update_inventory` jobs over 10 products on a worker (concurrency 2),
  vs draining as many no-op jobs; met when every product's stock is exact
- batch of 100,000 items: `batch_process` end to end vs the guide's fan-out (one `process_item`
  per item from a `.delay()` loop; timed on 10,000 items, see NAIVE_FULL), same worker set-up;
  identical item states
- worker memory: peak RSS of the worker and its pool during the 100,000-item batch vs a
  10,000-item one
- urgent latency under backlog: urgent jobs' enqueue-to-start p50/p99 behind 50,000 low jobs,
  for each QUEUE_ORDER (weighted, round_robin, strict), vs a FIFO single queue (estimated)
- recovery: a whole worker SIGKILLed (its process group) while it runs jobs; the time until
  the jobs it held run again, p50 and max over several kills, with the default settings,
  (a) while a second worker stays alive and (b) with a replacement started right after the
  kill; vs stock Celery on kombu's own Redis transport (`bench.stock_app`) with the same
  visibility timeout (not back within a bounded wait) and, for scale, with 30 s
- drain: a worker (concurrency 2) draining 6,000 queued no-op jobs, the service's vs stock
  Celery's on kombu's own Redis transport with the same delivery settings (and stock with task
  events on, for scale), alternated, twice each
- drain on RabbitMQ (issue 19, `--only rabbitmq`): the service's worker (concurrency 2, default
  settings) draining 6,000 queued no-op jobs from RabbitMQ's quorum queues (the machine's
  RabbitMQ, a virtual host `jobs_t_bench` made for the run and deleted) vs from Redis,
  alternated, twice each
- scheduled jobs (issue 13), each with 100,000 jobs (10,000 with `--quick`):
  - worker memory: peak RSS of the service's worker (concurrency 2) with the jobs scheduled an
    hour ahead (in the scheduled set, none held), vs the same worker idle; baseline: stock
    Celery's worker idle and then holding the same jobs as ETA tasks (`unacked`)
  - lateness: when each of the jobs falling due within one second reaches its queue (p50/p99/
    max, one worker's poller, the queue paused), and the start lateness of 50 jobs each due
    alone; baseline: stock Celery's ETA tasks for the single jobs (Sidekiq's ~5 s poll cited)
  - poller throughput: due jobs moved per second by `Poller.release` (the RELEASE script), by
    one poller and by two at once (each job moved once); baseline: pipelined LPUSHes of the
    same messages, the raw Redis floor

  At the full size the memory benchmark takes about 6 minutes, most of it stock Celery's worker
  taking the 100,000 ETA tasks (about 400 a second); the other two take 1-2 minutes.
- transactional outbox (issue 15):
  - enqueue in a transaction: `with session_scope(): job.delay(...)`, 2,000 transactions
    (500 with `--quick`; half as many with a row of the caller's own written too, reported),
    and `perform_all_later` of 10,000 (2,000) in one transaction, through the outbox vs the
    after-commit publish it replaced (`_through_outbox` patched to return False in the
    benchmark process), alternated, twice each; the queue and the outbox checked after each run
  - relay throughput: 100,000 jobs (10,000) left in the outbox by an outage (every publish
    failing while `perform_all_later` commits them), relayed by `relay_once` loops in the
    benchmark process and by two relay processes at once (each job published once, the
    outbox empty); baseline: `perform_all_later` of as many jobs outside a transaction (the
    bulk publish the relay uses) and pipelined LPUSHes of the same messages
- job batches (issue 17; `--only job_batches`, about 2.5 minutes at the full size):
  - membership overhead: 4,000 no-op jobs (1,000 with `--quick`) drained by one worker
    (concurrency 2), enqueued with `perform_all_later` inside `Batch.create(on_complete=...)
    .jobs()` (timed until the callback ran) vs the same enqueued plainly, alternated, twice
    each; the enqueue times of both reported; every member counted once, the callback once
  - 100,000 items (10,000): the seeded batch's 500 `process_batch_range` jobs enqueued in one
    job batch from the benchmark process (timed until its on_complete ran) vs `batch_process`
    (as the batch benchmark), alternated, twice each, same worker set-up; identical item states

- web view (issue 18): every page of `jobs-service web` with 100,000 dead letters, 100,000
  scheduled jobs (10,000 each with `--quick`) and 50 workers; target: each under 200 ms;
  baseline: reading the whole store, as a page without paging would (bench/web.py)
- flow control (the flow-control issue), each against the same jobs with no control:
  - overhead (`flow_overhead`): one worker (concurrency 2, default settings) draining 6,000
    jobs (1,000 with `--quick`) that INCR a counter, with no control and under each control
    set so that it never bites: `limits_concurrency=Limit(to=1000)`,
    `rate_limit=Rate(1_000_000, per=1)`, `unique_for=60` with a key per job, and
    `expires_in=3600`; in batches of 500 (250), one batch a side per cycle, the order rotated
    each cycle; jobs/s, the ratio to no control, the overhead in ms a job and the CPU time a
    job of the worker's main process and of Redis; every batch checked (every job once,
    nothing left held). Then the producer's cost of `unique_for` (one claim round trip a
    job): `.delay()` loops of 333 jobs (250) without and with it, alternated, 12 times (4),
    and the drain batches' timed `perform_all_later` publishes
  - a key limited to 1 (`flow_serial`): 200 (50) jobs of 20 ms under `Limit(to=1)` (one key),
    drained by two workers at concurrency 4, twice (once); the time from the enqueue to the
    last job's end against the ideal of running them back to back (200 x 20 ms), with every
    job run exactly once and never two at a time (each records its start and end)
- hosts (issue 19; bench/hosts.py; root and iproute2): Redis and PostgreSQL on one network
  namespace, a worker on each of two others; a worker holding two 4 s jobs has its host's link
  cut, 4 times (2 with `--quick`), alternated with as many SIGKILLs of it (the baseline); the
  time until its jobs start on the other host, p50 and max, against the heartbeat window
- peers (issue 20; bench/peers.py): 6,000 no-op jobs (INCR a counter; 1,000 with `--quick`)
  drained by stock Celery (prefork 2, the service's delivery settings), the service's worker
  (prefork 2; the threads pool, 16 threads and two workers of 8) and Dramatiq (2 processes x 1
  thread, and x 8, its default) on the same Redis; twice each (once), the order rotated
- I/O-bound pools (`io_pools`, issue 20; bench/io_pools.py): 1,500 `send_email` and 1,500
  `process_payment` jobs (300 each with `--quick`) against the development SMTP server and
  gateway each answering after 20 ms, drained by prefork 2 (the baseline) and the threads pool
  (16 threads; two workers of 8)

- Redis with failover (`sentinel`, bench/sentinel.py): jobs lost per failover (a primary
  SIGKILLed under a producer publishing at up to 1,000 jobs/s through sentinel://), with
  Redis's default asynchronous replication (the baseline), with BROKER_WAIT_REPLICAS=1, and
  with min-replicas-to-write 1; three failovers each (one with `--quick`), about 1.5 minutes

Workers log to bench/results/worker.log.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import itertools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKER_LOG = RESULTS / "worker.log"

#: The benchmarks in the order they run (the names `--only` takes).
BENCHMARKS = (
    "overhead",
    "bulk",
    "paging",
    "report",
    "inventory",
    "batch",
    "urgent",
    "recovery",
    "drain",
    "scheduled_memory",
    "scheduled_lateness",
    "scheduled_poller",
    "outbox_enqueue",
    "outbox_relay",
    "web",
    "job_batches",
    "flow_overhead",
    "flow_serial",
    "peers",
    "io_pools",
    "rabbitmq",
    "hosts",
    "sentinel",
)
#: Items the naive fan-out is timed on; its items/s is compared with ours at the full size.
#: Here it does 130-270 items/s (each process_item commits and updates the one batch row, so
#: the two pool processes take turns), so 100,000 items would take 6-13 minutes on their own,
#: beyond the time budget of `make bench`. Its rate does not improve with more items (the batch
#: row only gathers more dead versions), so timing it on fewer flatters the naive side if at all.
NAIVE_FULL = 10_000
NAIVE_QUICK = 1_000
#: The worker's queue orders (QUEUE_ORDER), and the urgent-latency benchmark's settings.
QUEUE_ORDERS = ("weighted", "round_robin", "strict")
URGENT_SPACING = 0.02  # seconds between urgent enqueues
URGENT_FACTOR = 3.0  # weighted p99 may be this many times strict's
#: The queues every benchmark worker consumes, the service's and the stock baseline's alike.
WORKER_QUEUES = "urgent,default,low"
#: The recovery benchmark: a whole worker is SIGKILLed this many seconds (drawn at random)
#: after the jobs it holds have started, so the kill lands mid-job at no fixed heartbeat phase.
KILL_AFTER = (0.2, 1.0)
#: The stock baseline's short visibility timeout, shown for scale.
STOCK_SHORT_VISIBILITY = 30
#: Settings the recovery benchmark's workers never inherit: it measures the defaults.
RECOVERY_OVERRIDES = ("BROKER_VISIBILITY_TIMEOUT", "WORKER_HEARTBEAT_TIMEOUT", "POISON_AFTER")
#: The scheduled-set benchmarks: jobs scheduled this many seconds ahead (memory, poller), and
#: the seconds a worker runs idle, and again with the jobs in place, before its RSS is read.
SCHEDULE_AHEAD = 3600
SETTLE_S = 10
#: The lateness burst falls due this many seconds (plus 1 s per 1,500 jobs) after publishing
#: begins; single jobs fall due this many seconds apart (plus up to half as much jitter).
BURST_LEAD = 5
SINGLE_SPACING = 0.2


def prepare_environment() -> str:
    """Point the app at a benchmark database and a spare Redis database, before it loads.

    Returns what it runs against, for BENCHMARKS.md (URLs without passwords).
    """
    import psycopg
    from sqlalchemy.engine import make_url

    from app import embedded
    from app.settings import load_settings, redact_url

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
    from app.scratch import alembic_config, isolated_broker, recreate_database

    try:
        url = recreate_database(database_url, bench_db)
    except psycopg.OperationalError:  # the configured database may not exist: use the server's
        server = make_url(database_url).set(database="postgres")
        url = recreate_database(server.render_as_string(hide_password=False), bench_db)
    from alembic import command

    command.upgrade(alembic_config(url), "head")
    os.environ["DATABASE_URL"] = url
    os.environ["BROKER_URL"] = isolated_broker(broker_url, 14)
    if settings.database_url is None and settings.broker_url is None:
        return "the embedded PostgreSQL and Redis"
    return f"DATABASE_URL={redact_url(database_url)} BROKER_URL={redact_url(broker_url)}"


def lpush_floor_seconds(client: Any, queue: str, messages: Sequence[Any]) -> float:
    """The raw Redis floor for publishing `messages`: `queue` emptied, then one LPUSH each,
    1,000 a pipelined round trip; the seconds it took."""
    client.delete(queue)
    started = time.perf_counter()
    for first in range(0, len(messages), 1000):
        with client.pipeline(transaction=False) as pipe:
            for message in messages[first : first + 1000]:
                pipe.lpush(queue, message)
            pipe.execute()
    return time.perf_counter() - started


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def redis_client() -> Any:
    from app.delivery.clients import broker_client

    return broker_client(os.environ["BROKER_URL"])


def wait_for(
    done: Callable[[], bool],
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    poll: float = 0.01,
) -> None:
    """Poll `done` until it holds; a clear error if `timeout` passes or the worker exits."""
    deadline = time.monotonic() + timeout
    while not done():
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{what}: the worker exited with status {process.returncode} (see {WORKER_LOG})"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout:.0f} s")
        time.sleep(poll)


def worker(concurrency: int = 1, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`celery -A app worker` with the benchmark jobs, as a child process logging to WORKER_LOG."""
    from app.scratch import start_celery

    RESULTS.mkdir(parents=True, exist_ok=True)
    args = ["worker", "--include", "bench.tasks", "--queues", WORKER_QUEUES]
    args += ["--concurrency", str(concurrency), "--without-mingle", "--without-gossip"]
    return start_celery([*args, "--loglevel", "WARNING"], WORKER_LOG, {**os.environ, **(env or {})})


def celery_worker(
    stock: bool,
    concurrency: int,
    hostname: str | None = None,
    env: dict[str, str] | None = None,
    own_session: bool = False,
    task_events: bool = False,
    unset: tuple[str, ...] = (),
    pool: str | None = None,
) -> subprocess.Popen[bytes]:
    """A worker of the service (`celery -A app`, with the benchmark jobs) or of the stock
    baseline (`celery -A bench.stock_app`), logging to WORKER_LOG; with `own_session`, the
    leader of a process group of its own (worker and pool), for os.killpg. `task_events`
    turns on a stock worker's task events (the service's follow TASK_EVENTS, off by default).
    The variables in `unset` are not passed on.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "celery", "-A", "bench.stock_app" if stock else "app"]
    command += ["worker", "--queues", WORKER_QUEUES, "--concurrency", str(concurrency)]
    command += ["--without-mingle", "--without-gossip", "--loglevel", "WARNING"]
    if not stock:
        command += ["--include", "bench.tasks"]
    if hostname:
        command += ["--hostname", hostname]
    if task_events:
        command += ["--task-events"]
    if pool:
        command += ["--pool", pool]
    with open(WORKER_LOG, "ab") as out:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
        )


def stock_worker(concurrency: int = 1) -> subprocess.Popen[bytes]:
    """The stock baseline's worker: stock Celery on kombu's own Redis transport."""
    return celery_worker(True, concurrency)


def stock_worker_with_events(concurrency: int = 1) -> subprocess.Popen[bytes]:
    """The stock baseline's worker sending task events, as the service's worker does."""
    return celery_worker(True, concurrency, task_events=True)


def stop_worker(process: subprocess.Popen[bytes], cold: bool = False) -> None:
    """A warm shutdown (SIGTERM), or a cold one (SIGQUIT); SIGKILL if not ended in a minute.

    Cold is for a worker whose queue still holds work nobody needs (the warm shutdown of a
    worker with a backlog can take half a minute stopping its pool).
    """
    from app.scratch import stop_celery

    stop_celery(process, signal.SIGQUIT if cold else signal.SIGTERM)


@contextmanager
def ready_worker(concurrency: int, what: str) -> Iterator[subprocess.Popen[bytes]]:
    """A worker on empty queues that has already run one job (so its start-up is not timed)."""
    from bench.tasks import bench_noop

    client = redis_client()
    process = worker(concurrency)
    try:
        bench_noop.delay(0)
        wait_for(lambda: queued(client) == 0, 120, f"{what}: worker start-up", process)
        yield process
    finally:
        stop_worker(process)


def queued(client: Any, queue: str = "default") -> int:
    """Messages waiting in `queue` plus those handed out and not yet acknowledged."""
    return int(client.llen(queue)) + int(client.hlen("unacked"))


def drain(
    count: int,
    concurrency: int,
    what: str,
    start_worker: Callable[[int], subprocess.Popen[bytes]] = worker,
    until: Callable[[], bool] | None = None,
) -> float:
    """Start a worker on `count` queued messages: seconds from its first take to the last ack
    (or until `until()` holds, once the worker has begun)."""
    client = redis_client()
    process = start_worker(concurrency)
    try:
        start: float | None = None

        def done() -> bool:
            nonlocal start
            left = queued(client)
            if start is None and left < count:
                start = time.perf_counter()  # the worker has begun
            if until is not None:
                return start is not None and until()
            return left == 0

        # Start-up, then at least 20 jobs/s (every benchmark job drains far faster).
        wait_for(done, 120 + count / 20, what, process)
        return time.perf_counter() - (start or time.perf_counter())
    finally:
        stop_worker(process)


def drain_seconds(
    task_name: str,
    count: int,
    concurrency: int = 1,
    start_worker: Callable[[int], subprocess.Popen[bytes]] = worker,
) -> float:
    """Publish `count` messages of a no-op, then time one worker draining them."""
    from celery import Celery

    client = redis_client()
    client.flushdb()
    producer = Celery("bench", broker=os.environ["BROKER_URL"])
    with producer.producer_or_acquire() as p, p.batch(max_size=1000):
        for i in range(count):
            producer.send_task(task_name, args=[i], queue="default", producer=p, ignore_result=True)
    return drain(count, concurrency, f"draining {count} {task_name}", start_worker)


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of process `pid` plus that of each of its children, in KiB."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (2nd field) may hold spaces: the fields after it are plain.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            pids.append(int(stat.parent.name))
    total = 0
    for each in pids:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:  # it ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


def bench_overhead(size: int) -> dict[str, Any]:
    """No-op jobs (INCR a counter) drained by one worker at concurrency 1: the service's job
    layer on its own worker against stock Celery on kombu's transport with the same delivery
    settings (`bench.stock_app`), and, to split the cost, the same body as a bare task of the
    service's app."""
    stock = drain_seconds("bench.incr", size, 1, stock_worker)
    bare = drain_seconds("bench.incr", size)
    layered = drain_seconds("jobs.bench_incr", size)
    return {
        "name": "job-layer overhead",
        "size": size,
        "baseline": f"stock Celery, same delivery settings: {size / stock:.0f} jobs/s",
        "measured": (
            f"service job: {size / layered:.0f} jobs/s; bare task on the service's worker: "
            f"{size / bare:.0f} jobs/s ({layered / bare:.3f} of its time)"
        ),
        "ratio": round(layered / stock, 3),
        "target": "<= 1.10 (time ratio to stock Celery)",
        "met": layered / stock <= 1.10,
    }


def bench_bulk(size: int, rounds: int = 3) -> dict[str, Any]:
    """perform_all_later against a .delay() loop and the raw Redis floor (pipelined LPUSH of
    the same messages' bytes). The three run in turn, `rounds` times, and each side's fastest
    round counts (as timeit reports its best: on a shared machine the slower rounds measure
    the neighbours; one round of each varied by half from one run to the next)."""
    from app.jobs.base import perform_all_later
    from bench.tasks import bench_noop

    client = redis_client()
    queue = "default"
    loop_count = max(1000, size // 20)
    loops, bulks, floors = [], [], []
    for _ in range(rounds):
        client.flushdb()
        loops.append(timed(lambda: [bench_noop.delay(i) for i in range(loop_count)]) / loop_count)
        client.flushdb()
        bulks.append(timed(lambda: perform_all_later(bench_noop.s(i) for i in range(size))) / size)
        messages: Any = client.lrange(queue, 0, -1)
        assert len(messages) == size, f"{len(messages)} of {size} messages in {queue!r}"
        client.flushdb()
        floors.append(lpush_floor_seconds(client, queue, messages) / size)
        client.flushdb()
    loop, bulk, floor = min(loops), min(bulks), min(floors)

    def rates(seconds: list[float]) -> str:
        return ", ".join(f"{1 / s:.0f}" for s in seconds)

    return {
        "name": "bulk enqueue",
        "size": size,
        "baseline": (
            f".delay() loop: {1 / loop:.0f} jobs/s ({loop_count} jobs); raw Redis floor, "
            f"pipelined LPUSH of the same messages (1,000 a pipeline): {1 / floor:.0f} jobs/s"
        ),
        "measured": (
            f"perform_all_later: {1 / bulk:.0f} jobs/s, {floor / bulk:.2f} of the LPUSH floor"
        ),
        "ratio": round(loop / bulk, 1),
        "target": ">= 20x faster, and >= 1/3 of the LPUSH floor",
        "met": loop / bulk >= 20 and floor / bulk >= 1 / 3,
        "rounds": {"loop": rates(loops), "bulk": rates(bulks), "floor": rates(floors)},
        "note": (
            f"Each side's fastest of {rounds} rounds run in turn (jobs/s per round: .delay() "
            f"loop {rates(loops)}; perform_all_later {rates(bulks)}; LPUSH floor "
            f"{rates(floors)}). Per job remain the caller's signatures, Job.prepare (argument "
            "checks, redaction, headers), filling the shape's template (arguments' JSON, "
            "base64) and the LPUSH, packed by hand (python -m bench.run --only bulk --profile)."
        ),
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
    """The daily report over a day that holds `size` orders, beside the bare aggregate."""
    from sqlalchemy import delete, text

    from app.db import session_scope
    from app.models import Report
    from app.services.reports import REPORT_TYPE, create_daily_report, report_data

    day = dt.date(2026, 1, 15)
    midnight = dt.datetime(2026, 1, 15, tzinfo=dt.UTC)
    with session_scope() as session:
        session.execute(
            text(
                "INSERT INTO users (email, created_at) SELECT 'bench' || g || "
                "'@example.com', :noon FROM generate_series(1, 1000) g"
            ),
            {"noon": midnight + dt.timedelta(hours=12)},
        )
        # Every order on the reported day, spread over its 86,400 seconds.
        session.execute(
            text(
                "INSERT INTO orders (user_id, status, total, created_at, processed_at) "
                "SELECT 1 + (g % 1000), 'processed', 9.99, :start + (g % 86400) * interval '1 s',"
                " :start + (g % 86400) * interval '1 s' FROM generate_series(1, :n) g"
            ),
            {"start": midnight, "n": size},
        )
        session.execute(text("ANALYZE orders"))
        session.execute(text("ANALYZE users"))
    with session_scope() as session:
        aggregated = report_data(session, day, "UTC")["orders"]
    if aggregated != size:
        raise RuntimeError(f"daily report: the day holds {aggregated} orders, not {size}")

    def bare() -> None:
        with session_scope() as session:
            report_data(session, day, "UTC")

    def job() -> None:
        with session_scope() as session:
            if not create_daily_report(session, day, "UTC").created:
                raise RuntimeError("daily report: the report existed; the INSERT was not timed")

    # Alternated, the best of five each; the report row is removed (untimed) before each job
    # run, so every run aggregates the same day and stores its report.
    bare_times, job_times = [], []
    for _ in range(5):
        bare_times.append(timed(bare))
        with session_scope() as session:
            session.execute(
                delete(Report).where(Report.date == day, Report.report_type == REPORT_TYPE)
            )
        job_times.append(timed(job))
    bare_s, job_s = min(bare_times), min(job_times)
    return {
        "name": "daily report",
        "size": size,
        "baseline": f"bare aggregate (report_data) over {size:,} orders: {bare_s * 1000:.1f} ms",
        "measured": f"daily_report service (aggregate + stored report): {job_s * 1000:.1f} ms",
        "ratio": round(job_s / bare_s, 2),
        "target": "<= 1.5x",
        "met": job_s / bare_s <= 1.5,
        "orders_in_day": aggregated,
    }


def bench_hot_rows(size: int, products: int = 10, concurrency: int = 2) -> dict[str, Any]:
    """`size` update_inventory jobs over `products` products, drained by one worker."""
    from sqlalchemy import func, select

    from app.db import session_scope
    from app.jobs.base import perform_all_later
    from app.jobs.update_inventory import update_inventory
    from app.models import DeadLetter, InventoryAudit, Product

    start_stock = 1_000_000  # far above what `size` changes of at most 5 could take away
    with session_scope() as session:
        rows = [
            Product(sku=f"bench-hot-{i}", name=f"hot {i}", inventory=start_stock, price=1)
            for i in range(products)
        ]
        session.add_all(rows)
        session.flush()
        ids = [row.id for row in rows]
    rng = random.Random(size)
    changes = [(rng.choice(ids), rng.choice([-5, -3, -1, 1, 2, 4])) for _ in range(size)]
    expected = {product_id: start_stock for product_id in ids}
    for product_id, change in changes:
        expected[product_id] += change

    redis_client().flushdb()
    # No idempotency key given: each job's key is its task id, as for a producer that has none.
    perform_all_later(update_inventory.s(product_id, change) for product_id, change in changes)
    hot = drain(size, concurrency, f"hot-row inventory: draining {size} update_inventory jobs")
    with session_scope() as session:
        stock = {
            product_id: inventory
            for product_id, inventory in session.execute(
                select(Product.id, Product.inventory).where(Product.id.in_(ids))
            )
        }
        audits = session.scalar(
            select(func.count())
            .select_from(InventoryAudit)
            .where(InventoryAudit.product_id.in_(ids))
        )
        dead = session.scalar(select(func.count()).select_from(DeadLetter))
    exact = stock == expected and audits == size and dead == 0
    # Baseline: no-op jobs drained at the same concurrency, so the ratio (time per job) is what
    # the row locks, the audit insert and the commit cost on top of the job machinery. The
    # rate hardly depends on the count, so at most 5,000 no-ops are drained to save time.
    noop_count = min(size, 5_000)
    noop_rate = noop_count / drain_seconds("jobs.bench_noop", noop_count, concurrency)
    hot_rate = size / hot
    return {
        "name": "hot-row inventory",
        "size": size,
        "baseline": (
            f"bench_noop drain ({noop_count:,} jobs), concurrency {concurrency}: "
            f"{noop_rate:.0f} jobs/s"
        ),
        "measured": (
            f"update_inventory over {products} products: {hot_rate:.0f} jobs/s, final stock "
            + ("exact" if exact else "WRONG")
        ),
        "ratio": round(noop_rate / hot_rate, 2),
        "target": "every product = start + sum of its changes (ratio: time vs no-op)",
        "met": exact,
        "products": products,
        "audit_rows": audits,
        "dead_letters": dead,
        "wrong_products": {
            str(p): {"expected": expected[p], "actual": stock.get(p)}
            for p in ids
            if stock.get(p) != expected[p]
        },
    }


def seed_batch(size: int) -> int:
    """A pending batch of `size` items; one in 1,000 has a payload without a value (fails)."""
    from sqlalchemy import text

    from app.db import session_scope
    from app.models import Batch

    with session_scope() as session:
        batch = Batch()
        session.add(batch)
        session.flush()
        session.execute(
            text(
                "INSERT INTO batch_items (batch_id, payload) SELECT :batch_id, CASE WHEN g % 1000 "
                "= 0 THEN '{}'::jsonb ELSE jsonb_build_object('value', g) END "
                "FROM generate_series(1, :n) g ORDER BY g"
            ),
            {"batch_id": batch.id, "n": size},
        )
        session.execute(text("ANALYZE batch_items"))
        return batch.id


def run_batch(size: int, naive: bool) -> tuple[float, int, int]:
    """Seed a batch and process it end to end on a fresh worker (concurrency 2).

    Ours: one `batch_process` job. Naive (the guide's): one `process_item` job per item, from
    a single loop of `.delay()`. Returns the seconds from the first enqueue until the batch is
    completed, the worker's peak resident memory (KiB) and the batch id.
    """
    from sqlalchemy import select

    from app.db import session_scope
    from app.jobs.batch_process import batch_process, process_item
    from app.models import Batch, BatchItem

    batch_id = seed_batch(size)
    with session_scope() as session:
        item_ids = list(
            session.scalars(
                select(BatchItem.id).where(BatchItem.batch_id == batch_id).order_by(BatchItem.id)
            )
        )
    redis_client().flushdb()
    what = f"batch of {size} items ({'naive process_item' if naive else 'batch_process'})"
    with ready_worker(2, what) as process:
        peak = peak_rss_kib(process.pid)
        sampled = time.monotonic()

        def completed() -> bool:
            nonlocal peak, sampled
            if time.monotonic() - sampled >= 0.2:
                peak, sampled = max(peak, peak_rss_kib(process.pid)), time.monotonic()
            with session_scope() as session:
                status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
            return status == "completed"

        started = time.perf_counter()
        if naive:
            for item_id in item_ids:
                process_item.delay(item_id)
        else:
            batch_process.delay(batch_id)
        # Start-up, then at least 20 items/s naive, 200 ours (both run far faster here).
        wait_for(completed, 120 + size / (20 if naive else 200), what, process, poll=0.05)
        elapsed = time.perf_counter() - started
        peak = max(peak, peak_rss_kib(process.pid))
    return elapsed, peak, batch_id


def batch_outcome(batch_id: int) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """The batch's (status, processed, total) and each item's (value, status, error, done)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Batch, BatchItem

    with session_scope() as session:
        batch = session.execute(
            select(Batch.status, Batch.processed_count, Batch.total_count).where(
                Batch.id == batch_id
            )
        ).one()
        items = session.execute(
            select(
                BatchItem.payload["value"].as_integer(),
                BatchItem.status,
                BatchItem.error,
                BatchItem.processed_at.is_not(None),
            )
            .where(BatchItem.batch_id == batch_id)
            .order_by(BatchItem.id)
        ).all()
    return tuple(batch), [tuple(item) for item in items]


def bench_batch(size: int, naive_size: int, memory_size: int) -> list[dict[str, Any]]:
    """Batch throughput (ours vs the naive fan-out) and the worker's memory at two sizes."""
    ours_s, ours_peak, ours_id = run_batch(size, naive=False)
    naive_s, _, naive_id = run_batch(naive_size, naive=True)
    small_s, small_peak, _ = run_batch(memory_size, naive=False)

    ours_batch, ours_items = batch_outcome(ours_id)
    naive_batch, naive_items = batch_outcome(naive_id)
    failed = sum(1 for item in ours_items if item[1] == "failed")
    # Every item moved out of pending once (the counter grows by exactly the rows moved and
    # the batch completes only when it reaches the total), with the same outcome either way.
    ours_ok = ours_batch == ("completed", size, size) and all(i[1] != "pending" for i in ours_items)
    naive_ok = naive_batch == ("completed", naive_size, naive_size) and all(
        i[1] != "pending" for i in naive_items
    )
    identical = ours_ok and naive_ok and ours_items[:naive_size] == naive_items
    ours_rate, naive_rate = size / ours_s, naive_size / naive_s
    scaled = "" if naive_size == size else f", timed on {naive_size:,} items"
    growth = ours_peak / small_peak
    return [
        {
            "name": f"batch of {size:,} items",
            "size": size,
            "baseline": (
                f"naive process_item per item (.delay loop): {naive_rate:.0f} items/s "
                f"({naive_s:.1f} s{scaled})"
            ),
            "measured": f"batch_process: {ours_rate:.0f} items/s ({ours_s:.1f} s)",
            "ratio": round(ours_rate / naive_rate, 1),
            "target": ">= 10x faster, identical item states",
            "met": identical and ours_rate / naive_rate >= 10,
            "identical": identical,
            "naive_items": naive_size,
            "note": (
                f"The naive fan-out is timed on {naive_size:,} items and its items/s compared "
                "(at ~150 items/s it would take 10+ minutes at the full size); its rate does "
                "not improve with more items."
            ),
            "failed_items": failed,
        },
        {
            "name": "worker memory",
            "size": [memory_size, size],
            "baseline": (
                f"{memory_size:,}-item batch: {small_peak / 1024:.0f} MiB ({small_s:.1f} s)"
            ),
            "measured": f"{size:,}-item batch: {ours_peak / 1024:.0f} MiB",
            "ratio": round(growth, 2),
            "target": "<= 1.2 (peak RSS, worker + pool)",
            "met": growth <= 1.2,
            "peak_kib": {str(memory_size): small_peak, str(size): ours_peak},
        },
    ]


def urgent_latencies(order: str, backlog: int, urgent: int) -> dict[str, Any]:
    """Urgent jobs' enqueue-to-start seconds while one worker drains a low backlog."""
    from app.jobs.base import perform_all_later
    from bench.tasks import URGENT_STARTS, bench_low, bench_urgent

    client = redis_client()
    client.flushdb()
    perform_all_later(bench_low.s(i) for i in range(backlog))
    what = f"urgent latency ({order})"
    process = worker(2, env={"QUEUE_ORDER": order})
    try:
        wait_for(
            lambda: int(client.llen("low")) < backlog - 20,
            120,
            f"{what}: the worker draining the low backlog",
            process,
        )
        first, depth_first = time.perf_counter(), int(client.llen("low"))
        ahead = []  # low jobs queued when each urgent job was enqueued
        due = time.perf_counter()
        for n in range(urgent):
            ahead.append(int(client.llen("low")))
            bench_urgent.delay(n, time.time())
            due += URGENT_SPACING
            time.sleep(max(0.0, due - time.perf_counter()))
        wait_for(
            lambda: int(client.llen(URGENT_STARTS)) >= urgent,
            60,
            f"{what}: {urgent} urgent jobs started",
            process,
        )
        last, depth_last = time.perf_counter(), int(client.llen("low"))
    finally:
        stop_worker(process, cold=True)  # the rest of the backlog is thrown away
    if depth_last == 0:
        raise RuntimeError(f"{what}: the low backlog ran out; the measurement needs a backlog")
    starts = [json.loads(raw) for raw in client.lrange(URGENT_STARTS, 0, -1)]
    latencies = [started - enqueued for _, enqueued, started in starts]
    drain_rate = (depth_first - depth_last) / (last - first)
    fifo = [queued_ahead / drain_rate for queued_ahead in ahead]
    return {
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "low_jobs_per_s": round(drain_rate),
        "fifo_p50_s": round(percentile(fifo, 50), 1),
        "fifo_p99_s": round(percentile(fifo, 99), 1),
    }


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def bench_urgent_latency(backlog: int, urgent: int) -> dict[str, Any]:
    """Urgent latency under a low backlog, for each queue order of the worker."""
    orders = {order: urgent_latencies(order, backlog, urgent) for order in QUEUE_ORDERS}
    weighted, strict = orders["weighted"], orders["strict"]
    # A FIFO single queue would put each urgent job behind every low job queued before it:
    # estimated as those low jobs divided by the low-job drain rate measured in the same run.
    fifo_s = weighted["fifo_p50_s"]
    factor = weighted["p99_ms"] / max(strict["p99_ms"], 1.0)  # (1 ms floor: timer noise)
    met = factor <= URGENT_FACTOR and weighted["p99_ms"] / 1000 <= fifo_s / 10
    return {
        "name": "urgent latency under backlog",
        "size": backlog,
        "baseline": (
            f"strict p50/p99: {strict['p50_ms']}/{strict['p99_ms']} ms; round_robin: "
            f"{orders['round_robin']['p50_ms']}/{orders['round_robin']['p99_ms']} ms; "
            f"FIFO single queue (est. {weighted['low_jobs_per_s']} low jobs/s): p50 {fifo_s} s"
        ),
        "measured": f"weighted p50/p99: {weighted['p50_ms']}/{weighted['p99_ms']} ms",
        "ratio": round(factor, 2),
        "target": f"weighted p99 <= {URGENT_FACTOR}x strict and <= FIFO / 10",
        "met": met,
        "urgent_jobs": urgent,
        "worker_concurrency": 2,
        "spacing_ms": URGENT_SPACING * 1000,
        "orders": orders,
        "note": (
            "The FIFO single-queue figure is estimated (low jobs queued ahead of each urgent "
            "job / the measured low drain rate), not measured."
        ),
    }


class KillableWorker:
    """A worker (concurrency 2) leading a process group of its own, killed whole as a host dies."""

    def __init__(self, stock: bool, name: str, env: dict[str, str]) -> None:
        self.name = f"{name}@bench"  # its nodename: the hold jobs record it
        self.process = celery_worker(
            stock, 2, self.name, env, own_session=True, unset=RECOVERY_OVERRIDES
        )

    def ready(self, timeout: float = 120) -> None:
        """Wait until the worker answers a ping (its event loop runs and it is fetching)."""
        from celery import Celery

        control = Celery("bench-control", broker=os.environ["BROKER_URL"])
        wait_for(
            lambda: bool(control.control.ping(destination=[self.name], timeout=0.5)),
            timeout,
            f"recovery: {self.name} start-up",
            self.process,
            poll=0,
        )

    def kill(self) -> float:
        """SIGKILL the worker and its pool at once; the time of the kill (time.time())."""
        killed_at = time.time()
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return killed_at

    def stop(self) -> None:
        """A cold shutdown of the whole group (SIGQUIT), SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGQUIT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def hold_starts(client: Any) -> list[tuple[str, int, str, float]]:
    """Every recorded start of a hold job: (task id, n, worker nodename, time.time())."""
    from bench.keys import HOLD_STARTS

    starts = []
    for raw in client.lrange(HOLD_STARTS, 0, -1):
        task_id, n, hostname, started = json.loads(raw)
        starts.append((str(task_id), int(n), str(hostname), float(started)))
    return starts


def all_started(client: Any, ids: frozenset[str]) -> bool:
    """Whether every hold job of `ids` has recorded a start."""
    return ids <= {start[0] for start in hold_starts(client)}


def held_by_service_worker(client: Any, pid: int) -> int:
    """Deliveries the service's in-flight records name worker process `pid` as holding."""
    from app.delivery.records import Keys

    records: Any = client.hvals(Keys().inflight)
    return sum(1 for raw in records if f".{pid}." in json.loads(raw)[0])


def recovery_kills(
    stock: bool,
    survivor: bool,
    kills: int,
    wait_s: float,
    visibility_timeout: int | None = None,
) -> dict[str, Any]:
    """Kill a worker `kills` times while it runs hold jobs; time until its jobs run again.

    survivor: a second worker stays alive through every kill (a new victim is started after
    each recovery); otherwise the victim is alone and a replacement is started right after
    each kill (the replacement is the next victim). Each round enqueues a hold job for every
    free process (2 per worker), waits until all have started, kills the victim between
    KILL_AFTER seconds later, then polls for a second start of each job the victim was running
    (with prefetch 1 and as many jobs as processes, those are all it held), for at most
    `wait_s` seconds. Stops after the first kill whose jobs do not come back.
    """
    from celery import Celery

    client = redis_client()
    client.flushdb()
    env = {"BENCH_VISIBILITY_TIMEOUT": str(visibility_timeout)} if visibility_timeout else {}
    producer = Celery("bench", broker=os.environ["BROKER_URL"])
    rng = random.Random(kills)
    label = "stock" if stock else "service"
    alive = KillableWorker(stock, f"{label}-survivor", env) if survivor else None
    victim = KillableWorker(stock, f"{label}-victim-1", env)
    rounds: list[dict[str, Any]] = []
    job = 0
    try:
        if alive is not None:
            alive.ready()
        victim.ready()
        for k in range(kills):
            ids = []
            for _ in range(4 if survivor else 2):
                job += 1
                sent = producer.send_task("bench.hold", args=[job], queue="default")
                ids.append(sent.id)
            wait_for(
                functools.partial(all_started, client, frozenset(ids)),
                60,
                f"recovery ({label}): round {k + 1}'s jobs started",
                victim.process,
            )
            held = {s[0] for s in hold_starts(client) if s[0] in ids and s[2] == victim.name}
            time.sleep(rng.uniform(*KILL_AFTER))
            killed_pid = victim.process.pid
            killed_at = victim.kill()
            if alive is None:  # no other worker: a replacement, right after the kill
                victim = KillableWorker(stock, f"{label}-victim-{k + 2}", env)
            recorded = None if stock else held_by_service_worker(client, killed_pid)
            back: dict[str, float] = {}
            while len(back) < len(held) and time.time() < killed_at + wait_s:
                for task_id, _, _, started in hold_starts(client):
                    if task_id in held and started > killed_at:
                        back.setdefault(task_id, started - killed_at)
                time.sleep(0.02)
            rounds.append(
                {
                    "held": len(held),
                    "held_per_inflight_records": recorded,
                    "back_s": sorted(round(v, 3) for v in back.values()),
                    "all_back_s": round(max(back.values()), 3) if len(back) == len(held) else None,
                }
            )
            if len(back) < len(held):
                break  # stuck where they are: later rounds would measure nothing new
            wait_for(lambda: queued(client) == 0, 60, f"recovery ({label}): round {k + 1} done")
            if alive is not None:
                victim = KillableWorker(stock, f"{label}-victim-{k + 2}", env)
                victim.ready()
    finally:
        victim.stop()
        if alive is not None:
            alive.stop()
        client.flushdb()
    times = [r["all_back_s"] for r in rounds if r["all_back_s"] is not None]
    return {
        "kills": len(rounds),
        "held_jobs": sum(r["held"] for r in rounds),
        "recovered_kills": len(times),
        "p50_s": round(statistics.median(times), 2) if times else None,
        "max_s": round(max(times), 2) if times else None,
        "wait_s": wait_s,
        "visibility_timeout": visibility_timeout,
        "rounds": rounds,
    }


def bench_recovery(kills: int, stock_wait: float, short_kills: int) -> list[dict[str, Any]]:
    """The recovery benchmark's two scenarios, each with its stock baselines."""
    results = []
    for survivor, name in (
        (True, "recovery, second worker alive"),
        (False, "recovery, replacement started"),
    ):
        ours = recovery_kills(False, survivor, kills, wait_s=60)
        default = recovery_kills(True, survivor, 1, wait_s=stock_wait, visibility_timeout=21600)
        short = recovery_kills(
            True,
            survivor,
            short_kills,
            wait_s=STOCK_SHORT_VISIBILITY + 60,
            visibility_timeout=STOCK_SHORT_VISIBILITY,
        )
        complete = ours["recovered_kills"] == ours["kills"] == kills
        stuck = default["held_jobs"] - sum(len(r["back_s"]) for r in default["rounds"])
        results.append(
            {
                "name": name,
                "size": kills,
                "baseline": (
                    f"stock Celery, kombu Redis, visibility_timeout 21600: {stuck} of "
                    f"{default['held_jobs']} held jobs not back within {stock_wait:.0f} s; "
                    f"visibility_timeout {STOCK_SHORT_VISIBILITY}: p50 {short['p50_s']} s, "
                    f"max {short['max_s']} s ({short['recovered_kills']} of "
                    f"{short['kills']} kills)"
                ),
                "measured": (
                    f"kill to held jobs running again: p50 {ours['p50_s']} s, max "
                    f"{ours['max_s']} s ({ours['recovered_kills']} of {ours['kills']} kills, "
                    f"{ours['held_jobs']} held jobs)"
                ),
                "ratio": (
                    f">= {stock_wait / ours['max_s']:.1f}" if ours["max_s"] and stuck else "n/a"
                ),
                "target": "every held job runs again (times reported, not asserted)",
                "met": complete,
                "service": ours,
                "stock_default": default,
                "stock_short": short,
                "note": (
                    "Default settings (heartbeat every 1 s, a worker dead once its beat is "
                    "5 s old). The ratio is a lower bound: stock's bounded wait over the "
                    "service's max; at visibility_timeout 21600 stock's jobs would come back "
                    "after about 6 h. The stock baseline sweeps for expired records every "
                    "10 s (throttle 1, as the service configures kombu; kombu's own default "
                    "sweeps every 100 s)."
                    + (
                        " A replacement recovers only after its heartbeat has run 5 s, so "
                        "its figure includes the replacement's start-up."
                        if not survivor
                        else ""
                    )
                ),
            }
        )
    return results


def bench_hosts(rounds: int) -> dict[str, Any]:
    """Recovery after a worker host is cut off (bench/hosts.py)."""
    from bench.hosts import bench_hosts as run

    return run(rounds)


def bench_drain(count: int, rounds: int = 2, concurrency: int = 2) -> dict[str, Any]:
    """No-op drain rate: the service's worker vs stock Celery's, alternated `rounds` times.

    Stock Celery is also run with task events on (`--task-events`), the cost the service's
    worker paid before TASK_EVENTS (off by default) turned them off: shown for scale.
    """
    from bench.keys import INCR_COUNTER

    client = redis_client()
    sides: dict[str, Callable[[int], subprocess.Popen[bytes]]] = {
        "stock": stock_worker,
        "stock_events": stock_worker_with_events,
        "service": worker,
    }
    rates: dict[str, list[float]] = {side: [] for side in sides}
    counted = []
    for _ in range(rounds):
        for side, start in sides.items():
            seconds = drain_seconds("bench.incr", count, concurrency, start)
            rates[side].append(count / seconds)
            counted.append(int(client.get(INCR_COUNTER) or 0))
    mean = {side: statistics.fmean(values) for side, values in rates.items()}

    def per_round(baseline: str) -> str:
        pairs = zip(rates["service"], rates[baseline], strict=True)
        return ", ".join(f"{ours / theirs:.3f}" for ours, theirs in pairs)

    def listed(side: str) -> str:
        return ", ".join(f"{r:.0f}" for r in rates[side])

    events_ratio = mean["service"] / mean["stock_events"]
    return {
        "name": "no-op drain (fetch path)",
        "size": count,
        "baseline": (
            f"stock Celery, kombu Redis ({count:,} jobs, concurrency {concurrency}): "
            f"{listed('stock')} jobs/s; with task events: {listed('stock_events')} jobs/s"
        ),
        "measured": (
            f"service worker (task events off, the default): {listed('service')} jobs/s; "
            f"vs stock with task events: {events_ratio:.3f}"
        ),
        "ratio": round(mean["service"] / mean["stock"], 3),
        "target": "every job ran once (rates reported; ratio: service / stock jobs/s)",
        "met": all(c == count for c in counted),
        "jobs_per_s": {side: [round(r, 1) for r in values] for side, values in rates.items()},
        "ratio_vs_stock": round(mean["service"] / mean["stock"], 3),
        "ratio_vs_stock_with_events": round(events_ratio, 3),
        "counted": counted,
        "note": (
            "Alternated stock, stock with task events, service, twice; ratios are of the mean "
            f"rates (per round vs stock: {per_round('stock')}; vs stock with task events: "
            f"{per_round('stock_events')}). All run the same task body (INCR a Redis counter) "
            "with task_acks_late, worker_prefetch_multiplier 1, task_reject_on_worker_lost, "
            "prefork concurrency 2, on queues urgent, default and low; the service's worker "
            "runs its whole celeryconfig (task events off unless TASK_EVENTS=true; with them "
            "on, about half of its main process went to publishing them, three PUBLISHes a "
            "job). The worker's main process is the bottleneck on both sides (py-spy)."
        ),
    }


def schedule_noops(size: int, **when: Any) -> float:
    """Publish `size` bench_noop jobs through the job layer with `countdown=` or `eta=` (one
    value, or a callable of the job's index giving its eta), `perform_all_later` in chunks of
    10,000; seconds taken."""
    from app.jobs.base import perform_all_later
    from bench.tasks import bench_noop

    eta = when.pop("eta", None)
    started = time.perf_counter()
    for first in range(0, size, 10_000):
        perform_all_later(
            bench_noop.s(i).set(**when, **({"eta": eta(i)} if callable(eta) else {}))
            for i in range(first, min(size, first + 10_000))
        )
    return time.perf_counter() - started


def stock_ready(process: subprocess.Popen[bytes], what: str) -> None:
    """Wait until a stock worker has run one bench.incr (its start-up is over)."""
    from celery import Celery

    from bench.keys import INCR_COUNTER

    client = redis_client()
    Celery("bench", broker=os.environ["BROKER_URL"]).send_task(
        "bench.incr", args=[0], queue="default", ignore_result=True
    )
    wait_for(lambda: int(client.get(INCR_COUNTER) or 0) >= 1, 120, what, process)


def settle(process: subprocess.Popen[bytes], since: float, what: str) -> int:
    """Let the worker run until SETTLE_S seconds after `since` (time.monotonic()); its peak
    RSS (worker + pool, KiB) then."""
    wait_for(lambda: time.monotonic() - since >= SETTLE_S, SETTLE_S + 5, what, process, poll=0.2)
    return peak_rss_kib(process.pid)


def scheduled_memory_service(size: int) -> dict[str, Any]:
    """The service's worker (concurrency 2): peak RSS idle, then with `size` jobs scheduled an
    hour ahead in the set."""
    from app.delivery.records import Keys

    keys = Keys()
    client = redis_client()
    client.flushdb()
    what = "scheduled memory (service)"
    with ready_worker(2, what) as process:
        idle = settle(process, time.monotonic(), f"{what}: idle")
        publish_s = schedule_noops(size, countdown=SCHEDULE_AHEAD)
        full_at = time.monotonic()
        in_set = int(client.zcard(keys.schedule))
        loaded = settle(process, full_at, f"{what}: with the set full")
        after = {
            "in_set": int(client.zcard(keys.schedule)),
            "queued": int(client.llen("default")),
            "inflight": int(client.hlen(keys.inflight)),
            "unacked": int(client.hlen("unacked")),
        }
    client.flushdb()
    return {
        "idle_kib": idle,
        "loaded_kib": loaded,
        "publish_s": round(publish_s, 1),
        "in_set_after_publish": in_set,
        "after_settle": after,
        "ok": in_set == after["in_set"] == size and after["inflight"] == after["queued"] == 0,
    }


def scheduled_memory_stock(size: int) -> dict[str, Any]:
    """Stock Celery's worker (concurrency 2, kombu's transport): peak RSS idle, then holding
    `size` ETA tasks an hour ahead (it takes them all: worker_eta_task_limit is unset)."""
    from celery import Celery

    client = redis_client()
    client.flushdb()
    what = "scheduled memory (stock)"
    process = stock_worker(2)
    try:
        stock_ready(process, f"{what}: start-up")
        idle = settle(process, time.monotonic(), f"{what}: idle")
        # Celery's messages (as send_task builds them) through a kombu producer's publish
        # batch: twice send_task's rate, so that the worker gets them sooner.
        producer = Celery("bench", broker=os.environ["BROKER_URL"])
        amqp = producer.amqp
        started = time.perf_counter()
        with producer.producer_or_acquire() as p, p.batch(max_size=1000):
            for i in range(size):
                message = amqp.create_task_message(
                    str(uuid.uuid4()), "bench.incr", [i], {}, countdown=SCHEDULE_AHEAD
                )
                p.publish(
                    message.body,
                    routing_key="default",
                    exchange="",
                    headers=message.headers,
                    serializer="json",
                    **message.properties,
                )
        publish_s = time.perf_counter() - started
        wait_for(
            lambda: int(client.llen("default")) == 0 and int(client.hlen("unacked")) >= size,
            600,
            f"{what}: the worker taking {size} ETA tasks",
            process,
            poll=0.2,
        )
        take_s = time.perf_counter() - started - publish_s
        loaded = settle(process, time.monotonic(), f"{what}: holding them")
        unacked = int(client.hlen("unacked"))
    finally:
        stop_worker(process, cold=True)
        client.flushdb()
    return {
        "idle_kib": idle,
        "loaded_kib": loaded,
        "publish_s": round(publish_s, 1),
        "take_s": round(take_s, 1),
        "unacked": unacked,
    }


def bench_scheduled_memory(size: int) -> dict[str, Any]:
    """Worker memory with `size` jobs scheduled an hour ahead, the service's vs stock's."""
    ours = scheduled_memory_service(size)
    stock = scheduled_memory_stock(size)
    ratio = ours["loaded_kib"] / ours["idle_kib"]
    stock_ratio = stock["loaded_kib"] / stock["idle_kib"]

    def mib(kib: int) -> str:
        return f"{kib / 1024:.0f} MiB"

    return {
        "name": "scheduled jobs: worker memory",
        "size": size,
        "baseline": (
            f"stock Celery, kombu Redis, {size:,} ETA tasks 1 h ahead: idle "
            f"{mib(stock['idle_kib'])}, holding them {mib(stock['loaded_kib'])} "
            f"(x{stock_ratio:.2f}, +{(stock['loaded_kib'] - stock['idle_kib']) / 1024:.0f} MiB), "
            f"{stock['unacked']:,} in unacked"
        ),
        "measured": (
            f"service worker: idle {mib(ours['idle_kib'])}, with {size:,} jobs 1 h ahead in the "
            f"scheduled set {mib(ours['loaded_kib'])}; the set holds "
            f"{ours['after_settle']['in_set']:,}, the worker "
            f"{ours['after_settle']['inflight'] + ours['after_settle']['queued']}"
        ),
        "ratio": round(ratio, 3),
        "target": "<= 1.1 (peak RSS, worker + pool, vs the same worker idle)",
        "met": ours["ok"] and ratio <= 1.1,
        "service": ours,
        "stock": stock,
        "stock_ratio": round(stock_ratio, 2),
        "note": (
            f"Both workers at concurrency 2; peak RSS (VmHWM, main process + pool) read after "
            f"each has run {SETTLE_S} s idle, then again {SETTLE_S} s after the jobs were in "
            "place. The service's jobs are published with perform_all_later(... countdown=3600) "
            f"({ours['publish_s']} s; they go to the scheduled set, not to a queue); stock's with "
            "Celery's create_task_message(countdown=3600) through a kombu producer's publish "
            f"batch ({stock['publish_s']} s), which its worker took from the queue and held "
            f"(all held {stock['take_s']} s after publishing ended; its intake of ETA tasks "
            "is what makes this benchmark the longest of the three): stock Celery 5.6+ can "
            "bound that with worker_eta_task_limit, unset by default."
        ),
    }


def redis_now(client: Any) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def burst_lateness(size: int) -> dict[str, Any]:
    """`size` jobs falling due within one second, on a worker whose target queue is paused:
    when each reaches its queue (sampled from LLEN), relative to its due time."""
    from app.delivery import records
    from app.delivery.records import Keys

    keys = Keys()
    client = redis_client()
    client.flushdb()
    what = "scheduled lateness (burst)"
    with ready_worker(2, what) as process:
        records.pause(client, "default")  # nothing takes them: the list shows what arrived
        # Far enough ahead for the publishing to end first (it runs at 2,000-4,000 jobs/s).
        due = redis_now(client) + BURST_LEAD + size / 1500
        publish_s = schedule_noops(
            size, eta=lambda i: dt.datetime.fromtimestamp(due + i / size, dt.UTC)
        )
        published_at = redis_now(client)
        if published_at > due - 1:
            raise RuntimeError(f"{what}: publishing ended {published_at - due:.1f} s from due")
        in_set = int(client.zcard(keys.schedule))
        time.sleep(max(0.0, due - 0.2 - redis_now(client)))
        samples: list[tuple[float, int]] = []
        deadline = due + 120
        while True:
            with client.pipeline(transaction=False) as pipe:
                now, length = pipe.time().llen("default").execute()
            samples.append((float(now[0]) + float(now[1]) / 1e6, int(length)))
            if length >= size or samples[-1][0] > deadline or process.poll() is not None:
                break
            time.sleep(0.002)
        time.sleep(1)  # anything moved twice would show now
        final = {"queued": int(client.llen("default")), "in_set": int(client.zcard(keys.schedule))}
    client.flushdb()
    lateness: list[float] = []
    for at, length in samples:
        while len(lateness) < min(length, size):
            lateness.append(at - (due + len(lateness) / size))  # moved soonest first
    if len(lateness) < size:
        raise RuntimeError(f"{what}: {len(lateness)} of {size} jobs moved within 120 s")
    arrived = [at for at, length in samples if length > 0]
    return {
        "publish_s": round(publish_s, 1),
        "in_set": in_set,
        "final": final,
        "exactly_once": in_set == size and final == {"queued": size, "in_set": 0},
        "samples": len(samples),
        "p50_s": round(percentile(lateness, 50), 3),
        "p99_s": round(percentile(lateness, 99), 3),
        "max_s": round(max(lateness), 3),
        "min_s": round(min(lateness), 3),
        "arrival_span_s": round(samples[-1][0] - arrived[0], 3),
    }


def single_lateness(stock: bool, count: int) -> dict[str, Any]:
    """`count` jobs, each due alone (SINGLE_SPACING apart, with jitter), run by a worker
    (concurrency 2): seconds from due time to start. The service's go through the job layer
    (the scheduled set); stock's are ETA tasks its worker holds."""
    from celery import Celery

    from bench.keys import DUE_STARTS

    client = redis_client()
    client.flushdb()
    label = "stock" if stock else "service"
    what = f"scheduled lateness ({label}, single jobs)"
    rng = random.Random(count)
    process = stock_worker(2) if stock else worker(2)
    try:
        if stock:
            stock_ready(process, f"{what}: start-up")
        else:
            from bench.tasks import bench_noop

            bench_noop.delay(0)
            wait_for(lambda: queued(client) == 0, 120, f"{what}: start-up", process)
        first = time.time() + 3
        dues = [
            first + n * SINGLE_SPACING + rng.uniform(0, SINGLE_SPACING / 2) for n in range(count)
        ]
        producer = Celery("bench", broker=os.environ["BROKER_URL"])
        from bench.tasks import bench_due

        for n, due in enumerate(dues):
            eta = dt.datetime.fromtimestamp(due, dt.UTC)
            if stock:
                producer.send_task("bench.due", args=[n, due], queue="default", eta=eta)
            else:
                bench_due.apply_async(args=[n, due], eta=eta)
        waiting = None if stock else int(client.zcard("jobs_service:schedule"))
        wait_for(
            lambda: int(client.llen(DUE_STARTS)) >= count,
            60 + count * SINGLE_SPACING,
            f"{what}: {count} jobs started",
            process,
            poll=0.1,
        )
        time.sleep(1)  # a second start would show now
        starts = [json.loads(raw) for raw in client.lrange(DUE_STARTS, 0, -1)]
    finally:
        stop_worker(process)
        client.flushdb()
    lateness = [started - due for _, due, started in starts]
    return {
        "jobs": count,
        "in_set_after_publish": waiting,
        "starts": len(starts),
        "exactly_once": sorted(n for n, _, _ in starts) == list(range(count)),
        "p50_ms": round(percentile(lateness, 50) * 1000, 1),
        "p99_ms": round(percentile(lateness, 99) * 1000, 1),
        "max_ms": round(max(lateness) * 1000, 1),
        "min_ms": round(min(lateness) * 1000, 1),
    }


def bench_scheduled_lateness(size: int, single: int) -> dict[str, Any]:
    """Lateness of `size` jobs falling due in one second, and of `single` jobs due alone,
    the latter beside stock Celery's ETA tasks."""
    burst = burst_lateness(size)
    ours = single_lateness(False, single)
    stock = single_lateness(True, single)
    ok = burst["exactly_once"] and ours["exactly_once"] and stock["exactly_once"]
    return {
        "name": "scheduled jobs: lateness",
        "size": [size, single],
        "baseline": (
            f"stock Celery ETA tasks (its worker holds them), {single} jobs each due alone, "
            f"start lateness p50/p99: {stock['p50_ms']}/{stock['p99_ms']} ms; "
            "Sidekiq polls about every 5 s (reference, not measured)"
        ),
        "measured": (
            f"{single} jobs each due alone, start lateness p50/p99: {ours['p50_ms']}/"
            f"{ours['p99_ms']} ms; {size:,} due within one second, moved into the queue "
            f"p50/p99/max {burst['p50_s']}/{burst['p99_s']}/{burst['max_s']} s after due "
            "(one worker's poller)"
        ),
        "ratio": round(ours["p99_ms"] / max(stock["p99_ms"], 1.0), 2),
        "target": "single-job p99 <= 1 s; each job once (ratio: single p99 vs stock's)",
        "met": ok and ours["p99_ms"] <= 1000,
        "burst": burst,
        "single_service": ours,
        "single_stock": stock,
        "note": (
            f"Burst: {size:,} bench_noop jobs published through perform_all_later with etas "
            "spread evenly over one second, on a service worker (concurrency 2) whose queue "
            "`default` is paused, so nothing takes them; the benchmark samples the list's "
            "LLEN with Redis's TIME every 2 ms, and the i-th job to arrive is the i-th due "
            "(RELEASE moves them soonest first). A sample waits behind the RELEASE call that "
            f"is running, so the {burst['samples']} samples are about one call (1,000 moves) "
            "apart and each arrival reads up to one call late. "
            f"Single jobs: due {SINGLE_SPACING * 1000:.0f}-{SINGLE_SPACING * 1500:.0f} ms apart, "
            "lateness from due time to the job's first line, on the same machine's clock."
        ),
    }


def release_all(pollers: int, size: int) -> tuple[float, list[int]]:
    """`pollers` Pollers (threads, a client each) releasing every due entry at once: seconds
    until the last returned, and how many each moved."""
    import threading

    from app.delivery import scheduled
    from app.delivery.records import Keys

    each = [scheduled.Poller(redis_client(), Keys()) for _ in range(pollers)]
    for poller in each:
        poller.client.ping()  # connected before the clock starts
    moved = [0] * pollers
    barrier = threading.Barrier(pollers + 1)

    def run(k: int) -> None:
        barrier.wait()
        moved[k] = each[k].release()[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(pollers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, moved


def bench_scheduled_poller(size: int, rounds: int = 2) -> dict[str, Any]:
    """Due jobs moved per second by the poller's RELEASE script, by one poller and by two at
    once, vs the raw floor of pipelined LPUSHes of the same messages."""
    from app.delivery.records import Keys
    from app.delivery.scheduled import RELEASE_BATCH

    keys = Keys()
    client = redis_client()
    client.flushdb()
    schedule_noops(size, countdown=SCHEDULE_AHEAD)
    if int(client.zcard(keys.schedule)) != size:
        raise RuntimeError(f"scheduled poller: {client.zcard(keys.schedule)} of {size} scheduled")
    # Every entry due now: the scores to 0, the messages as published (their eta is only read
    # by the worker that takes them; nothing does here).
    client.zunionstore(keys.schedule, {keys.schedule: 0})
    saved = (f"{keys.schedule}:bench", f"{keys.schedule_messages}:bench")
    client.copy(keys.schedule, saved[0])
    client.copy(keys.schedule_messages, saved[1])
    raws: Any = client.hvals(keys.schedule_messages)
    messages = [bytes(raw).partition(b"\n")[2] for raw in raws]
    queue = "default"

    def restore() -> None:
        client.delete(queue)
        client.copy(saved[0], keys.schedule, replace=True)
        client.copy(saved[1], keys.schedule_messages, replace=True)

    rates: dict[str, list[float]] = {"one": [], "two": [], "lpush": []}
    checks = []
    for _ in range(rounds):
        for pollers, side in ((1, "one"), (2, "two")):
            restore()
            seconds, moved = release_all(pollers, size)
            rates[side].append(size / seconds)
            check = {
                "pollers": pollers,
                "moved": moved,
                "queued": int(client.llen(queue)),
                "left_in_set": int(client.zcard(keys.schedule)),
                "left_messages": int(client.hlen(keys.schedule_messages)),
            }
            check["exactly_once"] = (
                sum(moved) == check["queued"] == size
                and check["left_in_set"] == check["left_messages"] == 0
            )
            checks.append(check)
        rates["lpush"].append(size / lpush_floor_seconds(client, queue, messages))
        if int(client.llen(queue)) != size:
            raise RuntimeError("scheduled poller: the LPUSH floor lost messages")
    client.flushdb()
    mean = {side: statistics.fmean(values) for side, values in rates.items()}

    def listed(side: str) -> str:
        return ", ".join(f"{r:,.0f}" for r in rates[side])

    size_kib = statistics.fmean(len(m) for m in messages) / 1024
    return {
        "name": "scheduled jobs: poller throughput",
        "size": size,
        "baseline": (
            f"raw Redis floor, pipelined LPUSH of the same {size:,} messages (1,000 a "
            f"pipeline): {listed('lpush')} jobs/s"
        ),
        "measured": (
            f"Poller.release (RELEASE, {RELEASE_BATCH:,} a call): one poller "
            f"{listed('one')} jobs/s; two at once {listed('two')} jobs/s, each job moved once"
        ),
        "ratio": round(mean["one"] / mean["lpush"], 2),
        "target": ">= 20,000 jobs/s, each job once (ratio: one poller vs LPUSH floor)",
        "met": all(c["exactly_once"] for c in checks) and min(rates["one"]) >= 20_000,
        "jobs_per_s": {side: [round(r) for r in values] for side, values in rates.items()},
        "checks": checks,
        "note": (
            f"{size:,} bench_noop jobs published through perform_all_later(countdown=3600) "
            f"(messages of {size_kib:.2f} KiB), then made due at once (their scores set to 0); "
            "each round restores the same set (COPY) and times Poller(client, Keys()).release() "
            "from the benchmark process, then two Pollers in two threads with a client each; "
            "a round passes when the pollers' counts sum to the list's length, exactly the "
            "jobs, and the set and its messages are empty."
        ),
    }


@contextmanager
def outbox_bypassed() -> Iterator[None]:
    """Inside, the job layer enqueues as main did before the outbox: `_through_outbox` says
    "not in a transaction", so `.delay()` and `perform_all_later` inside a `session_scope`
    fall through to `after_commit(deliver)`, the publish right after the commit."""
    from app.jobs import base

    original = base._through_outbox
    base._through_outbox = lambda prepared, producer=None: False  # type: ignore[assignment]
    try:
        yield
    finally:
        base._through_outbox = original  # type: ignore[assignment]


@contextmanager
def broker_refusing() -> Iterator[None]:
    """Inside, every publish of the job layer fails as with Redis down (kombu's
    OperationalError), so the outbox's fast path leaves its rows (it logs one warning per
    commit); this process's other Redis clients still work."""
    from kombu.exceptions import OperationalError

    from app.jobs import base

    def refuse(prepared: Any, producer: Any = None) -> None:
        raise OperationalError("Error 111 connecting to the broker (the benchmark's outage)")

    original = base._deliver
    base._deliver = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        base._deliver = original  # type: ignore[assignment]


def outbox_rows() -> int:
    """Rows in the outbox table."""
    from app.delivery import outbox

    return outbox.pending().rows


def bench_outbox_enqueue(per_job: int, bulk: int, rounds: int = 2) -> dict[str, Any]:
    """Enqueueing inside a transaction through the outbox vs the after-commit publish it
    replaced (`outbox_bypassed`), alternated `rounds` times: `per_job` transactions of one
    `.delay()` each, and one transaction of `perform_all_later` of `bulk` jobs."""
    from app.db import session_scope
    from app.jobs.base import perform_all_later
    from app.models import Dataset
    from bench.tasks import bench_noop

    client = redis_client()
    client.flushdb()
    queue = "default"

    def one_per_transaction(count: int) -> float:
        started = time.perf_counter()
        for i in range(count):
            with session_scope():
                bench_noop.delay(i)
        return (time.perf_counter() - started) / count

    def with_a_write(count: int) -> float:  # as a caller would: its own row, then the job
        started = time.perf_counter()
        for i in range(count):
            with session_scope() as session:
                session.add(Dataset(name=f"outbox-bench-{i}"))
                bench_noop.delay(i)
        return (time.perf_counter() - started) / count

    def all_in_one(count: int) -> float:
        started = time.perf_counter()
        with session_scope():
            perform_all_later(bench_noop.s(i) for i in range(count))
        return time.perf_counter() - started

    def measure(side: str, run: Callable[[int], float], count: int) -> float:
        client.delete(queue)
        if side == "baseline":
            with outbox_bypassed():
                seconds = run(count)
        else:
            seconds = run(count)
        published, left = int(client.llen(queue)), outbox_rows()
        checks.append({"side": side, "jobs": count, "published": published, "outbox_left": left})
        if published != count or left:
            raise RuntimeError(
                f"outbox enqueue ({side}): {published} of {count} published, {left} rows left"
            )
        client.delete(queue)
        return seconds

    checks: list[dict[str, Any]] = []
    for side in ("baseline", "outbox"):  # warm both paths (connections, statement caches)
        measure(side, one_per_transaction, 100)
        measure(side, all_in_one, 1000)
    checks.clear()
    per: dict[str, list[float]] = {"baseline": [], "outbox": []}
    written: dict[str, list[float]] = {"baseline": [], "outbox": []}
    whole: dict[str, list[float]] = {"baseline": [], "outbox": []}
    for _ in range(rounds):
        for side in ("baseline", "outbox"):
            per[side].append(measure(side, one_per_transaction, per_job))
            written[side].append(measure(side, with_a_write, per_job // 2))
            whole[side].append(measure(side, all_in_one, bulk))
    client.flushdb()
    per_ratio = statistics.fmean(per["outbox"]) / statistics.fmean(per["baseline"])
    written_ratio = statistics.fmean(written["outbox"]) / statistics.fmean(written["baseline"])
    bulk_ratio = statistics.fmean(whole["outbox"]) / statistics.fmean(whole["baseline"])

    def us(values: list[float]) -> str:
        return ", ".join(f"{v * 1e6:.0f}" for v in values)

    def secs(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values)

    return {
        "name": "outbox: enqueue in a transaction",
        "size": per_job,
        "baseline": (
            f"after-commit publish (outbox bypassed): one .delay() per transaction "
            f"({per_job:,} transactions): {us(per['baseline'])} us/job; perform_all_later of "
            f"{bulk:,} in one transaction: {secs(whole['baseline'])} s"
        ),
        "measured": (
            f"through the outbox: {us(per['outbox'])} us/job ({per_ratio:.2f}x); "
            f"perform_all_later of {bulk:,}: {secs(whole['outbox'])} s ({bulk_ratio:.2f}x)"
        ),
        "ratio": round(per_ratio, 2),
        "target": "<= 1.3x per job, <= 1.1x perform_all_later of 10,000; outbox empty after",
        "met": per_ratio <= 1.3 and bulk_ratio <= 1.1,
        "per_job_seconds": per,
        "per_job_with_a_write_seconds": written,
        "bulk_seconds": whole,
        "ratio_per_job": round(per_ratio, 3),
        "ratio_per_job_with_a_write": round(written_ratio, 3),
        "ratio_bulk": round(bulk_ratio, 3),
        "checks": checks,
        "note": (
            "Alternated baseline, outbox, twice, each side: one .delay() of bench_noop per "
            f"transaction ({per_job:,}), the same with the transaction also inserting a row of "
            f"its own (a datasets row, {per_job // 2:,} transactions: baseline "
            f"{us(written['baseline'])} us/job, outbox {us(written['outbox'])} us/job, "
            f"{written_ratio:.2f}x; reported, not part of the target), then perform_all_later "
            f"of {bulk:,} in one transaction. The baseline is the same code with "
            "app.jobs.base._through_outbox patched to return False in the benchmark process, "
            "so the job is published by after_commit(deliver), as before the outbox. Every "
            "run checks that the queue holds exactly its jobs and that the outbox is empty "
            "(the fast path deleted its rows). In the empty transaction the baseline never "
            "touches PostgreSQL (a session with no statement does not connect), while the "
            "outbox adds a BEGIN, an INSERT and a commit (one WAL flush), then the fast "
            "path's DELETE transaction (outbox.forget, which commits without waiting for "
            "the flush)."
        ),
    }


#: Where the relay benchmark keeps its 100,000 pending rows between runs.
OUTBOX_COPY = "bench_outbox_copy"


def outbox_backlog(size: int) -> float:
    """Leave `size` bench_noop jobs in the outbox as an outage would: committed through
    `perform_all_later` in transactions of 10,000 while every publish fails; seconds taken."""
    from app.db import session_scope
    from app.jobs.base import perform_all_later
    from bench.tasks import bench_noop

    started = time.perf_counter()
    with broker_refusing():
        for first in range(0, size, 10_000):
            with session_scope():
                perform_all_later(bench_noop.s(i) for i in range(first, min(size, first + 10_000)))
    return time.perf_counter() - started


def restore_outbox() -> None:
    """The outbox as the outage left it (its rows, ids and creation times), analyzed."""
    from sqlalchemy import text

    from app.db import get_engine

    with get_engine().begin() as connection:
        connection.execute(text("TRUNCATE outbox_messages"))
        connection.execute(text(f"INSERT INTO outbox_messages SELECT * FROM {OUTBOX_COPY}"))
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE outbox_messages"))


def relay_all(grace: float) -> int:
    """One relay's catch-up: `relay_once` until it finds nothing (what `Relay.round` loops)."""
    from app.delivery import outbox
    from app.jobs.base import publish_outbox_rows

    total = 0
    while published := outbox.relay_once(publish_outbox_rows, outbox.RELAY_BATCH, grace):
        total += published
    return total


def relay_process(barrier: Any, results: Any, grace: float) -> None:
    """A relay in a process of its own (a worker's, as deployed): connected to PostgreSQL and
    Redis, it waits at `barrier`, relays everything it can, and puts (start, end, rows) on
    `results`."""
    import bench.tasks  # noqa: F401  (the job it relays must be a job here, as in a worker)
    from app.celery_app import celery_app
    from app.db import get_engine

    with get_engine().connect():
        pass
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection()
    barrier.wait()
    started = time.perf_counter()
    total = relay_all(grace)
    results.put((started, time.perf_counter(), total))


def parallel_relays(relays: int, grace: float) -> tuple[float, list[int]]:
    """`relays` relays in processes of their own, started together: seconds from the first
    start to the last finish (CLOCK_MONOTONIC, shared), and the rows each published."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(relays)
    results = context.Queue()
    processes = [
        context.Process(target=relay_process, args=(barrier, results, grace)) for _ in range(relays)
    ]
    for process in processes:
        process.start()
    found = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(60)
        if process.exitcode != 0:
            raise RuntimeError(f"outbox relay: a relay process exited with {process.exitcode}")
    return max(end for _, end, _ in found) - min(start for start, _, _ in found), [
        n for _, _, n in found
    ]


def bench_outbox_relay(size: int, rounds: int = 2) -> dict[str, Any]:
    """The relay's throughput over `size` rows an outage left, one relay (this process) and two
    at once (two processes), vs `perform_all_later` of as many jobs outside a transaction (the
    bulk publish the relay uses) and the raw Redis floor (pipelined LPUSH of the same bytes)."""
    from sqlalchemy import text

    from app.db import get_engine
    from app.delivery import outbox
    from app.jobs.base import perform_all_later
    from bench.tasks import bench_noop

    client = redis_client()
    client.flushdb()
    queue = "default"
    grace = 0.0  # the rows are older than GRACE anyway; no relay waits on the clock here
    made = outbox_backlog(size)
    if outbox_rows() != size or client.llen(queue):
        raise RuntimeError(f"outbox relay: {outbox_rows()} of {size} rows left by the outage")
    with get_engine().begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {OUTBOX_COPY}"))
        connection.execute(text(f"CREATE TABLE {OUTBOX_COPY} AS SELECT * FROM outbox_messages"))

    def bulk_floor() -> float:
        client.delete(queue)
        seconds = timed(lambda: perform_all_later(bench_noop.s(i) for i in range(size)))
        if int(client.llen(queue)) != size:
            raise RuntimeError("outbox relay: perform_all_later lost messages")
        return seconds

    messages: list[bytes] = []

    def lpush_floor() -> float:
        client.delete(queue)
        started = time.perf_counter()
        for first in range(0, size, 1000):
            with client.pipeline(transaction=False) as pipe:
                pipe.lpush(queue, *messages[first : first + 1000])
                pipe.execute()
        seconds = time.perf_counter() - started
        if int(client.llen(queue)) != size:
            raise RuntimeError("outbox relay: the LPUSH floor lost messages")
        return seconds

    rates: dict[str, list[float]] = {"bulk": [], "one": [], "two": [], "lpush": []}
    checks = []
    try:
        for _ in range(rounds):
            rates["bulk"].append(size / bulk_floor())
            for relays, side in ((1, "one"), (2, "two")):
                restore_outbox()
                client.delete(queue)
                if relays == 1:
                    started = time.perf_counter()
                    published = [relay_all(grace)]
                    seconds = time.perf_counter() - started
                else:
                    seconds, published = parallel_relays(relays, grace)
                rates[side].append(size / seconds)
                check = {
                    "relays": relays,
                    "published": published,
                    "queued": int(client.llen(queue)),
                    "outbox_left": outbox_rows(),
                }
                check["exactly_once"] = (
                    sum(published) == check["queued"] == size and check["outbox_left"] == 0
                )
                checks.append(check)
            if not messages:  # the bytes the relay pushed, for the floor
                messages = [bytes(m) for m in client.lrange(queue, 0, -1)]
            rates["lpush"].append(size / lpush_floor())
    finally:
        client.flushdb()
        with get_engine().begin() as connection:
            connection.execute(text(f"DROP TABLE IF EXISTS {OUTBOX_COPY}"))
            connection.execute(text("TRUNCATE outbox_messages"))
    mean = {side: statistics.fmean(values) for side, values in rates.items()}

    def listed(side: str) -> str:
        return ", ".join(f"{r:,.0f}" for r in rates[side])

    size_kib = statistics.fmean(len(m) for m in messages) / 1024
    return {
        "name": "outbox: relay after an outage",
        "size": size,
        "baseline": (
            f"perform_all_later of {size:,} outside a transaction (the bulk publish the relay "
            f"uses): {listed('bulk')} jobs/s; raw Redis floor, pipelined LPUSH of the same "
            f"messages (1,000 a pipeline): {listed('lpush')} jobs/s"
        ),
        "measured": (
            f"relay_once loop ({outbox.RELAY_BATCH:,} rows a call): one relay "
            f"{listed('one')} jobs/s; two relays at once (processes) {listed('two')} jobs/s, "
            "each job published once, outbox empty"
        ),
        "ratio": round(mean["one"] / mean["bulk"], 2),
        "target": ">= 10,000 jobs/s, each job once (ratio: one relay vs perform_all_later)",
        "met": all(c["exactly_once"] for c in checks) and min(rates["one"]) >= 10_000,
        "jobs_per_s": {side: [round(r) for r in values] for side, values in rates.items()},
        "checks": checks,
        "note": (
            f"{size:,} bench_noop jobs committed through perform_all_later in transactions of "
            f"10,000 while every publish failed (kombu OperationalError; {made:.1f} s), so "
            f"the outbox kept them (messages of {size_kib:.2f} KiB); each round restores the "
            "same rows (ids and creation times kept) and times relay_once(publish_outbox_rows) "
            "looped until it finds nothing, in the benchmark process, then in two processes "
            "started together (from the first start to the last finish); a round passes when "
            "the relays' counts sum to the queue's length, exactly the jobs, and the outbox "
            "is empty."
        ),
    }


def bench_web(size: int, workers: int) -> dict[str, Any]:
    from bench.web import bench_web as run

    return run(size, workers)


def callbacks_of(client: Any, tag: str) -> list[float]:
    """When the job-batch benchmark's on_complete callback tagged `tag` ran (once, if all is
    well)."""
    from bench.tasks import BATCH_CALLBACKS

    entries = [json.loads(raw) for raw in client.lrange(BATCH_CALLBACKS, 0, -1)]
    return [at for each, at in entries if each == tag]


def job_batch_checked(batch: Any, members: int, client: Any, tag: str) -> bool:
    """The job batch counted every member once, none failed, completed, and its on_complete
    ran exactly once."""
    done = batch.progress()
    return (
        (done.total, done.pending, done.failed, done.dead) == (members, 0, 0, 0)
        and done.completed_at is not None
        and done.succeeded_at is not None
        and len(callbacks_of(client, tag)) == 1
    )


def bench_batch_membership(size: int, rounds: int = 2, concurrency: int = 2) -> dict[str, Any]:
    """`size` no-op jobs drained by one worker, enqueued plainly vs as members of a job batch
    (until its on_complete callback ran), alternated `rounds` times."""
    from app.jobs.base import perform_all_later
    from app.jobs.batches import Batch as JobsBatch
    from bench.tasks import bench_batch_done, bench_noop

    client = redis_client()
    drained: dict[str, list[float]] = {"plain": [], "batch": []}
    enqueued: dict[str, list[float]] = {"plain": [], "batch": []}
    checks = []
    for round_ in range(rounds):
        client.flushdb()
        enqueued["plain"].append(
            timed(lambda: perform_all_later(bench_noop.s(i) for i in range(size)))
        )
        checks.append(queued(client) == size)
        drained["plain"].append(drain(size, concurrency, f"draining {size} plain no-op jobs"))

        client.flushdb()
        tag = f"membership-{round_}"
        created: list[JobsBatch] = []

        def add(tag: str = tag, created: list[JobsBatch] = created) -> None:  # with its creation
            batch = JobsBatch.create(f"bench: {size} no-ops", on_complete=bench_batch_done.s(tag))
            with batch.jobs():
                perform_all_later(bench_noop.s(i) for i in range(size))
            created.append(batch)

        def callback_ran(tag: str = tag) -> bool:
            return bool(callbacks_of(client, tag))

        enqueued["batch"].append(timed(add))
        checks.append(queued(client) == size)
        what = f"draining {size} no-op jobs of a job batch"
        drained["batch"].append(drain(size, concurrency, what, until=callback_ran))
        checks.append(job_batch_checked(created[0], size, client, tag))
    plain_s, batch_s = statistics.fmean(drained["plain"]), statistics.fmean(drained["batch"])
    ratio = batch_s / plain_s

    def rates(side: str) -> str:
        return ", ".join(f"{size / seconds:.0f}" for seconds in drained[side])

    def enqueues(side: str) -> str:
        return ", ".join(f"{seconds:.2f}" for seconds in enqueued[side])

    return {
        "name": "job batches: membership overhead",
        "size": size,
        "baseline": (
            f"{size:,} bench_noop jobs, perform_all_later, one worker (concurrency "
            f"{concurrency}): {rates('plain')} jobs/s; enqueue {enqueues('plain')} s"
        ),
        "measured": (
            f"the same inside Batch.create(on_complete=...).jobs(), until on_complete ran: "
            f"{rates('batch')} jobs/s; enqueue {enqueues('batch')} s "
            f"({statistics.fmean(enqueued['batch']) / statistics.fmean(enqueued['plain']):.1f}x)"
        ),
        "ratio": round(ratio, 3),
        "target": "<= 1.2 (time ratio, batch / plain); every member counted once, callback once",
        "met": ratio <= 1.2 and all(checks),
        "checked": all(checks),
        "drain_s": {side: [round(v, 3) for v in values] for side, values in drained.items()},
        "enqueue_s": {side: [round(v, 3) for v in values] for side, values in enqueued.items()},
        "per_round": [
            round(b / a, 3) for a, b in zip(drained["plain"], drained["batch"], strict=True)
        ],
        "note": (
            "Each member, when it succeeds, commits one transaction of its own in the pool "
            "process (job_finished: the member row and the batch row's counters) before its "
            "message is acknowledged; with prefetch 1 that time adds to every job's cycle. A "
            "no-op job that commits one UPDATE of a shared row of its own costs about as much "
            "(see BENCHMARKS.md, issue 17)."
        ),
    }


def run_job_batch(size: int, tag: str) -> tuple[float, float, float, int, bool]:
    """Seed a domain batch and process it through a job batch on a fresh worker (concurrency 2):
    its `process_batch_range` jobs (ranges of ITEMS_PER_JOB items, as batch_process fans out)
    enqueued in one `jobs()` block with an on_complete callback.

    Returns the seconds from the start of the fan-out until the on_complete callback ran, and
    until the domain batch was completed, the fan-out's seconds, the domain batch id, and
    whether the job batch counted every member once and ran its callback once.
    """
    from sqlalchemy import select

    from app.db import session_scope
    from app.jobs.base import perform_all_later
    from app.jobs.batch_process import FANOUT_PAGE, process_batch_range
    from app.jobs.batches import Batch as JobsBatch
    from app.models import Batch
    from app.services.batches import pending_ranges, start_batch
    from bench.tasks import bench_batch_done

    batch_id = seed_batch(size)
    client = redis_client()
    client.flushdb()
    what = f"batch of {size} items (job batch of process_batch_range)"
    with ready_worker(2, what) as process:
        completed_after: float | None = None

        def callback_ran() -> bool:
            nonlocal completed_after
            if completed_after is None:
                with session_scope() as session:
                    status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
                if status == "completed":
                    completed_after = time.perf_counter() - started
            return bool(callbacks_of(client, tag))

        started = time.perf_counter()
        with session_scope() as session:  # as batch_process does: start it, page its ranges
            start_batch(session, batch_id)
            ranges, after = pending_ranges(session, batch_id, 0, FANOUT_PAGE)
            while after is not None:
                more, after = pending_ranges(session, batch_id, after, FANOUT_PAGE)
                ranges += more
        jobs = JobsBatch.create(
            f"bench: {size} items of batch {batch_id}", on_complete=bench_batch_done.s(tag)
        )
        with jobs.jobs():
            perform_all_later(
                process_batch_range.s(r.batch_id, r.first_id, r.last_id) for r in ranges
            )
        fanned_out = time.perf_counter() - started
        wait_for(callback_ran, 120 + size / 200, what, process, poll=0.05)
        elapsed = time.perf_counter() - started
        callback_ran()
    checked = job_batch_checked(jobs, len(ranges), client, tag)
    return elapsed, completed_after or elapsed, fanned_out, batch_id, checked


def bench_batch_jobs(size: int, rounds: int = 2) -> dict[str, Any]:
    """`size` batch items through batch_process vs through a job batch of the same range jobs,
    alternated `rounds` times; identical item states."""
    from app.services.batches import ITEMS_PER_JOB

    ours: list[float] = []
    jobs: list[float] = []
    jobs_completed: list[float] = []
    fanouts: list[float] = []
    outcomes = []
    checks = []
    for round_ in range(rounds):
        seconds, _, batch_id = run_batch(size, naive=False)
        ours.append(seconds)
        outcomes.append(batch_outcome(batch_id))
        seconds, completed, fanout, batch_id, checked = run_job_batch(size, f"items-{round_}")
        jobs.append(seconds)
        jobs_completed.append(completed)
        fanouts.append(fanout)
        outcomes.append(batch_outcome(batch_id))
        checks.append(checked)
    expected = ("completed", size, size)
    first_items = outcomes[0][1]
    identical = all(
        batch == expected and items == first_items and all(i[1] != "pending" for i in items)
        for batch, items in outcomes
    )
    ours_rate = size / statistics.fmean(ours)
    jobs_rate = size / statistics.fmean(jobs)
    ratio = jobs_rate / ours_rate
    ranges = -(-size // ITEMS_PER_JOB)

    def listed(values: list[float]) -> str:
        return ", ".join(f"{size / s:,.0f}" for s in values)

    return {
        "name": f"job batches: {size:,} items",
        "size": size,
        "baseline": (
            f"batch_process (fan-out job, {ranges} process_batch_range jobs): "
            f"{listed(ours)} items/s ({', '.join(f'{s:.1f}' for s in ours)} s)"
        ),
        "measured": (
            f"the same {ranges} process_batch_range jobs in one job batch, until its "
            f"on_complete ran: {listed(jobs)} items/s ({', '.join(f'{s:.1f}' for s in jobs)} s; "
            f"fan-out from the benchmark process {', '.join(f'{s:.2f}' for s in fanouts)} s; "
            f"domain batch completed after {', '.join(f'{s:.1f}' for s in jobs_completed)} s)"
        ),
        "ratio": round(ratio, 3),
        "target": ">= 0.8 (items/s, job batch / batch_process), identical item states",
        "met": ratio >= 0.8 and identical and all(checks),
        "identical": identical,
        "checked": all(checks),
        "seconds": {"batch_process": ours, "job_batch": jobs},
        "per_round": [round(a / b, 3) for a, b in zip(ours, jobs, strict=True)],
    }


# Flow control (the flow-control issue) ---------------------------------------------------------

#: The flow-control overhead benchmark's sides: what each is under, and its job (bench.tasks).
#: Every job has the same body (INCR a counter); the limits are set so they never bite.
FLOW_SIDES = {
    "none": ("no control", "bench_flow_none"),
    "limit": ("limits_concurrency=Limit(to=1000)", "bench_flow_limited"),
    "rate": ("rate_limit=Rate(1_000_000, per=1)", "bench_flow_rated"),
    "unique": ("unique_for=60, a key of its own per job", "bench_flow_unique"),
    "expires": ("expires_in=3600", "bench_flow_expiring"),
}
#: The key-limited benchmark's workers and their concurrency.
FLOW_SERIAL_WORKERS = 2
FLOW_SERIAL_CONCURRENCY = 4


def flow_job(side: str) -> Any:
    import bench.tasks

    return getattr(bench.tasks, FLOW_SIDES[side][1])


def flow_leftovers(client: Any) -> dict[str, int]:
    """What flow control still holds: unique keys, concurrency slots and waiters, limits in
    use, rate deferrals, and jobs in the scheduled set (all 0 once every job has run)."""
    from app.delivery.records import Keys

    keys = Keys()

    def matching(pattern: str) -> list[bytes]:
        return list(client.scan_iter(match=pattern, count=1000))

    limit_keys = matching(keys.limit + "*")
    rate_keys = matching(keys.rate + "*")
    return {
        "unique_keys": len(matching(keys.unique + "*")),
        "slots": sum(int(client.zcard(k)) for k in limit_keys if not k.endswith(b":waiting")),
        "waiting": sum(int(client.llen(k)) for k in limit_keys if k.endswith(b":waiting")),
        "limits": int(client.hlen(keys.limits)),
        "rate_deferred": sum(int(client.zcard(k)) for k in rate_keys if k.endswith(b":deferred")),
        "scheduled": int(client.zcard(keys.schedule)),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (0 if it has ended)."""
    try:
        # The command name (2nd field) may hold spaces: the fields after it are plain.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a worker's pool)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return children


def flow_cpu(client: Any, pid: int, pool: list[int]) -> dict[str, float]:
    """CPU seconds so far of a worker's main process, of its pool, and of the Redis server."""
    info: Any = client.info("cpu")
    return {
        "main": cpu_seconds(pid),
        "pool": sum(cpu_seconds(child) for child in pool),
        "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
    }


def flow_batch(
    client: Any, process: subprocess.Popen[bytes], pool: list[int], side: str, count: int
) -> dict[str, Any]:
    """One batch of `count` jobs of a side through a running worker: published with
    `perform_all_later` (timed) while the queue is paused, then the queue resumed and the
    drain timed from the worker's first take to the last acknowledgement, with the CPU time
    its main process, its pool and Redis spent meanwhile; checks that each job ran once and
    that nothing is left held."""
    from app.delivery import records
    from app.jobs.base import perform_all_later
    from bench.keys import FLOW_COUNTER

    job = flow_job(side)
    what = f"flow overhead: {count} {job.name}"
    ran_before = int(client.get(FLOW_COUNTER) or 0)
    records.pause(client, "default")
    enqueue_s = timed(lambda: perform_all_later(job.s(i) for i in range(count)))
    if queued(client) != count:
        raise RuntimeError(f"{what}: {queued(client)} queued")
    records.resume(client, "default")
    wait_for(lambda: queued(client) < count, 30, what, process, poll=0.001)
    started = time.perf_counter()
    before = flow_cpu(client, process.pid, pool)
    wait_for(lambda: queued(client) == 0, 60 + count / 20, what, process, poll=0.002)
    seconds = time.perf_counter() - started
    after = flow_cpu(client, process.pid, pool)
    # A limit's slots are freed just after the acknowledgement: give them a moment.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not any(flow_leftovers(client).values()), 5, what)
    check: dict[str, Any] = {
        "side": side,
        "jobs": count,
        "ran": int(client.get(FLOW_COUNTER) or 0) - ran_before,
    }
    check.update(flow_leftovers(client))
    check["ok"] = check["ran"] == count and not any(
        v for k, v in check.items() if k not in ("side", "jobs", "ran", "ok")
    )
    return {
        "rate": count / seconds,
        "enqueue_rate": count / enqueue_s,
        "cpu_ms": {part: (after[part] - before[part]) * 1000 / count for part in after},
        "check": check,
    }


def flow_enqueue_loop(side: str, count: int) -> float:
    """Seconds per job of a `.delay()` loop of `count` jobs of a side; each must be queued
    (and, unique, hold its key)."""
    from app.delivery.records import Keys

    job = flow_job(side)
    client = redis_client()
    client.flushdb()
    seconds = timed(lambda: [job.delay(i) for i in range(count)]) / count
    published = int(client.llen("default"))
    claimed = sum(1 for _ in client.scan_iter(match=Keys().unique + "*", count=1000))
    if published != count or claimed != (count if side == "unique" else 0):
        raise RuntimeError(
            f"flow enqueue ({side}): {published} of {count} queued, {claimed} unique keys"
        )
    client.flushdb()
    return seconds


def bench_flow_overhead(count: int, cycles: int, enqueue_count: int) -> list[dict[str, Any]]:
    """Each control's cost against the same job with none: one worker (concurrency 2, default
    settings) draining `count` jobs of each side, in `cycles` batches a side; each cycle runs
    one batch of every side, the order rotated from cycle to cycle, so that a burst of other
    load on the machine weighs on neighbouring batches of every side alike. Then the
    producer's `.delay()` loop of `enqueue_count` jobs, with and without `unique_for`, in
    alternating batches."""
    concurrency = 2
    batch = count // cycles
    sides = list(FLOW_SIDES)
    controls = [side for side in sides if side != "none"]
    rates: dict[str, list[float]] = {side: [] for side in sides}
    enqueue_rates: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, dict[str, list[float]]] = {
        side: {"main": [], "pool": [], "redis": []} for side in sides
    }
    checks = []
    client = redis_client()
    client.flushdb()
    process = worker(concurrency)
    try:
        # Warm the worker (start-up, its pool, every job and script) with a batch of each.
        wait_for(lambda: len(child_pids(process.pid)) >= concurrency, 120, "flow", process)
        pool = child_pids(process.pid)
        for side in sides:
            flow_batch(client, process, pool, side, 50)
        for cycle in range(cycles):
            for side in sides[cycle % len(sides) :] + sides[: cycle % len(sides)]:
                run = flow_batch(client, process, pool, side, batch)
                rates[side].append(run["rate"])
                enqueue_rates[side].append(run["enqueue_rate"])
                for part, ms in run["cpu_ms"].items():
                    cpu[side][part].append(ms)
                checks.append(run["check"])
    finally:
        stop_worker(process)
    client.flushdb()
    # Per side: jobs over the time all its batches took (the batches are the same size).
    mean = {side: len(values) / sum(1 / r for r in values) for side, values in rates.items()}
    base = mean["none"]
    cycle_ratios = {
        side: [ours / theirs for ours, theirs in zip(rates[side], rates["none"], strict=True)]
        for side in controls
    }
    median_ratio = {side: statistics.median(values) for side, values in cycle_ratios.items()}
    cpu_mean = {
        side: {part: statistics.fmean(values) for part, values in parts.items()}
        for side, parts in cpu.items()
    }

    def per_job_ms(side: str) -> float:
        return (1 / mean[side] - 1 / base) * 1000

    def cpu_extra(side: str, part: str) -> float:
        return cpu_mean[side][part] - cpu_mean["none"][part]

    def spread(side: str) -> str:
        return f"{min(rates[side]):.0f}-{max(rates[side]):.0f}"

    drain_result = {
        "name": "flow control: per-job overhead (drain)",
        "size": count,
        "baseline": (
            f"{FLOW_SIDES['none'][0]} ({count:,} jobs in {cycles} batches, one worker, "
            f"concurrency {concurrency}): {base:.0f} jobs/s (batches {spread('none')}); CPU "
            f"a job: worker main process {cpu_mean['none']['main']:.3f} ms, Redis "
            f"{cpu_mean['none']['redis']:.3f} ms"
        ),
        "measured": "; ".join(
            f"{FLOW_SIDES[side][0]}: {mean[side]:.0f} jobs/s ({mean[side] / base:.3f}, median "
            f"of batch ratios {median_ratio[side]:.3f}; {per_job_ms(side):+.3f} ms/job; CPU "
            f"main {cpu_extra(side, 'main'):+.3f}, Redis {cpu_extra(side, 'redis'):+.3f} ms/job)"
            for side in controls
        ),
        "ratio": round(min(mean[side] for side in controls) / base, 3),
        "target": "every job ran once, nothing left held (rates reported; ratio: the slowest "
        "control's jobs/s / no control's)",
        "met": all(c["ok"] for c in checks),
        "jobs_per_s": {side: [round(r, 1) for r in values] for side, values in rates.items()},
        "mean_jobs_per_s": {side: round(rate, 1) for side, rate in mean.items()},
        "ratio_to_none": {side: round(mean[side] / base, 3) for side in controls},
        "median_batch_ratio": {side: round(r, 3) for side, r in median_ratio.items()},
        "overhead_ms_per_job": {side: round(per_job_ms(side), 3) for side in controls},
        "cpu_ms_per_job": {
            side: {part: round(v, 4) for part, v in parts.items()}
            for side, parts in cpu_mean.items()
        },
        "cpu_ms_per_job_batches": {
            side: {part: [round(v, 3) for v in values] for part, values in parts.items()}
            for side, parts in cpu.items()
        },
        "cpu_extra_ms_per_job": {
            side: {part: round(cpu_extra(side, part), 4) for part in ("main", "pool", "redis")}
            for side in controls
        },
        "checks": [c for c in checks if not c["ok"]] or "all passed",
        "note": (
            f"One service worker (default settings, prefork concurrency {concurrency}, queues "
            f"{WORKER_QUEUES}) runs throughout, warmed by 50 jobs of each side. Each batch: "
            f"{batch:,} jobs of the side's job (bench.tasks: INCR a Redis counter, the same "
            "body for every side) published with perform_all_later while `default` is "
            "paused, then resumed and timed from the worker's first take to the last "
            f"acknowledgement. {cycles} cycles of one batch a side, the order rotated each "
            "cycle. jobs/s: a side's jobs over its batches' time; ms/job: 1/rate - 1/rate "
            "without control; the median of batch ratios compares each batch with the "
            "no-control batch of its cycle. CPU a job: user + system time over the batches "
            "(/proc for the worker's main process and its pool, INFO cpu for Redis, whose "
            "figure includes the benchmark's own polling, alike on every side), less that "
            "of no control; pool CPU extra a job: "
            + ", ".join(f"{side} {cpu_extra(side, 'pool'):+.3f} ms" for side in controls)
            + ". A batch passes when the counter shows every job once and no unique key, "
            "concurrency slot, waiter, limit, rate deferral or scheduled job is left."
        ),
    }

    loop: dict[str, list[float]] = {"none": [], "unique": []}
    loop_batch = enqueue_count // cycles
    for side in ("none", "unique"):  # warm both paths (connections, script caches)
        flow_enqueue_loop(side, 100)
    for _ in range(cycles):
        for side in ("none", "unique"):
            loop[side].append(flow_enqueue_loop(side, loop_batch))
    loop_mean = {side: statistics.fmean(values) for side, values in loop.items()}
    loop_median = statistics.median(
        theirs / ours for ours, theirs in zip(loop["unique"], loop["none"], strict=True)
    )
    bulk_mean = {
        side: len(values) / sum(1 / r for r in values) for side, values in enqueue_rates.items()
    }
    enqueue_result = {
        "name": "flow control: enqueue with unique_for",
        "size": loop_batch * cycles,
        "baseline": (
            f".delay() loop, no control ({loop_batch * cycles:,} jobs in {cycles} batches): "
            f"{1 / loop_mean['none']:.0f} jobs/s; perform_all_later ({batch:,} a call): "
            f"{bulk_mean['none']:,.0f} jobs/s"
        ),
        "measured": (
            f".delay() loop, unique_for=60 (a key per job): {1 / loop_mean['unique']:.0f} "
            f"jobs/s ({(loop_mean['unique'] - loop_mean['none']) * 1e6:+.0f} us/job, median "
            f"of batch ratios {loop_median:.3f}); perform_all_later: "
            f"{bulk_mean['unique']:,.0f} jobs/s "
            f"({(1 / bulk_mean['unique'] - 1 / bulk_mean['none']) * 1e6:+.0f} us/job)"
        ),
        "ratio": round(loop_mean["none"] / loop_mean["unique"], 3),
        "target": "every job queued once, each unique one holding its key (rates reported; "
        "ratio: unique / no control jobs/s, .delay() loop)",
        "met": True,
        "delay_loop_us_per_job": {
            side: [round(s * 1e6, 1) for s in values] for side, values in loop.items()
        },
        "perform_all_later_jobs_per_s": {side: round(r) for side, r in bulk_mean.items()},
        "note": (
            f"The .delay() loops alternate batches of {loop_batch:,} without "
            f"control and with unique_for, {cycles} of each, from the benchmark process, each "
            "checked (every job queued, each unique job's key held). The perform_all_later "
            "figures are the drain batches' timed publishes (limit "
            f"{bulk_mean['limit']:,.0f}, rate {bulk_mean['rate']:,.0f}, expires "
            f"{bulk_mean['expires']:,.0f} jobs/s: those controls cost nothing at enqueue but "
            "a header for expires_in). Each unique job is claimed with an EVAL of its own, one "
            "round trip a job, in perform_all_later as in .delay()."
        ),
    }
    return [drain_result, enqueue_result]


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans running at one time (an end at the same instant as a start comes first)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def flow_workers_ready(client: Any, processes: list[subprocess.Popen[bytes]], count: int) -> None:
    """Wait until `count` workers beat in the heartbeat records (each polls its queues)."""
    from app.delivery.records import Keys

    workers = Keys().workers

    def ready() -> bool:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"flow serial: a worker exited (see {WORKER_LOG})")
        return int(client.zcard(workers)) >= count

    wait_for(ready, 120, "flow serial: workers' start-up")


def flow_serial_run(count: int) -> dict[str, Any]:
    """One run: `count` jobs of FLOW_SERIAL_SECONDS under `Limit(to=1)` (one key), published
    at once when FLOW_SERIAL_WORKERS fresh workers are up, until every job has run."""
    from app.jobs.base import perform_all_later
    from bench.keys import FLOW_SERIAL_SECONDS, FLOW_SPANS
    from bench.tasks import bench_flow_serial

    client = redis_client()
    client.flushdb()
    processes = [
        celery_worker(False, FLOW_SERIAL_CONCURRENCY, hostname=f"flow{i}@%h")
        for i in range(FLOW_SERIAL_WORKERS)
    ]
    try:
        flow_workers_ready(client, processes, FLOW_SERIAL_WORKERS)
        time.sleep(1)  # their pools up too
        started = time.time()
        perform_all_later(bench_flow_serial.s(i) for i in range(count))
        enqueued = time.time()

        def done() -> bool:
            return int(client.llen(FLOW_SPANS)) >= count and queued(client) == 0

        wait_for(done, 60 + count * FLOW_SERIAL_SECONDS * 20, "flow serial: the jobs")
        time.sleep(0.5)  # anything run twice would show up
        leftovers = flow_leftovers(client)
    finally:
        for process in processes:
            stop_worker(process)
    raw: Any = client.lrange(FLOW_SPANS, 0, -1)
    client.flushdb()
    spans = [json.loads(item) for item in raw]
    ids = [s[0] for s in spans]
    runs = sorted((s[4], s[5]) for s in spans)
    per_worker: dict[str, int] = {}
    for s in spans:
        per_worker[s[2]] = per_worker.get(s[2], 0) + 1
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(runs)]
    return {
        "seconds": max(end for _, end in runs) - started,
        "enqueue_ms": (enqueued - started) * 1000,
        "first_start_ms": (runs[0][0] - started) * 1000,
        "mean_job_ms": statistics.fmean(end - start for start, end in runs) * 1000,
        "gap_ms": {
            "p50": round(percentile(gaps, 50) * 1000, 2),
            "p90": round(percentile(gaps, 90) * 1000, 2),
            "p99": round(percentile(gaps, 99) * 1000, 2),
            "max": round(max(gaps) * 1000, 2),
        },
        "max_overlap": max_overlap(runs),
        "runs": len(spans),
        "once": len(ids) == len(set(ids)) == count
        and sorted(s[1] for s in spans) == list(range(count)),
        "per_worker": per_worker,
        "leftovers": leftovers,
    }


def bench_flow_serial(count: int, rounds: int = 2) -> dict[str, Any]:
    """`count` jobs of FLOW_SERIAL_SECONDS under `Limit(to=1)` (one key), drained by two
    workers at concurrency 4, `rounds` times: wall time against the ideal of running them
    back to back, with every job run once and never two at a time."""
    from bench.keys import FLOW_SERIAL_SECONDS

    results = [flow_serial_run(count) for _ in range(rounds)]
    ideal = count * FLOW_SERIAL_SECONDS
    seconds = [r["seconds"] for r in results]
    overlap = max(r["max_overlap"] for r in results)
    once = all(r["once"] for r in results)
    clean = not any(v for r in results for v in r["leftovers"].values())

    def each(text: Callable[[dict[str, Any]], str]) -> str:
        return "; ".join(text(r) for r in results)

    return {
        "name": "flow control: a key limited to 1",
        "size": count,
        "baseline": (
            f"ideal serial execution: {count} x {FLOW_SERIAL_SECONDS * 1000:.0f} ms = "
            f"{ideal:.2f} s ({1 / FLOW_SERIAL_SECONDS:.0f} jobs/s)"
        ),
        "measured": (
            f"Limit(to=1), {FLOW_SERIAL_WORKERS} workers x concurrency "
            f"{FLOW_SERIAL_CONCURRENCY}, from the enqueue to the last end: "
            + ", ".join(f"{s:.2f} s ({count / s:.1f} jobs/s)" for s in seconds)
            + "; gap from one job's end to the next one's start p50/p99/max "
            + each(lambda r: "{p50:.1f}/{p99:.1f}/{max:.1f} ms".format(**r["gap_ms"]))
            + f"; max overlap {overlap}, every job once: {'yes' if once else 'NO'}"
        ),
        "ratio": round(ideal / statistics.fmean(seconds), 3),
        "target": "max overlap 1, every job once, nothing left held (ratio: ideal / actual "
        "time, reported)",
        "met": overlap == 1 and once and clean,
        "seconds": [round(s, 3) for s in seconds],
        "ratios": [round(ideal / s, 3) for s in seconds],
        "results": results,
        "note": (
            f"{count} bench_flow_serial jobs (sleep {FLOW_SERIAL_SECONDS * 1000:.0f} ms, "
            "limits_concurrency=Limit(to=1, duration=120), one key) published with "
            f"perform_all_later once two fresh service workers (concurrency "
            f"{FLOW_SERIAL_CONCURRENCY} each, default settings) were beating; each job "
            f"records (task id, n, worker, pid, start, end). {rounds} runs. Actual time is from "
            "the start of the enqueue to the last job's end; the jobs took "
            + each(lambda r: f"{r['mean_job_ms']:.1f}")
            + " ms on average, the first started "
            + each(lambda r: f"{r['first_start_ms']:.0f}")
            + " ms after the enqueue began; jobs run per worker: "
            + each(lambda r: ", ".join(f"{w} {n}" for w, n in sorted(r["per_worker"].items())))
            + ". Passes when no two runs overlap, each job ran exactly once and no slot, "
            "waiter or scheduled job is left."
        ),
    }


#: RabbitMQ for the rabbitmq benchmark (the machine's, guest/guest) and its virtual host, made
#: for the run and deleted after it.
RABBIT_HOST = "127.0.0.1:5672"
RABBIT_VHOST = "jobs_t_bench"


def rabbit_drain_seconds(broker: str, count: int, concurrency: int) -> float:
    """Publish `count` bench.incr messages to `default` on `broker`, then time one service
    worker (default settings) from its first job to the last, by the Redis counter."""
    from kombu.connection import Connection

    from app.celery_app import JobsCelery
    from app.delivery import rabbitmq
    from app.settings import QUEUES
    from bench.keys import INCR_COUNTER

    client = redis_client()
    client.delete(INCR_COUNTER)
    producer = JobsCelery("bench", broker=broker, set_as_current=False)
    if rabbitmq.is_amqp(broker):
        # As the service's workers declare them: quorum queues on the topic exchange.
        queues = rabbitmq.task_queues(QUEUES, 2)
        producer.conf.update(task_queues=queues, task_default_queue="default")
        with Connection(broker) as conn:
            for queue in queues:
                queue.bind(conn.default_channel).declare()
    else:
        client.delete("default")
    with producer.producer_or_acquire() as p, p.batch(max_size=1000):
        for i in range(count):
            producer.send_task(
                "bench.incr", args=[i], queue="default", producer=p, ignore_result=True
            )
    env = {"BROKER_URL": broker, "BENCH_REDIS_URL": os.environ["BROKER_URL"]}
    return counted_drain_seconds(worker(concurrency, env), count, f"the service on {broker}")


def counted_drain_seconds(process: subprocess.Popen[bytes], count: int, what: str) -> float:
    """Seconds `process` (a worker) takes from its first bench.incr to its `count`th, by the
    counter in the benchmark's Redis; the worker is stopped after."""
    from bench.keys import INCR_COUNTER

    client = redis_client()
    try:
        wait_for(lambda: int(client.get(INCR_COUNTER) or 0) > 0, 120, f"{what}: start", process)
        start = time.perf_counter()
        wait_for(
            lambda: int(client.get(INCR_COUNTER) or 0) >= count,
            120 + count / 20,
            f"{what}: draining {count} bench.incr",
            process,
        )
        return time.perf_counter() - start
    finally:
        stop_worker(process)


def stock_rabbit_drain_seconds(
    broker: str, count: int, concurrency: int, quorum: bool = False
) -> float:
    """`rabbit_drain_seconds` for stock Celery (`bench.stock_app`: kombu's py-amqp transport,
    the service's delivery settings), on classic queues as stock Celery declares them or, with
    `quorum`, on quorum queues."""
    from celery import Celery

    from bench.keys import INCR_COUNTER
    from bench.stock_app import quorum_queues

    client = redis_client()
    client.delete(INCR_COUNTER)
    producer = Celery("bench-stock-producer", broker=broker, set_as_current=False)
    producer.conf.task_default_queue = "default"
    if quorum:
        producer.conf.task_queues = quorum_queues()
    with producer.producer_or_acquire() as p, p.batch(max_size=1000):
        for i in range(count):
            producer.send_task(
                "bench.incr", args=[i], queue="default", producer=p, ignore_result=True
            )
    env = {"BROKER_URL": broker, "BENCH_REDIS_URL": os.environ["BROKER_URL"]}
    if quorum:
        env["BENCH_QUORUM"] = "1"
    process = celery_worker(True, concurrency, env=env)
    return counted_drain_seconds(process, count, f"stock Celery on {broker}")


def bench_rabbitmq(count: int, rounds: int = 2, concurrency: int = 2) -> dict[str, Any]:
    """No-op drain rate of the service's worker on RabbitMQ (quorum queues, default settings)
    vs on Redis (the service's transport), alternated `rounds` times."""
    from bench.keys import INCR_COUNTER

    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        raise RuntimeError("rabbitmq: rabbitmqctl is not installed")
    client = redis_client()

    def ctl(*args: str) -> None:
        subprocess.run([rabbitmqctl, "-q", *args], check=True, capture_output=True, timeout=60)

    # Stock Celery's queues in virtual hosts of their own (a classic `default` cannot sit
    # beside a quorum one of the same name).
    vhosts = {"rabbitmq": RABBIT_VHOST, "stock": RABBIT_VHOST + "_s", "quorum": RABBIT_VHOST + "_q"}
    for vhost in vhosts.values():
        ctl("add_vhost", vhost)
    try:
        for vhost in vhosts.values():
            ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        sides = {"redis": os.environ["BROKER_URL"]}
        sides.update({s: f"amqp://guest:guest@{RABBIT_HOST}/{v}" for s, v in vhosts.items()})
        rates: dict[str, list[float]] = {side: [] for side in sides}
        counted: list[int] = []
        for _ in range(rounds):
            for side, broker in sides.items():
                if side in ("stock", "quorum"):
                    seconds = stock_rabbit_drain_seconds(
                        broker, count, concurrency, quorum=side == "quorum"
                    )
                else:
                    seconds = rabbit_drain_seconds(broker, count, concurrency)
                rates[side].append(count / seconds)
                counted.append(int(client.get(INCR_COUNTER) or 0))
    finally:
        for vhost in vhosts.values():
            ctl("delete_vhost", vhost)
    mean = {side: statistics.fmean(values) for side, values in rates.items()}

    def listed(side: str) -> str:
        return ", ".join(f"{r:.0f}" for r in rates[side])

    return {
        "name": "drain on RabbitMQ",
        "size": count,
        "baseline": f"stock Celery on RabbitMQ, the same delivery settings ({count:,} jobs, "
        f"concurrency {concurrency}): quorum queues {listed('quorum')} jobs/s, classic queues "
        f"{listed('stock')} jobs/s; service worker on Redis: {listed('redis')} jobs/s",
        "measured": f"service worker on RabbitMQ, quorum queues: {listed('rabbitmq')} jobs/s",
        "ratio": round(mean["rabbitmq"] / mean["quorum"], 3),
        "target": "every job ran once (rates reported; ratio: service / stock Celery, both on "
        "RabbitMQ quorum queues)",
        "met": all(c == count for c in counted),
        "jobs_per_s": {side: [round(r, 1) for r in values] for side, values in rates.items()},
        "counted": counted,
        "note": (
            "Alternated Redis, RabbitMQ, stock Celery on RabbitMQ (classic queues, then quorum "
            "queues), twice. Stock Celery (bench.stock_app: task_acks_late, prefetch 1, "
            "reject_on_worker_lost, task events off, its queues in virtual hosts of their own) "
            "runs the same task body. The same service worker (its whole celeryconfig: "
            "task_acks_late, prefetch 1, task events off (the default), prefork concurrency 2, "
            "queues urgent, default and low) and the same task body (bench.incr: INCR a counter "
            "in the benchmark's Redis, on both sides), timed from the first job to the last by "
            "that counter. On RabbitMQ the queues are quorum queues (Raft-replicated log, "
            "fsynced: a single node here) on the topic exchange `jobs`, in a virtual host made "
            f"for the run ({RABBIT_VHOST}, deleted after); the worker also consumes the dead-"
            "letter queue and has set up the native delayed-delivery queues."
        ),
    }


def sentinel_bench(failovers: int) -> dict[str, Any]:
    """The `sentinel` benchmark (bench/sentinel.py): jobs lost per failover."""
    from bench.sentinel import bench_sentinel

    return bench_sentinel(failovers)


def table_of(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table, with each result's note below it."""
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
    notes = [f"- {r['name']}: {r['note']}" for r in results if r.get("note")]
    return table + ("\n\nNotes:\n\n" + "\n".join(notes) if notes else "")


def markdown(summary: dict[str, Any]) -> str:
    """BENCHMARKS.md for a run's summary (what latest.json holds)."""
    return (
        "# Benchmarks\n\nProduced by `make bench` (`python -m bench.run`) against "
        f"{summary['servers']}, on {summary['machine']}, {summary['date']}, in "
        f"{summary['seconds']} s. Ratios compare against a baseline measured in the same run; "
        "`bench/results/latest.json` (not committed) holds every figure.\n\n"
        + table_of(summary["results"])
        + "\n"
    )


def main() -> int:
    from bench import io_pools, peers

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a quick look")
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        help="run only this benchmark (repeatable; 'batch' includes worker memory); "
        "BENCHMARKS.md is then left alone",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile this process (enqueueing, checks; not the workers) with pyinstrument, "
        "into bench/results/profile.txt",
    )
    parser.add_argument(
        "--markdown-from",
        metavar="JSON",
        help="only write BENCHMARKS.md again from a full run's saved latest.json",
    )
    args = parser.parse_args()
    if args.markdown_from:
        (ROOT / "BENCHMARKS.md").write_text(
            markdown(json.loads(Path(args.markdown_from).read_text()))
        )
        return 0
    servers = prepare_environment()
    quick = args.quick
    chosen = args.only or list(BENCHMARKS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    WORKER_LOG.write_bytes(b"")
    from app.devservers.smtp import SmtpServer

    # The batches' completion emails go to a real SMTP server (nothing left retrying).
    smtp = SmtpServer()
    smtp.start()
    os.environ["SMTP_HOST"], os.environ["SMTP_PORT"] = smtp.host, str(smtp.port)
    started = time.perf_counter()
    runs: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "overhead": lambda: [bench_overhead(2_000 if quick else 20_000)],
        "bulk": lambda: [bench_bulk(10_000 if quick else 100_000)],
        "paging": lambda: [
            bench_paging([10_000, 30_000] if quick else [100_000, 300_000, 1_000_000])
        ],
        "report": lambda: [bench_report(100_000 if quick else 1_000_000)],
        "inventory": lambda: [bench_hot_rows(2_000 if quick else 20_000)],
        "batch": lambda: bench_batch(
            10_000 if quick else 100_000,
            naive_size=NAIVE_QUICK if quick else NAIVE_FULL,
            memory_size=1_000 if quick else 10_000,
        ),
        "urgent": lambda: [
            bench_urgent_latency(10_000 if quick else 50_000, urgent=50 if quick else 150)
        ],
        "recovery": lambda: bench_recovery(
            kills=5 if quick else 10, stock_wait=30 if quick else 60, short_kills=1 if quick else 3
        ),
        "drain": lambda: [bench_drain(1_000 if quick else 6_000)],
        "scheduled_memory": lambda: [bench_scheduled_memory(10_000 if quick else 100_000)],
        "scheduled_lateness": lambda: [
            bench_scheduled_lateness(10_000 if quick else 100_000, single=20 if quick else 50)
        ],
        "scheduled_poller": lambda: [bench_scheduled_poller(10_000 if quick else 100_000)],
        "outbox_enqueue": lambda: [
            bench_outbox_enqueue(500 if quick else 2_000, bulk=2_000 if quick else 10_000)
        ],
        "outbox_relay": lambda: [bench_outbox_relay(10_000 if quick else 100_000)],
        "web": lambda: [bench_web(10_000 if quick else 100_000, workers=50)],
        "job_batches": lambda: [
            bench_batch_membership(1_000 if quick else 4_000),
            bench_batch_jobs(10_000 if quick else 100_000),
        ],
        "flow_overhead": lambda: bench_flow_overhead(
            1_000 if quick else 6_000,
            cycles=4 if quick else 12,
            enqueue_count=1_000 if quick else 4_000,
        ),
        "flow_serial": lambda: [bench_flow_serial(50 if quick else 200, rounds=1 if quick else 2)],
        "peers": lambda: [peers.bench_peers(1_000 if quick else 6_000, rounds=1 if quick else 2)],
        "io_pools": lambda: [io_pools.bench_io_pools(300 if quick else 1_500)],
        "rabbitmq": lambda: [bench_rabbitmq(1_000 if quick else 6_000)],
        "hosts": lambda: [bench_hosts(2 if quick else 4)],
        "sentinel": lambda: [sentinel_bench(1 if quick else 3)],
    }
    results: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    try:
        for name in BENCHMARKS:
            if name in chosen:
                began = time.perf_counter()
                results.extend(runs[name]())
                timings[name] = round(time.perf_counter() - began, 1)
    finally:
        smtp.stop()
        if profiler is not None:
            profiler.stop()
            (RESULTS / "profile.txt").write_text(profiler.output_text(unicode=False, color=False))
            print(f"profile: {RESULTS / 'profile.txt'}")
    elapsed = time.perf_counter() - started
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    summary = {
        "machine": machine,
        "servers": servers,
        "date": dt.date.today().isoformat(),
        "quick": quick,
        "seconds": round(elapsed),
        "benchmark_seconds": timings,
        "results": results,
    }
    (RESULTS / "latest.json").write_text(json.dumps(summary, indent=2, default=str))
    print(table_of(results))
    print(f"({elapsed:.0f} s on {machine}; per benchmark: {timings})")
    if not quick and args.only is None:
        (ROOT / "BENCHMARKS.md").write_text(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
