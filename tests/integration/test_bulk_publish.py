"""perform_all_later's bulk path (app.delivery.bulk.BulkPublish) on a real Redis and worker.

A message the bulk path publishes must mean exactly what `Task.apply_async` publishes for the
same job: the same body, headers, properties, delivery info and Redis list. Each test here
publishes the same calls both ways to an isolated Redis database (DB 10 of the tests' Redis
server, which no worker consumes), reads the raw messages back and compares them field by
field, leaving out only what differs between any two messages (task id, delivery tag,
timestamps).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import signals
from celery._state import pop_current_task, push_current_task
from celery.worker import WorkController
from kombu.connection import Connection
from kombu.exceptions import BatchPublishError

from app import celery
from app.delivery import bulk, transport
from app.delivery.records import Keys
from app.jobs import base
from app.jobs.arguments import RowId
from app.jobs.base import Prepared, job, perform_all_later
from app.logs import CORRELATION_HEADER, current_correlation_id
from app.queues import ENQUEUED_AT_HEADER, FIRST_ENQUEUED_HEADER
from app.settings import redis_client_url
from tests.integration.conftest import Services, flush_broker, isolated_broker
from tests.integration.factories import wait_until
from tests.integration.test_broker_and_database_faults import OwnRedis

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

#: (job, args, kwargs, options) of a call.
Call = tuple[Any, tuple[Any, ...], dict[str, Any], dict[str, Any]]
#: Headers and properties that differ between any two messages, even of one call.
PER_MESSAGE = {
    "id",
    "root_id",
    "correlation_id",
    "delivery_tag",
    ENQUEUED_AT_HEADER,
    FIRST_ENQUEUED_HEADER,
    "eta",
}


def odd_to_urgent(n: int, note: str = "", email: str | None = None) -> str:
    return "urgent" if n % 2 else "default"


@job("jobs.test_bulk_compared", queue_as=odd_to_urgent)
def compared(n: RowId, note: str = "", email: str | None = None) -> None:
    """Published both ways, never run (no worker reads DB 10)."""


SEEN: list[dict[str, Any]] = []


@job("jobs.test_bulk_seen", queue_as=odd_to_urgent)
def seen(n: RowId, note: str = "", email: str | None = None) -> None:
    """Run by the in-process worker: records what its message carried."""
    request = seen.request
    SEEN.append(
        {
            "n": n,
            "note": note,
            "email": email,
            "queue": request.delivery_info.get("routing_key"),
            "correlation": base._header(request, CORRELATION_HEADER),
            "enqueued_at": base._header(request, ENQUEUED_AT_HEADER),
            "argsrepr": request.argsrepr,
            "ignore_result": request.ignore_result,
        }
    )


@pytest.fixture
def bulk_broker(services: Services) -> Iterator[str]:
    broker = isolated_broker(services.broker_url, 10)
    flush_broker(broker)
    yield broker
    flush_broker(broker)


@pytest.fixture
def producer(bulk_broker: str) -> Iterator[Any]:
    with celery.connection_for_write(bulk_broker) as connection:
        yield celery.amqp.Producer(connection, auto_declare=False)


def raw_messages(broker: str) -> dict[str, list[dict[str, Any]]]:
    """Every message in the database, decoded, by Redis list, in the order a worker takes them."""
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    found: dict[str, list[dict[str, Any]]] = {}
    for key in sorted(client.keys("*")):
        if client.type(key) != b"list":
            continue
        raw = client.lrange(key, 0, -1)
        messages = [json.loads(item) for item in reversed(raw)]  # LPUSH: oldest last
        for message in messages:
            assert message["properties"]["body_encoding"] == "base64"
            message["body"] = json.loads(base64.b64decode(message["body"]))
        found[key.decode() if isinstance(key, bytes) else key] = messages
    # Messages due later wait in the scheduled set, each with the list it goes to when due.
    waiting: Any = client.zrange(Keys().schedule, 0, -1)
    for member in waiting:
        raw_entry: Any = client.hget(Keys().schedule_messages, member)
        head, _, item = bytes(raw_entry).partition(b"\n")
        message = json.loads(item)
        message["body"] = json.loads(base64.b64decode(message["body"]))
        found.setdefault("scheduled for " + json.loads(head)["key"], []).append(message)
    client.flushdb()
    return found


def prepare(
    calls: list[Call],
) -> list[Prepared]:
    """What perform_all_later prepares for these (job, args, kwargs, options) calls."""
    return [
        j.prepare(args, kwargs, **{"ignore_result": True, **options})
        for j, args, kwargs, options in calls
    ]


@contextmanager
def bulk_path_only() -> Iterator[list[int]]:
    """Fail if any message goes through apply_async; count bulk batches published."""
    batches: list[int] = []
    publish = bulk.BulkPublish.publish

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the bulk path fell back to apply_async")

    def counting(self: bulk.BulkPublish, prepared: Any) -> None:
        batches.append(len(prepared))
        publish(self, prepared)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "_publish", refuse)
        patch.setattr(bulk.BulkPublish, "publish", counting)
        yield batches


def publish_both_ways(
    broker: str,
    producer: Any,
    calls: list[Call],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """The messages apply_async publishes for `calls`, then those the bulk path publishes."""
    for item in prepare(calls):
        base._deliver([item], producer)  # one message: Task.apply_async
    one_by_one = raw_messages(broker)
    with bulk_path_only() as batches:
        base._deliver(prepare(calls), producer)
    assert batches == [len(calls)]
    return one_by_one, raw_messages(broker)


def assert_same_meaning(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Equal field by field, but for the ids and timestamps of each message."""
    assert set(expected) == set(actual)
    assert expected["body"] == actual["body"]
    for field in ("content-type", "content-encoding"):
        assert expected[field] == actual[field], field
    assert actual["content-type"] == "application/json"
    for part in ("headers", "properties"):
        want, got = expected[part], actual[part]
        assert set(want) == set(got), part
        for name in set(want) - PER_MESSAGE:
            assert want[name] == got[name], (part, name)
    headers, properties = actual["headers"], actual["properties"]
    assert headers["id"] == properties["correlation_id"]
    if expected["headers"]["root_id"] == expected["headers"]["id"]:  # no parent: its own root
        assert headers["root_id"] == headers["id"]
    else:
        assert headers["root_id"] == expected["headers"]["root_id"]
    assert headers["id"] != expected["headers"]["id"]
    assert properties["delivery_tag"] != expected["properties"]["delivery_tag"]
    assert abs(headers[ENQUEUED_AT_HEADER] - expected["headers"][ENQUEUED_AT_HEADER]) < 60
    if expected["headers"]["eta"] is None:
        assert headers["eta"] is None
    else:
        eta = dt.datetime.fromisoformat(headers["eta"])
        assert abs(eta - dt.datetime.fromisoformat(expected["headers"]["eta"])) < dt.timedelta(
            seconds=60
        )


