"""Many jobs published to Redis in few round trips: Celery's messages, kombu's commands.

`perform_all_later` (app.jobs.base) hands its checked and routed jobs to `BulkPublish.start`,
which returns None, and the caller takes Celery's own per-message path, for anything it does not
build exactly as `Task.apply_async` would. `tests/integration/test_bulk_publish.py` compares the
messages of both paths field by field: run it after any Celery or kombu upgrade.
"""

from __future__ import annotations

import base64
import json.encoder
import re
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from celery import Task, signals
from celery.app import amqp as celery_amqp
from celery.utils.nodenames import anon_nodename
from kombu import serialization
from kombu.entity import Queue
from kombu.exceptions import BatchPublishError, EncodeError
from kombu.transport.redis import Channel as RedisChannel
from kombu.transport.redis import Transport as RedisTransport
from kombu.utils import json as kombu_json
from kombu.utils.functional import maybe_evaluate

from app.celery_app import celery_app
from app.delivery import resp
from app.delivery.flow import EXPIRES_HEADER
from app.ids import random_uuids
from app.queues import ENQUEUED_AT_HEADER, FIRST_ENQUEUED_HEADER

if TYPE_CHECKING:
    from app.jobs.base import Job, Prepared

#: Messages buffered before one round trip to the broker.
BULK_BATCH_SIZE = 1000

#: The options (of `Prepared.options`, after `route`) the bulk path builds exactly as
#: `Task.apply_async` would. A batch with any other option goes through `apply_async`.
_BULK_OPTIONS = frozenset(
    {
        "headers",
        "argsrepr",
        "kwargsrepr",
        "ignore_result",
        "queue",
        "priority",
        "countdown",
        "eta",
        "serializer",
        "time_limit",
        "soft_time_limit",
        "retries",
        "link",  # None only
        "link_error",  # None only
        "shadow",  # None only
    }
)
#: A job's own execution options (`Task._get_exec_options`) the bulk path handles.
_BULK_EXEC_OPTIONS = frozenset(
    {
        "queue",
        "routing_key",  # None only
        "exchange",  # None only
        "priority",
        "expires",  # None only
        "serializer",
        "delivery_mode",
        "compression",  # None only
        "time_limit",
        "soft_time_limit",
        "immediate",
        "mandatory",
    }
)

#: (name, body, headers, routing key) of a message, for after_task_publish.
_Published = tuple[str, Any, dict[str, Any], str]

#: The options a job's message may have to be built from its shape's template.
_TEMPLATE_OPTIONS = frozenset(
    {"headers", "argsrepr", "kwargsrepr", "ignore_result", "queue", "priority"}
)
#: The job layer's headers that differ between two calls of one shape (each a timestamp).
_STAMPS = (FIRST_ENQUEUED_HEADER, EXPIRES_HEADER, ENQUEUED_AT_HEADER)


class Commands:
    """The Redis commands kombu's Redis channel adds for a message: its `_put` takes any
    object with `add(name, *args)` as the publish batch to add them to."""

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


