"""The Celery settings the service's guarantees rest on."""

from __future__ import annotations

from app import celery


def test_json_is_the_only_content_type_accepted() -> None:
    assert celery.conf.accept_content == ["json"]
    assert celery.conf.result_accept_content == ["json"]
    assert celery.conf.task_serializer == "json"


def test_the_default_queue_is_default_and_the_three_queues_exist() -> None:
    assert celery.conf.task_default_queue == "default"
    assert sorted(q.name for q in celery.conf.task_queues) == ["default", "low", "urgent"]


def test_messages_are_acknowledged_late_and_returned_when_a_worker_dies() -> None:
    assert celery.conf.task_acks_late is True
    assert celery.conf.task_reject_on_worker_lost is True
    assert celery.conf.worker_prefetch_multiplier == 1


def test_on_rabbitmq_the_queues_are_quorum_queues_with_a_delivery_limit_and_dead_letters() -> None:
    # (celeryconfig builds these when BROKER_URL is amqp://: test_rabbitmq.py reads them back
    # from RabbitMQ as the workers declared them.)
    from app.delivery import rabbitmq
    from app.settings import QUEUES

    queues = rabbitmq.task_queues(QUEUES, 3)
    assert [(q.name, q.exchange.name, q.exchange.type) for q in queues] == [
        ("urgent", "jobs", "topic"),
        ("default", "jobs", "topic"),
        ("low", "jobs", "topic"),
    ]
    for queue in queues:
        arguments = getattr(queue, "queue_arguments", None) or {}
        assert arguments["x-queue-type"] == "quorum"
        assert arguments["x-delivery-limit"] == 3
        assert arguments["x-dead-letter-exchange"] == "jobs.dead_letters"
    assert rabbitmq.is_amqp("amqp://guest:guest@127.0.0.1:5672//")
    assert not rabbitmq.is_amqp("redis://127.0.0.1:6379/0")
    assert not rabbitmq.is_amqp(None)


def test_on_redis_the_queues_are_plain_and_celerys_consumer_is_kept() -> None:
    assert all(q.queue_arguments is None for q in celery.conf.task_queues)
    assert celery.conf.worker_consumer == "celery.worker.consumer:Consumer"


def test_a_delay_under_a_second_becomes_one_second_for_native_delayed_delivery() -> None:
    import datetime as dt

    from app.delivery.rabbitmq import whole_second_delay

    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert whole_second_delay(0.3, None, now) == (1, None)
    assert whole_second_delay(None, now + dt.timedelta(seconds=0.5), now) == (1, None)
    assert whole_second_delay(2.5, None, now) == (2.5, None)  # the worker holds the rest
    assert whole_second_delay(None, now - dt.timedelta(seconds=5), now)[1] is not None  # past
    assert whole_second_delay(None, None, now) == (None, None)


def test_a_job_that_waited_in_rabbitmqs_delay_queues_knows_its_queue() -> None:
    from app.delivery.rabbitmq import undelayed_routing_key

    delayed = ".".join("0" * 26 + "11") + ".urgent"  # 3 s, as Celery routes it
    assert undelayed_routing_key(delayed) == "urgent"
    assert undelayed_routing_key("default") == "default"
    assert undelayed_routing_key("1.0.low") == "1.0.low"  # not a delay prefix: 28 digits