def assert_equivalent(
    one_by_one: dict[str, list[dict[str, Any]]], bulk: dict[str, list[dict[str, Any]]]
) -> None:
    assert one_by_one.keys() == bulk.keys()  # the same Redis lists (queue and priority)
    for key in one_by_one:
        assert len(one_by_one[key]) == len(bulk[key]), key
        for expected, actual in zip(one_by_one[key], bulk[key], strict=True):
            assert_same_meaning(expected, actual)


IN_ONE_HOUR = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)

VARIANTS: dict[str, list[Call]] = {
    "queue_as chooses per call": [(compared, (n,), {}, {}) for n in range(1, 7)],
    "keyword arguments, a redacted one": [
        (compared, (2,), {"note": "x" * 300, "email": "someone@example.com"}, {}),
        (compared, (), {"n": 3, "email": None}, {}),
    ],
    "caller's queue, priority, headers": [
        (compared, (1,), {}, {"queue": "low"}),
        (compared, (2,), {}, {"priority": 3}),
        (compared, (3,), {}, {"priority": 9, "queue": "default"}),
        (compared, (4,), {}, {"headers": {"tenant": "acme", CORRELATION_HEADER: "given"}}),
    ],
    "countdown and eta": [
        (compared, (1,), {}, {"countdown": 30}),
        (compared, (2,), {}, {"eta": IN_ONE_HOUR}),
    ],
    "results kept, limits, serializer, retries": [
        (compared, (1,), {}, {"ignore_result": False}),
        (compared, (2,), {}, {"time_limit": 50, "soft_time_limit": 40}),
        (compared, (3,), {}, {"serializer": "json", "retries": 2}),
    ],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_bulk_path_publishes_what_apply_async_publishes(
    bulk_broker: str, producer: Any, variant: str
) -> None:
    one_by_one, bulk = publish_both_ways(bulk_broker, producer, VARIANTS[variant])

    assert sum(map(len, bulk.values())) == len(VARIANTS[variant])
    assert_equivalent(one_by_one, bulk)


def test_later_messages_of_one_shape_come_from_its_template_and_mean_the_same(
    bulk_broker: str, producer: Any
) -> None:
    # One job, queue and options: the first message is built in full, the others from the
    # template it made (app.delivery.bulk.Template), whatever the arguments hold.
    notes = ["plain", '100% "quoted" \\ back', "ünïcødé ✓ \u2028", "%(id)s %(body)s", ""]
    calls: list[Call] = [
        (compared, (2 * i + 2,), {"note": note}, {}) for i, note in enumerate(notes)
    ]
    templated: list[bool] = []
    put = bulk.Template.put

    def counting(self: bulk.Template, *args: Any) -> bool:
        built = put(self, *args)
        templated.append(built)
        return built

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bulk.Template, "put", counting)
        one_by_one, from_template = publish_both_ways(bulk_broker, producer, calls)

    assert templated == [True] * (len(calls) - 1)
    assert_equivalent(one_by_one, from_template)
    (messages,) = from_template.values()
    assert [m["body"][1]["note"] for m in messages] == notes
    assert len({m["properties"]["delivery_tag"] for m in messages}) == len(calls)