class BulkPublish:
    """Many jobs to a Redis broker: Celery's messages, kombu's Redis commands, few round trips.

    `Task.apply_async` -> `Celery.send_task` -> `AMQP.send_task_message` -> `Producer.publish`
    costs 150 to 250 µs a message even inside `Producer.batch`, mostly in work that is the
    same for every message of a batch (configuration lookups, routing, queue declaration, retry
    policies, serializer lookup, result objects). This path does that work once per batch and,
    per message, what those functions do per message, in their order and with their building
    blocks: `app.amqp.create_task_message` (protocol 2) makes the headers, properties and
    body; the serializer kombu's registry names for them encodes the body; the channel's
    `prepare_message` makes the message and its `basic_publish` sets its delivery info and
    tag and has `_put` choose the list for its queue and priority and encode it; the publish
    signals are sent when they have receivers. The commands `_put` adds go out in pipelines of
    BULK_BATCH_SIZE messages, without automatic retry, as kombu's publish batch sends them,
    the LPUSHes to one list as one LPUSH (which leaves the list as one LPUSH each would).

    `start` returns None, and the caller takes the per-message path, for anything this does
    not build exactly: another transport, a channel that cannot batch, an option outside
    `_BULK_OPTIONS`, link callbacks, compression, expiry, a router besides
    `route_by_queue_as`, a queue on a non-direct exchange, eager mode, sent events.
    """

    def __init__(self, producer: Any, channel: Any, queues: dict[str, Queue]) -> None:
        app = celery_app
        conf = app.conf
        self.producer = producer
        self.channel = channel
        self.queues = queues
        self.parent = app.current_worker_task  # a job enqueueing jobs, in a worker
        self.create_task_message = app.amqp.create_task_message
        self.reply_to = app.thread_oid
        self.origin = anon_nodename()  # what create_task_message uses when given none
        self.default_delivery_mode = conf.task_default_delivery_mode
        self.default_serializer = conf.task_serializer
        self.retry_policy = conf.task_publish_retry_policy
        self.inherit_priority = conf.task_inherit_parent_priority
        self.backend = app.backend
        self.declared: set[str] = set()
        self.delivery_modes: dict[tuple[str, Any], Any] = {}
        self.encoders: dict[str, Callable[[Any], tuple[Any, Any, Any]]] = {}
        #: A shape's template (None: its messages are built in full, see `_shape`).
        self.templates: dict[Hashable, Template | None] = {}

    @classmethod
    def start(
        cls, producer: Any, prepared: Sequence[Prepared], router: Any = None
    ) -> BulkPublish | None:
        """A bulk publisher for `prepared` on `producer`, or None if it cannot build them.

        `router` is the job layer's router (the only one the bulk path routes as): the default
        is `app.jobs.base.route_by_queue_as`.
        """
        if router is None:
            from app.jobs.base import route_by_queue_as as router
        app = celery_app
        conf = app.conf
        amqp = app.amqp
        if (
            conf.task_always_eager
            or conf.task_protocol != 2
            or conf.task_send_sent_event
            or conf.task_compression
            or producer.compression
            or type(amqp) is not celery_amqp.AMQP
            or signals.task_sent.receivers
            or _publishing_callbacks()
            or any(maybe_evaluate(r) is not router for r in amqp.router.routes)
        ):
            return None
        connection = producer.connection
        if connection is None or not isinstance(connection.transport, RedisTransport):
            return None
        if not producer.supports_batch_publish:  # kombu's check: no pipeline is retried
            return None
        channel = producer.channel
        if not isinstance(channel, RedisChannel) or not channel.supports_batch_publish:
            return None
        queues: dict[str, Queue] = {}
        jobs: set[int] = set()
        for item in prepared:
            options = item.options
            queue = options.get("queue")
            if (
                not options.keys() <= _BULK_OPTIONS
                or options.get("link")
                or options.get("link_error")
                or options.get("shadow")
                or not isinstance(queue, str)
            ):
                return None
            if queue not in queues:
                found = amqp.router.expand_destination(queue)["queue"]  # or QueueNotFound
                if found.exchange.type != "direct" or found.name != queue:
                    return None
                queues[queue] = found
            if id(item.job) not in jobs:
                if not bulk_job(item.job):
                    return None
                jobs.add(id(item.job))
        return cls(producer, channel, queues)

    def publish(self, prepared: Sequence[Prepared]) -> None:
        """Build and push every message, BULK_BATCH_SIZE messages a round trip."""
        for first in range(0, len(prepared), BULK_BATCH_SIZE):
            batch = prepared[first : first + BULK_BATCH_SIZE]
            commands = Commands()
            published: list[_Published] = []
            for item, tag in zip(batch, random_uuids(len(batch)), strict=True):
                self._put(item, commands, published, tag)
            self._flush(commands, published)

    def _put(
        self, item: Prepared, commands: Commands, published: list[_Published], tag: str
    ) -> None:
        """Add `item`'s message to `commands`: from its shape's template (delivery tag `tag`)
        where it has one, else built in full (kombu's channel tags it)."""
        shape = self._shape(item)
        template = self.templates.get(shape) if shape is not None else None
        if template is not None and template.put(self, item, commands, tag):
            return
        before = len(commands.commands)
        message = self._build(item, commands, published)
        if shape is not None and shape not in self.templates:
            self.templates[shape] = Template.make(self, item, message, commands.commands[before:])

    def _shape(self, item: Prepared) -> Hashable | None:
        """What every message of `item`'s shape has in common (so one template builds them
        all), or None: its messages are built in full.

        Two calls of one job, queue, priority and options, outside a publish signal's view,
        differ only in their task id, arguments, argsrepr and kwargsrepr, the job layer's
        timestamps and the delivery tag: what a template's slots take."""
        options = item.options
        if (
            not options.keys() <= _TEMPLATE_OPTIONS
            or type(item.job).shadow_name is not Task.shadow_name  # a name per call
            or signals.before_task_publish.receivers
            or signals.after_task_publish.receivers
        ):
            return None
        headers = options.get("headers") or {}
        shape = (
            item.job.name,
            options["queue"],
            options.get("priority"),
            options.get("ignore_result"),
            # (the header names in order, then the values of those that are not timestamps)
            tuple(headers),
            *(v for k, v in headers.items() if k not in _STAMPS),
        )
        try:
            hash(shape)
        except TypeError:  # a header whose value cannot be a key: built in full
            return None
        return shape

    def _build(
        self, item: Prepared, commands: Commands, published: list[_Published]
    ) -> dict[str, Any]:
        """The message for `item`, built in full (as `Task.apply_async` would) and added to
        `commands`."""
        job, args, kwargs, task_id = item.job, item.args, item.kwargs, item.task_id
        name = job.name
        # Task.apply_async
        options = dict(item.options)
        options.pop("link", None)
        options.pop("link_error", None)
        shadow = options.pop("shadow", None)
        if job.typing:
            check_arguments = getattr(job, "__header__", None)
            if check_arguments is not None:
                check_arguments(*args, **kwargs)
        shadow = shadow or job.shadow_name(args, kwargs, options)
        options = dict(job._get_exec_options(), **options)
        options.setdefault("ignore_result", job.ignore_result)
        # Celery.send_task
        countdown = options.pop("countdown", None)
        eta = options.pop("eta", None)
        retries = options.pop("retries", 0)
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        expires = options.pop("expires", None)
        ignore_result = options.pop("ignore_result", None)
        # The router: route_by_queue_as keeps the queue chosen; the name becomes its Queue.
        queue = self.queues[options.pop("queue")]
        options["queue"] = queue
        root_id = parent_id = None
        parent = self.parent
        if parent:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
            if self.inherit_priority:
                options.setdefault("priority", parent.request.delivery_info.get("priority"))
        headers, properties, body, _ = self.create_task_message(
            task_id,
            name,
            args,
            kwargs,
            countdown,
            eta,
            None,  # group_id
            None,  # group_index
            expires,
            retries,
            None,  # chord
            None,  # link
            None,  # link_error
            self.reply_to,
            time_limit,
            soft_time_limit,
            False,  # create_sent_event
            root_id,
            parent_id,
            shadow,
            None,  # chain
            ignore_result=ignore_result,
            replaced_task_nesting=0,
            origin=self.origin,
            **options,
        )
        if not ignore_result:
            with self.producer.connection._reraise_as_library_errors():
                self.backend.on_task_call(self.producer, task_id)
        if parent:  # add_to_parent
            result = job.AsyncResult(task_id)
            result.ignored = ignore_result
            parent.add_trail(result)
        # AMQP.send_task_message: a direct exchange and no exchange given, so the anonymous
        # exchange and the queue's name as routing key.
        options.pop("exchange", None)
        options.pop("routing_key", None)
        options.pop("queue")
        serializer = options.pop("serializer", None)
        delivery_mode = options.pop("delivery_mode", None)
        options.pop("compression", None)
        extra_headers = options.pop("headers", None)
        if extra_headers:
            headers.update(extra_headers)
        if options:
            properties.update(options)
        routing_key = queue.name
        if routing_key not in self.declared:  # once per batch, before its first message
            self.producer.maybe_declare(queue)
            self.declared.add(routing_key)
        if signals.before_task_publish.receivers:
            signals.before_task_publish.send(
                sender=name,
                body=body,
                exchange="",
                routing_key=routing_key,
                declare=[queue],
                headers=headers,
                properties=properties,
                retry_policy=dict(self.retry_policy),
            )
        # Producer.publish
        properties = dict(properties)
        priority = properties.pop("priority", 0)
        properties.pop("mandatory", None)
        properties.pop("immediate", None)
        properties["delivery_mode"] = self._delivery_mode(queue, delivery_mode)
        content_type, content_encoding, payload = self.encoder_for(
            serializer or self.default_serializer
        )(body)
        message: dict[str, Any] = self.channel.prepare_message(
            payload, priority, content_type, content_encoding, headers, properties
        )
        self.channel.basic_publish(message, "", routing_key, _publish_batch=commands)
        if signals.after_task_publish.receivers:
            published.append((name, body, headers, routing_key))
        return message

    def _delivery_mode(self, queue: Queue, delivery_mode: Any) -> Any:
        key = (queue.name, delivery_mode)
        found = self.delivery_modes.get(key)
        if found is None:
            if delivery_mode is None:
                delivery_mode = queue.exchange.delivery_mode or self.default_delivery_mode
            # Producer.publish: no exchange given ("" here), so the producer's own.
            _, found = self.producer._delivery_details(self.producer.exchange, delivery_mode)
            self.delivery_modes[key] = found
        return found

    def encoder_for(self, serializer: str) -> Callable[[Any], tuple[Any, Any, Any]]:
        """kombu.serialization.dumps for `serializer`, with the registry looked up once."""
        encoder = self.encoders.get(serializer)
        if encoder is None:
            encoder = self.encoders[serializer] = _body_encoder(serializer)
        return encoder

    def _flush(self, commands: Commands, published: list[_Published]) -> None:
        buffered = commands.commands
        waits = bool(getattr(self.channel, "wait_replicas", 0))
        with self.channel.conn_or_acquire() as client:
            if not waits and all(name == "lpush" and len(args) == 2 for name, args in buffered):
                values: dict[Any, list[Any]] = {}
                for _, (key, value) in buffered:
                    listed = values.get(key)
                    if listed is None:
                        values[key] = [value]
                    else:
                        listed.append(value)
                # (kombu's client with a global_keyprefix prefixes each key it sends; this
                # packing bypasses the client, so it prefixes them itself)
                prefix = str(getattr(self.channel, "global_keyprefix", "") or "")
                _lpush_packed(client, {prefix + str(k): v for k, v in values.items()})
            else:
                self._flush_pipelined(client, buffered, waits)
        for name, body, headers, routing_key in published:
            signals.after_task_publish.send(
                sender=name, body=body, headers=headers, exchange="", routing_key=routing_key
            )

    def _flush_pipelined(
        self, client: Any, buffered: list[tuple[str, tuple[Any, ...]]], waits: bool
    ) -> None:
        """Other commands than LPUSH (a queue with an expiry), or a WAIT after them: through
        redis-py's pipeline, one by one, in kombu's order."""
        with client.pipeline(transaction=False) as pipe:
            for name, args in buffered:
                getattr(pipe, name)(*args)
            # BROKER_WAIT_REPLICAS: one WAIT after the batch, on the batch's connection.
            if waits:
                self.channel.wait_for_replicas(pipe)
            try:
                replies = pipe.execute()
            except Exception as exc:  # as kombu's PublishBatch.flush
                raise BatchPublishError(
                    "Redis publish batch failed; delivery is uncertain"
                ) from exc
            if waits:
                self.channel.check_replicated(replies[-1])


