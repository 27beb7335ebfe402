"""Every Celery setting of the service, in one place (`app.celery_app` loads this module).

Values that differ between machines come from the environment through `app.settings`; a bad
one stops the process with one line naming the variable.

Importing this module starts nothing. The settings that need the broker's address (broker,
result backend, beat's Redis) are resolved when Celery first reads its configuration (a
worker, beat or command starting), which is when the embedded Redis starts if BROKER_URL is
unset. It lives inside the `app` package: a top-level `celeryconfig` in site-packages would be
imported by Celery's default loader for any unrelated app without configuration.
"""

from __future__ import annotations

import os
from functools import cache

from celery.schedules import crontab
from kombu.entity import Queue

from app.delivery import rabbitmq, results, transport
from app.settings import (
    QUEUES,
    ConfigError,
    get_broker_url,
    get_settings,
    parse_sentinel_url,
    redis_client_url,
)

try:
    _settings = get_settings()
except ConfigError as exc:
    raise SystemExit(f"configuration error: {exc}") from None


@cache
def _broker_settings() -> dict[str, object]:
    """The settings that name the broker: read (and the embedded Redis started) on first use."""
    try:
        configured_broker = get_broker_url()
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    # Celery's command line reads BROKER_URL as its --broker option and passes it on in
    # CELERY_BROKER_URL, which wins over broker_url; kombu ignores broker_transport for a
    # redis+socket:// URL, so that variable gets the URL in the form broker_transport() gives.
    cli_broker = os.environ.get("CELERY_BROKER_URL")
    url, transport_name = transport.broker_transport(cli_broker or configured_broker)
    if cli_broker:
        os.environ["CELERY_BROKER_URL"] = url
    beat_redis = _settings.beat_redis_url or redis_client_url(configured_broker)
    sentinel: dict[str, object] = {}
    if configured_broker.startswith("sentinel://") and not _settings.beat_redis_url:
        # redbeat finds the master through the same sentinels (its redis-sentinel:// form).
        parsed = parse_sentinel_url(configured_broker)
        beat_redis = "redis-sentinel://"
        sentinel["redbeat_redis_options"] = {
            "sentinels": list(parsed.sentinels),
            "service_name": _settings.sentinel_master,
            "password": parsed.password,
            "db": parsed.db,
            "socket_timeout": 5.0,
        }
    return {
        "broker_url": url,
        "broker_transport": transport_name,
        # Celery's Redis backend storing a result in one round trip (app.delivery.results).
        "result_backend": results.backend_url(_settings.result_backend or configured_broker),
        # Without Redis (a RabbitMQ broker and no BEAT_REDIS_URL) beat keeps Celery's default.
        "beat_scheduler": (
            "redbeat.RedBeatScheduler"
            if beat_redis is not None
            else "celery.beat:PersistentScheduler"
        ),
        "redbeat_redis_url": beat_redis,
        "redbeat_redis_options": sentinel.get("redbeat_redis_options", {}),
    }


def __getattr__(name: str) -> object:
    # Module attributes resolved on first read (PEP 562): Celery reads them by name.
    if name in _BROKER_SETTINGS:
        return _broker_settings()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # Celery lists a configuration module's settings with dir().
    return sorted({*globals(), *_BROKER_SETTINGS})


_BROKER_SETTINGS = (
    "broker_url",
    "broker_transport",
    "result_backend",
    "beat_scheduler",
    "redbeat_redis_url",
    "redbeat_redis_options",
)

# Broker and results ------------------------------------------------------------------------

# redis://, rediss:// and redis+socket:// use app.delivery's transport, for this app alone:
# kombu's, except that a worker takes a message and records who holds it in one atomic step,
# a live worker's heartbeat keeps what it holds, a dead worker's messages go back to their
# queues within seconds, and no message can stop a worker (see app/delivery/transport.py).
# broker_url, broker_transport and result_backend come from _broker_settings() above.
result_expires = 24 * 3600
broker_connection_retry_on_startup = True

# JSON only: a pickle or YAML message is refused before it reaches any job.
accept_content = ["json"]
task_serializer = "json"
result_serializer = "json"
result_accept_content = ["json"]
event_serializer = "json"

# Time --------------------------------------------------------------------------------------

timezone = _settings.app_timezone
enable_utc = True