def test_the_correlation_id_of_the_enqueuing_job_goes_along(
    bulk_broker: str, producer: Any
) -> None:
    token = current_correlation_id.set("corr-123")
    try:
        one_by_one, bulk = publish_both_ways(
            bulk_broker, producer, [(compared, (n,), {}, {}) for n in (1, 2)]
        )
    finally:
        current_correlation_id.reset(token)

    assert_equivalent(one_by_one, bulk)
    messages = [m for listed in bulk.values() for m in listed]
    assert {m["headers"][CORRELATION_HEADER] for m in messages} == {"corr-123"}


def test_jobs_enqueued_by_a_running_job_name_it_as_parent_and_root(
    bulk_broker: str, producer: Any
) -> None:
    parent = celery.tasks["jobs.test_bulk_seen"]
    # What a worker does around a job: current_worker_task is then this job.
    parent.push_request(id="parent-id", root_id="root-id", called_directly=False, delivery_info={})
    push_current_task(parent)
    try:
        one_by_one, bulk = publish_both_ways(
            bulk_broker, producer, [(compared, (n,), {}, {}) for n in (1, 2, 3)]
        )
        children = list(parent.request.children)
    finally:
        pop_current_task()
        parent.pop_request()

    assert_equivalent(one_by_one, bulk)
    messages = [m for listed in bulk.values() for m in listed]
    assert {(m["headers"]["root_id"], m["headers"]["parent_id"]) for m in messages} == {
        ("root-id", "parent-id")
    }
    # Each message was added to the parent's children, both ways (three each).
    assert len(children) == 6 and all(r.ignored for r in children)


def test_publish_signals_carry_the_same_values_both_ways(bulk_broker: str, producer: Any) -> None:
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []

    def on_before(sender: Any = None, **kwargs: Any) -> None:
        before.append({"sender": sender, **kwargs})

    def on_after(sender: Any = None, **kwargs: Any) -> None:
        after.append({"sender": sender, **kwargs})

    signals.before_task_publish.connect(on_before, weak=False)
    signals.after_task_publish.connect(on_after, weak=False)
    try:
        one_by_one, bulk = publish_both_ways(
            bulk_broker, producer, [(compared, (n,), {}, {"priority": n}) for n in (1, 2)]
        )
    finally:
        signals.before_task_publish.disconnect(on_before)
        signals.after_task_publish.disconnect(on_after)

    assert_equivalent(one_by_one, bulk)
    assert len(before) == len(after) == 4
    for sent in (before, after):
        for expected, actual in zip(sent[:2], sent[2:], strict=True):
            assert set(expected) == set(actual)
            for name in set(expected) - {"signal", "headers", "properties"}:
                if name == "declare":
                    assert [q.name for q in expected[name]] == [q.name for q in actual[name]]
                else:
                    assert expected[name] == actual[name], name
            for part in ("headers", "properties"):
                if part in expected:
                    assert {k: v for k, v in expected[part].items() if k not in PER_MESSAGE} == {
                        k: v for k, v in actual[part].items() if k not in PER_MESSAGE
                    }


def test_a_receiver_of_before_task_publish_can_still_change_the_message(
    bulk_broker: str, producer: Any
) -> None:
    def stamp(headers: dict[str, Any], properties: dict[str, Any], **_: Any) -> None:
        headers["stamped-by-receiver"] = "yes"
        properties["app_id"] = "receiver"

    signals.before_task_publish.connect(stamp, weak=False)
    try:
        one_by_one, bulk = publish_both_ways(
            bulk_broker, producer, [(compared, (n,), {}, {}) for n in (2, 4)]
        )
    finally:
        signals.before_task_publish.disconnect(stamp)

    assert_equivalent(one_by_one, bulk)
    [messages] = bulk.values()
    assert all(m["headers"]["stamped-by-receiver"] == "yes" for m in messages)
    assert all(m["properties"]["app_id"] == "receiver" for m in messages)