def _lpush_packed(client: Any, values: dict[Any, list[Any]]) -> None:
    """One LPUSH of many messages per list, packed by hand (`app.delivery.resp`) and sent in
    one write on one of `client`'s pooled connections: redis-py's pipeline spent twice as
    long again as Redis did. Any failure, a connection's or an error reply, leaves the
    connection closed (the replies still unread would be out of step) and raises what kombu's
    batch publish raises: some of the messages may be in Redis."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command(
            [b"".join(resp.command("LPUSH", key, more=listed) for key, listed in values.items())]
        )
        for _ in values:
            connection.read_response()
    except BaseException as exc:
        connection.disconnect()
        if not isinstance(exc, Exception):
            raise
        raise BatchPublishError("Redis publish batch failed; delivery is uncertain") from exc
    finally:
        pool.release(connection)


class Template:
    """The Redis command of one shape's message (`BulkPublish._shape`) with slots for what
    differs between two calls: each further message of the shape is its JSON with those
    filled in, without Celery's or kombu's message building (which took about half of the
    bulk path's time). Made from a message built in full, and only when filling it in again
    for that same call gives back exactly the bytes kombu encoded."""

    __slots__ = ("encode", "key", "parts", "slots", "stamps", "timestamps")

    #: A slot's marker in the template's JSON.
    MARK = "\x00jobs-template-slot-{}\x00"
    #: What ends a body after its arguments: create_task_message's embed for no callbacks.
    BODY_END = ', {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'

    def __init__(
        self,
        key: Any,
        parts: list[str],
        slots: tuple[tuple[int, str], ...],
        timestamps: tuple[str, ...],
        encode: Callable[[Any], str],
    ) -> None:
        self.key = key  # the Redis list
        self.parts = parts  # the message's JSON in pieces, a slot's piece empty
        self.slots = slots  # (index in parts, slot name) of each slot
        self.timestamps = timestamps  # the job layer's timestamp headers the shape has
        self.encode = encode  # kombu's JSON encoder
        self.stamps: dict[float, str] = {}  # a timestamp's JSON (a bulk call stamps many alike)

    def fill(self, values: dict[str, str]) -> str:
        """The message's JSON with each slot's JSON from `values`."""
        parts = self.parts[:]
        for index, slot in self.slots:
            parts[index] = values[slot]
        return "".join(parts)

    @classmethod
    def make(
        cls,
        bulk: BulkPublish,
        item: Prepared,
        message: dict[str, Any],
        added: list[tuple[str, tuple[Any, ...]]],
    ) -> Template | None:
        """The template of `item`'s shape, from its message built in full and the commands
        that added it; None where a template would not give the same message."""
        if bulk.parent is not None:  # a job enqueueing jobs: each is added to its trail
            return None
        if len(added) != 1 or added[0][0] != "lpush" or len(added[0][1]) != 2:
            return None  # scheduled for later, an expiring queue, a replicated publish
        key, encoded = added[0][1]
        headers, properties = message.get("headers"), message.get("properties")
        if (
            not isinstance(encoded, str)
            or not isinstance(headers, dict)
            or not isinstance(properties, dict)
        ):
            return None
        slots: dict[tuple[str, str], str] = {
            ("headers", "id"): "id",
            ("properties", "correlation_id"): "id",
            ("headers", "argsrepr"): "argsrepr",
            ("properties", "argsrepr"): "argsrepr",
            ("headers", "kwargsrepr"): "kwargsrepr",
            ("properties", "kwargsrepr"): "kwargsrepr",
            ("properties", "delivery_tag"): "delivery_tag",
        }
        if headers.get("root_id") == item.task_id:
            slots["headers", "root_id"] = "id"
        timestamps = tuple(k for k in _STAMPS if k in headers)
        for stamp in timestamps:
            slots["headers", stamp] = stamp
        marked = {**message, "body": cls.MARK.format("body")}
        marked["headers"], marked["properties"] = dict(headers), dict(properties)
        for (part, name), slot in slots.items():
            if name not in marked[part]:
                return None
            marked[part][name] = cls.MARK.format(slot)
        text = kombu_json.dumps(marked)
        markers = {
            encode_basestring_ascii(cls.MARK.format(slot)): slot
            for slot in {*slots.values(), "body"}
        }
        parts: list[str] = []
        at: list[tuple[int, str]] = []
        last = 0
        for found in re.finditer("|".join(map(re.escape, markers)), text):
            parts.append(text[last : found.start()])
            at.append((len(parts), markers[found.group()]))
            parts.append("")
            last = found.end()
        parts.append(text[last:])
        template = cls(key, parts, tuple(at), timestamps, _ENCODE_ARGUMENTS)
        values = template.values(item, properties["delivery_tag"], headers)
        if values is None or encode_basestring_ascii(message["body"]) != values["body"]:
            return None  # another serializer or body encoding than kombu's JSON and base64
        if template.fill(values) != encoded:
            return None  # something of this message is not where a template expects it
        return template

    def values(
        self, item: Prepared, delivery_tag: str, headers: dict[str, Any]
    ) -> dict[str, str] | None:
        """Each slot's JSON for `item`; None if it does not fit the template (a timestamp
        that is not a float, arguments JSON cannot take: built in full, that says why)."""
        options = item.options
        try:
            arguments = self.encode((item.args, item.kwargs))
        except Exception:
            return None
        body = arguments[:-1] + self.BODY_END  # as kombu's channel sends it: base64
        found = {
            "body": '"' + base64.b64encode(body.encode()).decode() + '"',
            "id": encode_basestring_ascii(item.task_id),
            "argsrepr": encode_basestring_ascii(options["argsrepr"]),
            "kwargsrepr": encode_basestring_ascii(options["kwargsrepr"]),
            "delivery_tag": '"' + delivery_tag + '"',  # a UUID: nothing to escape
        }
        stamps = self.stamps
        for stamp in self.timestamps:
            value = headers.get(stamp)
            if type(value) is not float:
                return None
            text = stamps.get(value) if value > 0 else None  # (not -0.0, which equals 0.0)
            if text is None:
                if len(stamps) >= 64:
                    stamps.clear()
                text = stamps[value] = repr(value)
            found[stamp] = text
        return found

    def put(self, bulk: BulkPublish, item: Prepared, commands: Commands, tag: str) -> bool:
        """Add `item`'s message, delivery tag `tag`, to `commands`; False (and nothing added)
        if it does not fit."""
        job, args, kwargs = item.job, item.args, item.kwargs
        if job.typing:  # as Task.apply_async
            check_arguments = getattr(job, "__header__", None)
            if check_arguments is not None:
                check_arguments(*args, **kwargs)
        values = self.values(item, tag, item.options.get("headers") or {})
        if values is None:
            return False
        if not item.options.get("ignore_result", job.ignore_result):
            with bulk.producer.connection._reraise_as_library_errors():
                bulk.backend.on_task_call(bulk.producer, item.task_id)
        commands.add("lpush", self.key, self.fill(values))
        return True


def _arguments_encoder() -> Callable[[Any], str]:
    """kombu's JSON encoder's `encode`, for a call's (args, kwargs), without making Python's C
    encoder afresh for each value as `json.JSONEncoder.encode` does (most of its time for a
    call of a few ids). It does not look for circular references: arguments that contain
    themselves raise RecursionError instead of ValueError, and `Template.values` gives the
    message up to be built in full, which raises kombu's error."""
    encoder = kombu_json.JSONEncoder()
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # (a Python without json's C speedups)
        return encoder.encode
    iterencode = make(
        None,  # no circular-reference markers
        encoder.default,
        encode_basestring_ascii,
        None,  # indent
        encoder.key_separator,
        encoder.item_separator,
        encoder.sort_keys,
        encoder.skipkeys,
        encoder.allow_nan,
    )
    return lambda value: "".join(iterencode(value, 0))