# Queues ------------------------------------------------------------------------------------

# On RabbitMQ the same queues are quorum queues on the topic exchange `jobs`, with a delivery
# limit (a message returned POISON_AFTER times, by the deaths of the processes holding it or
# by requeues, is dead-lettered, as a poison message is on Redis) and a dead-letter exchange
# each worker drains into the dead-letter store (app/delivery/rabbitmq.py). A queue's
# arguments are fixed when RabbitMQ first declares it: one declared otherwise before (a
# classic `default`) must be deleted first. The CLI's broker is BROKER_URL passed on.
_on_rabbitmq = rabbitmq.is_amqp(_settings.broker_url)
task_queues = (
    rabbitmq.task_queues(QUEUES, _settings.poison_after - 1)
    if _on_rabbitmq
    else [Queue(name, routing_key=name) for name in QUEUES]
)
if _on_rabbitmq:
    # A message Celery cannot decode is dead-lettered rather than acknowledged and lost.
    worker_consumer = "app.delivery.rabbitmq:TaskConsumer"
# Celery's own default queue, where `send_task` without a queue and celery-node put jobs: the
# workers take it as part of `default` (same weight, paused with it), so no job waits there.
CELERY_DEFAULT_QUEUE_ALIAS = {"default": ("celery",)}
task_default_queue = "default"  # not Celery's `celery`
task_default_routing_key = "default"
task_create_missing_queues = False
# A job's `queue_as` (a name, or a choice from its arguments) decides, unless the caller does.
task_routes = ("app.jobs.base.route_by_queue_as",)

# Sidekiq's weighted order (urgent 6, default 3, low 1 unless QUEUE_WEIGHTS says otherwise):
# before every fetch the Redis transport asks app.queue_order.WeightedCycle for the order to
# check the queues in, a weighted random draw, so urgent is usually first and low is never
# starved. QUEUE_ORDER=strict always checks urgent, then default, then low (low waits while
# urgent has work); QUEUE_ORDER=round_robin is kombu's default.
# RabbitMQ has no such option: a worker consumes its queues on one channel and the broker
# hands over whatever is ready on any of them, so the order follows arrival (about round
# robin between busy queues); weights there need a worker per queue (or message priorities).
queue_weights = dict(_settings.queue_weights)
_QUEUE_ORDER_STRATEGIES = {
    "weighted": "app.queue_order:WeightedCycle",
    "strict": "priority",
    "round_robin": "round_robin",
}

# Delivery ----------------------------------------------------------------------------------

# At-least-once: a message is acknowledged only after its job has finished, and a job whose
# worker process died is given back to the broker. Jobs are idempotent, so a redelivery is
# harmless.
task_acks_late = True
task_reject_on_worker_lost = True
# One message prefetched per worker process: a worker holds at most `concurrency` messages
# it is not yet running, so it cannot hoard low jobs while urgent ones arrive behind them,
# and every free process draws the weighted order afresh. Prefetched messages are not yet
# acknowledged, so they go back to the queue if the worker stops or dies. The threads pool
# holds two per thread instead, up to four of short jobs (THREADS_PREFETCH and
# THREADS_HOLD_AHEAD; see app.threads).
worker_prefetch_multiplier = 1
# A worker process beats every second in Redis. When a worker's heartbeat is
# WORKER_HEARTBEAT_TIMEOUT seconds old (5 by default), any live worker puts what it held back
# at the head of its queues, so a killed worker's jobs run again within seconds. A live
# worker's messages are never taken from it, however long its job runs or its ETA waits.
# A message whose deliveries killed the process holding it POISON_AFTER times (3) goes to the
# dead-letter store instead of being handed out again.
# The visibility timeout (6 hours unless BROKER_VISIBILITY_TIMEOUT says otherwise) now only
# restores records no worker of this transport owns (those of stock kombu clients sharing the
# Redis); kombu scans for them every 10 s.
broker_transport_options = {
    "visibility_timeout": _settings.visibility_timeout,
    "queue_order_strategy": _QUEUE_ORDER_STRATEGIES[_settings.queue_order],
    "heartbeat_interval": 1.0,
    "heartbeat_timeout": _settings.heartbeat_timeout,
    "poison_after": _settings.poison_after,
    "queue_aliases": CELERY_DEFAULT_QUEUE_ALIAS,
    # Celery's protocol is checked before the consumer sees a message: one it would raise on
    # goes to the dead-letter store instead of stopping the worker.
    "check_tasks": True,
    # What is taken out of circulation goes to this service's dead-letter store.
    "drain_rejected": True,
    "unacked_restore_interval": 10,
    "unacked_restore_throttle": 1,
    # BROKER_WAIT_REPLICAS: every publish waits for this many replicas (Redis's WAIT).
    "wait_replicas": _settings.wait_replicas,
}
result_backend_transport_options: dict[str, object] = {
    "visibility_timeout": _settings.visibility_timeout
}
if _settings.sentinel_master:
    # A sentinel:// BROKER_URL: the broker, and a sentinel:// result backend, find the master
    # BROKER_SENTINEL_MASTER names through the sentinels (app.delivery.transport).
    broker_transport_options["master_name"] = _settings.sentinel_master
    if _settings.broker_url is not None:
        broker_transport_options["sentinels"] = parse_sentinel_url(_settings.broker_url).sentinels
    result_backend_transport_options["master_name"] = _settings.sentinel_master