def test_more_messages_than_one_pipeline_keep_their_order_per_queue(
    bulk_broker: str, producer: Any
) -> None:
    calls: list[Call] = [
        (compared, (n,), {"note": str(n)}, {}) for n in range(1, 2 * bulk.BULK_BATCH_SIZE + 8)
    ]
    with bulk_path_only() as batches:
        base._deliver(prepare(calls), producer)

    assert batches == [len(calls)]
    found = raw_messages(bulk_broker)
    assert found.keys() == {"default", "urgent"}
    for key, messages in found.items():
        notes = [int(m["body"][1]["note"]) for m in messages]
        assert notes == sorted(notes)
        assert {n % 2 for n in notes} == {1 if key == "urgent" else 0}
    assert sum(map(len, found.values())) == len(calls)


def test_a_global_key_prefix_applies_to_the_bulk_path_as_to_apply_async(bulk_broker: str) -> None:
    # The bulk path packs its LPUSHes itself, past kombu's client that prefixes keys.
    with celery.connection_for_write(
        bulk_broker, transport_options={"global_keyprefix": "tenant-a:"}
    ) as connection:
        producer = celery.amqp.Producer(connection, auto_declare=False)
        one_by_one, bulk = publish_both_ways(
            bulk_broker, producer, [(compared, (n,), {}, {}) for n in (1, 2, 3, 4)]
        )

    assert set(bulk) == {"tenant-a:default", "tenant-a:urgent"}
    assert_equivalent(one_by_one, bulk)


def test_the_timestamps_a_template_writes_are_the_jobs_own(bulk_broker: str, producer: Any) -> None:
    # A template writes each timestamp header from its text, kept per value (a bulk call
    # stamps a thousand jobs alike): each message must still carry its own job's times.
    times = [1_700_000_000.25, 1_700_000_001.5, 0.0, 1e-7, 1_700_000_000.25, 123456789.123456789]
    prepared = [
        compared.prepare((2 * i + 2,), {}, stamped_at=at, ignore_result=True)
        for i, at in enumerate(times)
    ]
    with bulk_path_only():
        base._deliver(prepared, producer)

    (messages,) = raw_messages(bulk_broker).values()
    by_id = {m["headers"]["id"]: m["headers"] for m in messages}
    assert len(by_id) == len(times)
    for item in prepared:
        written = by_id[item.task_id]
        for stamp in (ENQUEUED_AT_HEADER, FIRST_ENQUEUED_HEADER):
            assert written[stamp] == item.options["headers"][stamp], stamp