_ENCODE_ARGUMENTS = _arguments_encoder()


def _body_encoder(serializer: str) -> Callable[[Any], tuple[Any, Any, Any]]:
    """What kombu.serialization.dumps(body, serializer) does for each body, looked up once."""
    codec = serialization.registry._encoders.get(serializer) if serializer != "raw" else None
    if codec is None or codec.encoder is not kombu_json.dumps:
        return partial(serialization.dumps, serializer=serializer)
    # kombu's json encoder is json.dumps(body, cls=kombu's JSONEncoder): one encoder will do.
    content_type, content_encoding = codec.content_type, codec.content_encoding
    encode = kombu_json.JSONEncoder().encode

    def encoded(body: Any) -> tuple[Any, Any, Any]:
        try:
            return content_type, content_encoding, encode(body)
        except Exception as exc:  # as kombu.serialization.dumps
            raise EncodeError(exc) from exc

    return encoded


def _publishing_callbacks() -> bool:
    """Whether Celery is publishing a finished task's callbacks (it retries each on its own)."""
    flag = getattr(celery_amqp, "_callback_publish_retry", None)
    return bool(flag is not None and flag.get())


def bulk_job(job: Job) -> bool:
    """Whether the bulk path builds this job's messages as its `apply_async` would."""
    options = job._get_exec_options()
    return bool(
        not job.__v2_compat__
        and getattr(job, "_dump_pydantic_arguments", None) is None
        and not (job.soft_time_limit and job.time_limit and job.soft_time_limit > job.time_limit)
        and options.keys() <= _BULK_EXEC_OPTIONS
        and not any(options.get(k) for k in ("routing_key", "exchange", "expires", "compression"))
    )
