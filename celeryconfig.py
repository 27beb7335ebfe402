"""Every Celery setting of the service, in one place (`app.celery_app` loads this module).

Values that differ between machines come from the environment through `app.settings`; a bad
one stops the process with one line naming the variable.
"""

from __future__ import annotations

from kombu.entity import Queue

from app.settings import ConfigError, get_endpoints, get_settings

try:
    _settings = get_settings()
    _endpoints = get_endpoints()
except ConfigError as exc:
    raise SystemExit(f"configuration error: {exc}") from None

# Broker and results ------------------------------------------------------------------------

broker_url = _endpoints.broker_url
result_backend = _endpoints.result_backend
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

QUEUE_NAMES = ("urgent", "default", "low")
task_queues = [Queue(name, routing_key=name) for name in QUEUE_NAMES]
task_default_queue = "default"  # not Celery's `celery`
task_default_routing_key = "default"
task_create_missing_queues = False
# A job's `queue_as` (a name, or a choice from its arguments) decides, unless the caller does.
task_routes = ("app.jobs.base.route_by_queue_as",)

# Delivery ----------------------------------------------------------------------------------

# At-least-once: a message is acknowledged only after its job has finished, and a job whose
# worker process died is given back to the broker. Jobs are idempotent, so a redelivery is
# harmless. One message prefetched per process, so a busy worker hoards nothing.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# Redis redelivers an unacknowledged message after this many seconds; it must exceed the
# longest countdown/ETA any job or retry policy uses and the longest job's run time.
broker_transport_options = {"visibility_timeout": 6 * 3600}
result_backend_transport_options = {"visibility_timeout": 6 * 3600}

# Modules -----------------------------------------------------------------------------------

imports = ("app.jobs",)
worker_hijack_root_logger = True
worker_send_task_events = True

# Recurring jobs (Celery beat) --------------------------------------------------------------

beat_schedule: dict[str, dict[str, object]] = {}
