"""The Celery settings the service's guarantees rest on."""

from __future__ import annotations

from app import celery, celeryconfig
from app.jobs.policies import MAX_RETRY_WAIT


def test_json_is_the_only_content_type_accepted() -> None:
    assert celery.conf.accept_content == ["json"]
    assert celery.conf.result_accept_content == ["json"]
    assert celery.conf.task_serializer == "json"


def test_the_default_queue_is_default_and_the_three_queues_exist() -> None:
    assert celery.conf.task_default_queue == "default"
    assert sorted(q.name for q in celery.conf.task_queues) == ["default", "low", "urgent"]


def test_no_retry_wait_can_outlast_the_visibility_timeout() -> None:
    # Otherwise Redis hands a scheduled retry to a second worker before its time comes.
    visibility = float(str(celeryconfig.broker_transport_options["visibility_timeout"]))
    assert visibility > MAX_RETRY_WAIT


def test_messages_are_acknowledged_late_and_returned_when_a_worker_dies() -> None:
    assert celery.conf.task_acks_late is True
    assert celery.conf.task_reject_on_worker_lost is True
    assert celery.conf.worker_prefetch_multiplier == 1
