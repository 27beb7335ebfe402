"""The flow-control scripts on a real Redis, from states built by hand: what the heartbeat
recovery's sweep (`flow.reap`) and a settled delivery (`flow.RELEASE`) do to slots whose holder
died or ran past its duration, and to the jobs waiting for them."""

from __future__ import annotations

import json

import pytest
import redis

from app.delivery import flow, scheduled
from app.delivery.records import Keys
from app.settings import redis_client_url
from tests.integration.conftest import Services, flush_broker, isolated_broker

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

KEYS = Keys()
SLOTS = KEYS.limit + "jobs.test_serial"


@pytest.fixture
def client(services: Services) -> redis.Redis:
    broker = isolated_broker(services.broker_url, 12)
    flush_broker(broker)
    return redis.Redis.from_url(redis_client_url(broker) or "")


def wait_for_slot(client: redis.Redis, task_id: str, due: float) -> None:
    """`task_id` waits in the scheduled set, and on the limit's waiting list."""
    header = {"queue": "default", "key": "default", "task": "jobs.test_serial", "id": task_id}
    client.hset(
        KEYS.schedule_messages, task_id, json.dumps(header) + "\n" + f'{{"id":"{task_id}"}}'
    )
    client.zadd(KEYS.schedule, {task_id: due})
    client.rpush(SLOTS + ":waiting", json.dumps([task_id, task_id]))
    client.hset(KEYS.limits, SLOTS, json.dumps([1, 60]))


def test_a_slot_of_a_worker_without_heartbeat_is_taken_back_and_handed_to_the_next_waiter(
    client: redis.Redis,
) -> None:
    now = scheduled.now_in_redis(client)
    client.zadd(SLOTS, {"gone-worker|t1": now + 60})  # no heartbeat at all
    wait_for_slot(client, "t2", now + 60)
    wait_for_slot(client, "t3", now + 60)
    assert flow.reap(client, KEYS, timeout=5) == 1
    assert client.zrange(SLOTS, 0, -1) == [b"|t2"]  # reserved for t2
    assert [json.loads(m)["id"] for m in client.lrange("default", 0, -1)] == ["t2"]
    assert client.zrange(KEYS.schedule, 0, -1) == [b"t3"]
    assert client.llen(SLOTS + ":waiting") == 1


def test_a_slot_past_its_duration_is_taken_back_though_its_worker_lives(
    client: redis.Redis,
) -> None:
    now = scheduled.now_in_redis(client)
    client.zadd(KEYS.workers, {"live-worker": now})
    client.zadd(SLOTS, {"live-worker|t1": now - 1})
    wait_for_slot(client, "t2", now + 60)
    assert flow.reap(client, KEYS, timeout=5) == 1
    assert client.llen("default") == 1
    client.zadd(SLOTS, {"live-worker|t9": now + 60})  # within its duration: kept
    assert flow.reap(client, KEYS, timeout=5) == 0


def test_a_waiter_whose_scheduled_entry_is_gone_is_skipped_and_an_idle_limit_forgotten(
    client: redis.Redis,
) -> None:
    now = scheduled.now_in_redis(client)
    client.zadd(KEYS.workers, {"w": now})
    client.zadd(SLOTS, {"w|t1": now + 60})
    wait_for_slot(client, "deleted", now + 60)
    scheduled.delete(client, "deleted")  # an operator deleted it while it waited
    moved = client.eval(
        flow.RELEASE, 3, KEYS.schedule, KEYS.schedule_messages, KEYS.limits, "w|t1", SLOTS
    )
    assert moved == 1  # (popped from the waiting list; nothing pushed)
    assert client.llen("default") == 0
    assert not client.exists(SLOTS, SLOTS + ":waiting")
    assert not client.hexists(KEYS.limits, SLOTS)


def test_a_job_handed_a_slot_goes_to_the_head_of_its_queue_not_behind_the_backlog(
    client: redis.Redis,
) -> None:
    now = scheduled.now_in_redis(client)
    client.lpush("default", *[f'{{"id":"backlog-{i}"}}' for i in range(3)])
    client.zadd(KEYS.workers, {"w": now})
    client.zadd(SLOTS, {"w|t1": now + 60})
    wait_for_slot(client, "t2", now + 60)
    client.eval(flow.RELEASE, 3, KEYS.schedule, KEYS.schedule_messages, KEYS.limits, "w|t1", SLOTS)
    head = client.lindex("default", -1)  # the next one a worker takes
    assert head is not None and json.loads(head)["id"] == "t2"
