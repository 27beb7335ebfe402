"""The Celery application. Every setting lives in `app/celeryconfig.py`; nothing is set here."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from app import (
    logs,  # noqa: F401  (connects the log set-up signals)
    running,
    shutdown,
    threads,
)
from app.delivery import heartbeat, rabbitmq, throughput
from app.delivery.outbox import start_relay, stop_relay
from app.delivery.rabbitmq import DeadLetterConsumer
from app.delivery.scheduled import install_revoke_hook


class JobsCelery(Celery):  # type: ignore[misc]
    """Celery, with a delay under a second on RabbitMQ made the one second that native
    delayed delivery can take (Celery raises on it: app.delivery.rabbitmq)."""

    def send_task(
        self, name: str, *args: Any, countdown: Any = None, eta: Any = None, **options: Any
    ) -> Any:
        if (countdown is not None or eta is not None) and rabbitmq.is_amqp(self.conf.broker_url):
            countdown, eta = rabbitmq.whole_second_delay(countdown, eta, self.now())
        return super().send_task(name, *args, countdown=countdown, eta=eta, **options)


celery_app = JobsCelery("jobs_service", task_cls="app.delivery.requests:Task")
celery_app.config_from_object("app.celeryconfig")
# On RabbitMQ every worker drains the queues' dead letters into the dead-letter store.
celery_app.steps["consumer"].add(DeadLetterConsumer)
# A revoke deletes the job from the scheduled set too (Celery keeps revoked ids in memory only).
signals.worker_init.connect(install_revoke_hook, weak=False)
# Every worker relays what the outbox holds after its enqueuing process could not publish it.
signals.worker_ready.connect(start_relay, weak=False)
signals.worker_shutdown.connect(stop_relay, weak=False)
# A warm shutdown reaches the main process only: a flag in shared memory tells the pool's
# continuable jobs to stop at their next checkpoint (made before the pool forks).
signals.worker_init.connect(shutdown.share_with_pool, weak=False)
signals.worker_shutting_down.connect(shutdown.announce, weak=False)
# Jobs run in a worker count themselves per minute for the web view's dashboard (the main
# process for the solo and thread pools, each child for prefork).
signals.worker_init.connect(throughput.enable, weak=False)
signals.worker_init.connect(heartbeat.note_concurrency, weak=False)
signals.worker_process_init.connect(throughput.enable, weak=False)
signals.worker_process_shutdown.connect(throughput.flush, weak=False)
signals.worker_shutdown.connect(throughput.flush, weak=False)
# The threads pool: its database pool sized to its threads, and time limits by watchdog.
signals.worker_init.connect(threads.configure, weak=False)
# A job's log context and deadlines are noted by the app's task classes (app.running); the
# task_prerun / task_postrun signals only for a task of another class.
signals.worker_init.connect(running.connect_signals_if_needed, weak=False)