# A Redis restart must not turn finished jobs into failures: storing a result retries until
# the backend is back instead of failing the job after its work committed.
result_backend_always_retry = True
result_backend_max_retries = 60
# Every job has a soft time limit (SoftTimeLimitExceeded is raised inside it, so its
# transaction rolls back) and a hard one (its process is killed and replaced); both end in the
# dead-letter store. A job that needs longer says so in its declaration (`@job(...,
# soft_time_limit=..., time_limit=...)`).
task_soft_time_limit = 300
task_time_limit = 360
# A warm shutdown (SIGTERM) stops fetching, lets running jobs finish (each is bounded by its
# hard time limit) and returns what was prefetched but not started to the queue.

# Modules -----------------------------------------------------------------------------------

imports = ("app.jobs",)
worker_hijack_root_logger = True
# Task events (three Redis PUBLISHes a job, from the worker's main process) cost the worker
# about a third of its no-op throughput, and nothing in the service reads them: they are off
# unless TASK_EVENTS=true. Flower turns them on in the workers it watches (its own periodic
# `enable_events` broadcast), so `make serve`'s Flower still sees every job.
worker_send_task_events = _settings.task_events

# Recurring jobs (Celery beat) --------------------------------------------------------------

beat_schedule: dict[str, dict[str, object]] = {
    # Yesterday's report, five minutes after midnight in APP_TIMEZONE (`timezone` above).
    "daily-report": {"task": "jobs.daily_report", "schedule": crontab(minute=5, hour=0)},
    # Queue depths and the oldest job's age per queue, as StatsD gauges.
    "queue-depths": {
        "task": "jobs.record_queue_depths",
        "schedule": _settings.queue_depth_interval,
    },
}
# One scheduler fires each tick even if two beats run: RedBeat keeps the schedule and the
# last-run times in Redis and only the holder of a Redis lock sends; a second beat waits for
# the lock. A beat that dies loses the lock within redbeat_lock_timeout; a restarted beat
# resumes from the stored last-run times, so it repeats no tick (one that fell due while no
# beat ran is sent once, late). Without Redis (a RabbitMQ broker and no BEAT_REDIS_URL) beat
# falls back to Celery's file scheduler and this guarantee does not hold.
#
# Takeover: the holder renews its lock (to redbeat_lock_timeout, 30 s) every time it wakes,
# at least every beat_max_loop_interval (5 s), and a waiting beat retries the lock at that
# same interval (RedBeat acquires with `sleep=max_interval`). A holder killed outright cannot
# release its lock, so it expires within 30 s and a waiting beat takes over within 35 s
# (test_beat.py). The timeout must stay well above the interval, or a live holder could lose
# the lock between two renewals. The setting is beat_max_loop_interval: Celery ignores an
# unknown name without a word (it was beat_max_interval, which left Celery's default of 300 s,
# so a waiting beat took up to five minutes to notice the dead holder).
# (beat_scheduler and redbeat_redis_url come from _broker_settings() above.)
redbeat_key_prefix = "jobs_service:redbeat:"
redbeat_lock_timeout = 30
beat_max_loop_interval = 5
