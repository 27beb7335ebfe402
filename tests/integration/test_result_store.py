"""A job's state stored in one script (app.delivery.results), meaning what Celery's store means:
the waiting caller gets it, it expires, and a success is never replaced."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import states
from celery.worker import WorkController

from app import celery
from app.delivery.results import RedisResults, SentinelResults
from tests.integration import harness_jobs


@pytest.fixture
def backend() -> Iterator[RedisResults]:
    found = celery.backend
    if not isinstance(found, RedisResults | SentinelResults):
        pytest.skip(f"the result backend is {type(found).__name__} (no Redis results here)")
    yield found


def _meta(backend: RedisResults, task_id: str) -> dict[str, object]:
    raw = backend.client.get(backend.get_key_for_task(task_id))
    assert raw is not None, f"no meta stored for {task_id}"
    loaded = json.loads(raw)
    assert isinstance(loaded, dict)
    return loaded


def test_a_waiting_caller_gets_the_result_and_the_key_expires(
    worker: WorkController, backend: RedisResults
) -> None:
    result = harness_jobs.record_sku.delay(f"sku-{uuid.uuid4().hex[:8]}")
    product_id = result.get(timeout=30)  # the Redis backend waits on the key's channel
    assert isinstance(product_id, int) and product_id > 0
    meta = _meta(backend, result.id)
    assert meta["status"] == states.SUCCESS and meta["result"] == product_id
    assert meta["task_id"] == result.id and meta["date_done"]
    ttl = backend.client.ttl(backend.get_key_for_task(result.id))
    assert 0 < ttl <= celery.conf.result_expires


def test_the_state_is_published_on_the_keys_channel(backend: RedisResults) -> None:
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    pubsub = backend.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key)
    try:
        assert pubsub.get_message(timeout=5) is None  # the subscription confirmed
        backend.store_result(task_id, {"answer": 42}, states.SUCCESS)
        message = pubsub.get_message(timeout=5)
    finally:
        pubsub.close()
    assert message is not None, "no message on the key's channel"
    assert json.loads(message["data"])["result"] == {"answer": 42}
    assert backend.get_task_meta(task_id)["result"] == {"answer": 42}


def test_a_success_is_never_replaced_by_a_later_state(backend: RedisResults) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, "first", states.STARTED)
    backend.store_result(task_id, "done", states.SUCCESS)
    # A redelivered copy of the job that succeeded fails, or retries, afterwards.
    backend.store_result(task_id, ValueError("late copy"), states.FAILURE)
    backend.store_result(task_id, None, states.RETRY)
    meta = _meta(backend, task_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == "done"


def test_concurrent_copies_leave_the_success_whatever_the_order(backend: RedisResults) -> None:
    """Copies of one job storing at once: the check and the write are one step, so a failure
    racing a success never lands after it."""
    for _ in range(20):
        task_id = str(uuid.uuid4())
        barrier = threading.Barrier(4)

        def store(
            state: str,
            value: object,
            task_id: str = task_id,
            barrier: threading.Barrier = barrier,
        ) -> None:
            barrier.wait()
            for _ in range(10):
                backend.store_result(task_id, value, state)

        threads = [
            threading.Thread(target=store, args=(states.SUCCESS, "ok")),
            threading.Thread(target=store, args=(states.FAILURE, ValueError("copy"))),
            threading.Thread(target=store, args=(states.RETRY, None)),
            threading.Thread(target=store, args=(states.FAILURE, KeyError("copy"))),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        meta = _meta(backend, task_id)
        assert meta["status"] == states.SUCCESS and meta["result"] == "ok"


def test_a_failure_is_stored_with_its_traceback_and_read_back(backend: RedisResults) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, ValueError("bad input"), states.FAILURE, traceback="Traceback…")
    meta = backend.get_task_meta(task_id)
    assert meta["status"] == states.FAILURE and meta["traceback"] == "Traceback…"
    assert isinstance(meta["result"], ValueError) and str(meta["result"]) == "bad input"
    assert backend.client.ttl(backend.get_key_for_task(task_id)) > 0


@pytest.mark.parametrize(
    "foreign",
    [b"\xff\xfe not json", b"[1, 2, 3]", b'"SUCCESS"', b'{"status": ["SUCCESS"]}', b""],
    ids=["bytes", "array", "string", "odd-status", "empty"],
)
def test_a_foreign_value_under_the_key_is_replaced(backend: RedisResults, foreign: bytes) -> None:
    """Another producer's bytes under the key (a buggy client, a different serializer) are no
    recorded success: the state is stored over them rather than failing the job."""
    task_id = str(uuid.uuid4())
    client: redis.Redis = backend.client
    client.set(backend.get_key_for_task(task_id), foreign)
    backend.store_result(task_id, 7, states.SUCCESS)
    meta = _meta(backend, task_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == 7