def test_a_refused_lpush_raises_batch_publish_error_and_the_next_publish_goes_through(
    tmp_path: Path,
) -> None:
    # The bulk path packs its LPUSHes itself and sends them on a pooled connection: an error
    # reply must reach the caller as kombu's batch publish reports it, and leave no
    # connection with unread replies behind.
    server = OwnRedis(tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        calls: list[Call] = [(compared, (n,), {}, {}) for n in (1, 2, 3, 4)]  # two lists
        # The service's transport on this server's URL (the embedded default's names a socket
        # transport, which would connect to the embedded server instead).
        own = Connection(server.url, transport_options=celery.conf.broker_transport_options)
        own.transport_cls = transport.Transport
        with own as connection:
            assert type(connection.transport) is transport.Transport
            producer = celery.amqp.Producer(connection, auto_declare=False)
            with bulk_path_only():
                base._deliver(prepare(calls), producer)  # (declares the queue)
            client.config_set("maxmemory", int(client.info("memory")["used_memory"]) // 2)
            with bulk_path_only(), pytest.raises(BatchPublishError) as raised:
                base._deliver(prepare(calls), producer)
            assert "maxmemory" in str(raised.value.__cause__)
            client.config_set("maxmemory", 0)
            with bulk_path_only():
                base._deliver(prepare(calls), producer)
        for key, numbers in (("default", [4, 2]), ("urgent", [3, 1])):
            found = [json.loads(m)["headers"]["argsrepr"] for m in client.lrange(key, 0, -1)]
            assert found == [f"{{'n': {n}}}" for n in numbers] * 2, key
    finally:
        server.stop()


def test_perform_all_later_keeps_a_task_id_the_caller_set(worker: WorkController) -> None:
    SEEN.clear()
    enqueued = perform_all_later([seen.s(7).set(task_id="chosen-id"), seen.s(8)])

    assert enqueued.ids[0] == "chosen-id"
    assert enqueued.ids[1] != "chosen-id"
    assert enqueued[0].id == "chosen-id"
    wait_until(lambda: len(SEEN) >= 2, timeout=60)
    assert sorted(entry["n"] for entry in SEEN) == [7, 8]


@pytest.mark.parametrize(
    "options",
    [
        {"link": compared.si(1)},
        {"link_error": compared.si(1)},
        {"expires": 60},
        {"compression": "zlib"},
        {"exchange": "elsewhere", "routing_key": "default"},
        {"reply_to": "somewhere"},
    ],
    ids=lambda options: ",".join(options),
)
def test_what_the_bulk_path_does_not_build_goes_through_apply_async(
    producer: Any, options: dict[str, Any]
) -> None:
    prepared = prepare([(compared, (n,), {}, {}) for n in (1, 2)] + [(compared, (3,), {}, options)])
    for item in prepared:
        item.route()
    assert bulk.BulkPublish.start(producer, prepared) is None
    assert bulk.BulkPublish.start(producer, prepared[:2]) is not None


def test_a_transport_other_than_redis_takes_apply_async() -> None:
    prepared = prepare([(compared, (n,), {}, {}) for n in (1, 2)])
    for item in prepared:
        item.route()
    # (kombu's Connection: the app's own would bring celeryconfig's broker_transport along)
    with Connection("memory://") as connection:
        memory = celery.amqp.Producer(connection, auto_declare=False)
        assert bulk.BulkPublish.start(memory, prepared) is None


def test_a_worker_runs_the_jobs_the_bulk_path_enqueued(worker: WorkController) -> None:
    SEEN.clear()
    token = current_correlation_id.set("bulk-run")
    try:
        with bulk_path_only() as batches:
            results = perform_all_later(
                [seen.s(n, note=f"note {n}") for n in range(1, 41)]
                + [seen.s(41, email="someone@example.com").set(queue="low", priority=5)]
            )
    finally:
        current_correlation_id.reset(token)

    assert batches == [41]
    assert len({r.id for r in results}) == 41
    wait_until(lambda: len(SEEN) >= 41, timeout=60)
    by_n = {entry["n"]: entry for entry in SEEN}
    assert sorted(by_n) == list(range(1, 42))
    for n in range(1, 41):
        entry = by_n[n]
        assert entry["note"] == f"note {n}"
        assert entry["queue"] == ("urgent" if n % 2 else "default")
        assert entry["correlation"] == "bulk-run"
        assert entry["ignore_result"] is True
        assert isinstance(entry["enqueued_at"], float)
    last = by_n[41]
    assert last["queue"] == "low" and last["email"] == "someone@example.com"
    assert "someone@example.com" not in last["argsrepr"]


def test_perform_all_later_still_checks_every_call_before_publishing(
    worker: WorkController,
) -> None:
    from app.jobs.errors import DeserializationError

    SEEN.clear()
    with pytest.raises(DeserializationError):
        perform_all_later([seen.s(1), seen.s(0)])  # 0 is no row id
    with pytest.raises(DeserializationError):
        perform_all_later([seen.s(1), seen.s(2, "a", "b", "c")])  # too many arguments
    perform_all_later([seen.s(3), seen.s(4)])
    wait_until(lambda: len(SEEN) >= 2, timeout=60)
    assert sorted(entry["n"] for entry in SEEN) == [3, 4]


def test_its_results_are_async_results_that_fetch_results_and_pickle(
    worker: WorkController,
) -> None:
    from tests.integration import harness_jobs

    kept, ignored = perform_all_later(
        [
            harness_jobs.record_sku.s("result-kept").set(ignore_result=False),
            harness_jobs.record_sku.s("result-ignored"),
        ]
    )

    plain = harness_jobs.record_sku.AsyncResult(kept.id)
    assert isinstance(kept, celery.AsyncResult) and kept.id != ignored.id
    assert isinstance(kept.get(timeout=30), int)  # waits on its promise
    assert kept.state == "SUCCESS" and kept.ready()
    assert vars(plain).keys() == vars(kept).keys()
    wait_until(lambda: harness_jobs.record_sku.AsyncResult(ignored.id).state == "PENDING")
    assert ignored.state == "PENDING" and not ignored.ready()  # its result is not stored
    ignored.then(print)  # its promise takes callbacks
    assert ignored.on_ready is ignored.on_ready
    ignored.backend.remove_pending_result(ignored)
    copy, plain_copy = pickle.loads(pickle.dumps(kept)), pickle.loads(pickle.dumps(plain))
    assert (type(copy), copy.id) == (type(plain_copy), kept.id)
    assert vars(copy).keys() == vars(plain_copy).keys()
