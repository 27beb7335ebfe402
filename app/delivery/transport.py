"""kombu's Redis transport, with a delivery path that loses nothing and that no message stops.

What it changes in kombu's Redis channel (`kombu.transport.redis`):

- **Atomic fetch.** kombu takes a message with `BRPOP` and records it as unacknowledged with a
  second command; a worker killed between the two loses the message. Here one Lua script
  (`scripts.FETCH`) reads the message from the first non-empty queue of the channel's order
  (weighted, round robin or strict), records it and pops it last. One fetch takes as many
  messages from that queue as the prefetch window has room for (at most `fetch_most`, 100),
  each recorded under a tag of its own: a threads worker of 8 fills its eight threads in one
  round trip, a prefork worker with prefetch 1 takes one at a time. With `hold_window` (the
  threads pool's) the window follows the pace, between a floor and the prefetch
  (`app.delivery.window`); while it is full the channel fetches nothing, and acknowledgements
  left for the next fetch are settled on their own after ACKS_WAIT. When every queue is empty the
  channel waits with `BLMOVE q q RIGHT RIGHT`, which blocks until the first queue of the order
  has a message and leaves it where it was; a message arriving on another queue of an idle
  worker waits at most `fetch_wait` seconds (0.1 s). Under load there is no waiting.
- **Recovery by heartbeat.** The record names the worker process that holds the delivery
  (`jobs_service:inflight`, `jobs_service:held:<worker>`). Each worker process beats every
  `heartbeat_interval` seconds; when a worker's beat is `heartbeat_timeout` seconds old, any
  live worker puts what it held back at the head of the queues it came from, in one script
  (`app.delivery.heartbeat`). kombu's visibility-timeout restore skips every record a worker of
  this transport owns, so a live worker's message is never taken from it however long its job
  runs or its ETA waits; it stays the recovery of records written by stock kombu clients.
- **Acknowledgements together.** The acknowledgements Celery's worker makes on its event loop
  in one turn ride on the channel's next fetch: the fetch script settles them after taking
  its messages, so a worker under load spends no round trip of its own on them. A channel
  waiting on empty queues, or not fetching, settles them in one script (`scripts.ACK`) on the
  loop's next turn. Those whose fetch's reply is lost or refused go
  again; what is still unsettled when the channel closes (Redis gone) is handed out again by
  the heartbeat recovery, as after a crash just before the acknowledgement. Acknowledgements
  off the event loop (a plain kombu consumer) are settled at once.
- **A tag per delivery.** Every delivery gets a delivery tag of its own (`<worker>.<n>`),
  whatever tag the producer wrote: a producer that gives every message the same tag
  (celery-ts) cannot make deliveries overwrite each other's records.
- **No message stops a worker.** An item that is not a JSON object, an envelope kombu cannot
  read and (with `check_tasks`) a message Celery's request parser would raise on are taken out
  of circulation in one script and dead-lettered (`app.delivery.rejected`), with the reason and
  their raw bytes; so is any message whose handling raises into the event loop anyway.
- **Poison messages.** A message whose deliveries ended `poison_after` times (3) in the death
  of the process holding it is dead-lettered instead of being handed out again. A whole
  worker's death is counted by the recovery; a pool process's, when the worker requeues the
  job after it (`app.delivery.requests.Request` tells the transport so; an app whose tasks
  do not use that request class gets kombu's plain requeue there). A job that asks to be
  requeued (`Reject(requeue=True)`) and a warm shutdown's requeue are not deaths. A whole
  worker's death counts for every message it held, the innocent ones beside the killer too;
  so a message one death from the limit runs alone: it is handed out only to a channel that
  holds nothing, which fetches nothing more until it is acknowledged (a message next in line
  that must run alone makes a channel holding others wait until it holds nothing). The death
  that dead-letters a message is then always its own.
- **Only what will be acknowledged is recorded.** A `no_ack` consumer (the reply queues that
  `celery inspect` reads) gets its message popped, not recorded.
- **Replicated publishes, on request.** With `wait_replicas` (BROKER_WAIT_REPLICAS) > 0, a
  publish is followed by Redis's `WAIT` on the same connection; fewer replicas confirming it
  within `wait_timeout` raises `NotReplicated` to the producer (the message is on the primary,
  but a failover now could lose it).
- **Sentinel.** `SentinelTransport` is this transport on the master that Redis sentinels name
  (`sentinel://` URLs): the same fetch, records, heartbeats and scheduled set, on connections
  that find the master through the sentinels and fail over with it.
- **Pausing and aliases.** A queue in `jobs_service:paused` is skipped by every worker's next
  fetch. `queue_aliases` lets a consumed queue also take the lists of other names (the
  `celery` queue is consumed as `default`).

Everything else is kombu's: the message format, publishing, acknowledgement bookkeeping, the
warm-shutdown requeue, `basic_get`. Producers need nothing, and a stock kombu worker can share
the Redis.

Differences from kombu's and Celery's own integration suites, run from their 5.7 sdists with
this transport swapped in (kombu's `t/integration`: 125 of 129 pass, against 129 with kombu's
transport):

- kombu's `test_redis.py::test_half_open_connection_dropped_by_drain_events` (two cases),
  `test_redis_brpop_qos.py::test_hub_pauses_pending_brpop_until_ack[message]` and
  `::test_drain_events_resumes_pending_brpop_without_resending`, and the fixture of Celery's
  `test_connection_recovery.py` (`test_reconnect_cleanup_is_bounded`,
  `test_cold_shutdown_teardown_is_bounded`, which asserts "BRPOP was not armed"), rest on a
  premise of kombu's transport: a `BRPOP` left outstanding between two polls. This transport
  fetches with a script that returns at once and waits with a `BLMOVE` of at most `fetch_wait`
  seconds, so no command stays outstanding for long. A half-open connection is still dropped by
  kombu's health check (`test_half_open_connection_dropped_and_consumption_resumes` passes;
  with a real clock it dropped after 2 s); the fake clock of the first test is set from a send
  time the next fetch moves on. A message that arrives after an "empty" answer is delivered by
  the next fetch.
- Celery's `test_reject_with_requeue_redelivers_and_succeeds` failed with a first version that
  counted every requeue towards the poison limit. Deaths are now counted only where they are
  known (the heartbeat recovery, and `app.delivery.requests.Request`), so a requeue a task asks
  for never counts (`test_a_job_that_asks_to_be_requeued_is_not_taken_for_poison`); Celery's
  suite was not run again after that change.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
from celery._state import get_current_app
from kombu.asynchronous import get_event_loop
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.url import url_to_parts

from app.delivery import flow, heartbeat, scheduled, scripts
from app.delivery.envelope import checked_task, envelope_problem
from app.delivery.records import Keys
from app.delivery.resp import bulk_string
from app.delivery.window import HoldWindow

#: How long an idle channel blocks on its first queue before looking at all of them again.
DEFAULT_FETCH_WAIT = 0.1
#: The most messages one fetch hands out.
DEFAULT_FETCH_MOST = 100
#: How long a publish waits for `wait_replicas` replicas to confirm it.
DEFAULT_WAIT_TIMEOUT = 1.0
#: While the hold window keeps a channel from fetching, the longest its acknowledgements wait
#: for the next fetch to carry them before they are settled on their own.
ACKS_WAIT = 0.05

logger = logging.getLogger(__name__)

_RECORDED, _UNRECORDED, _NOT_JSON, _POISON, _ALONE, _WAITS_ALONE = 1, 0, 2, 3, 4, 5
_HOLDS_NOTHING, _HOLDS_SOME = bulk_string("1"), bulk_string("0")


class NotReplicated(Exception):
    """A publish reached the Redis primary, but fewer replicas than BROKER_WAIT_REPLICAS
    confirmed it in time: a failover before they catch up would lose it."""

    def __init__(self, confirmed: int, wanted: int, timeout: float) -> None:
        self.confirmed, self.wanted = confirmed, wanted
        super().__init__(
            f"published to the Redis primary, but {confirmed} of the {wanted} replica(s) "
            f"BROKER_WAIT_REPLICAS asks for confirmed it within {timeout:g} s; the job may be "
            "lost if the primary fails now (publish it again: a redelivery is harmless)"
        )


def worker_id() -> str:
    """This process's name in the heartbeat records (new in every process, forked or not)."""
    global _WORKER_ID, _WORKER_PID
    if os.getpid() != _WORKER_PID:
        _WORKER_PID = os.getpid()
        _WORKER_ID = f"{socket.gethostname()}.{_WORKER_PID}.{uuid.uuid4().hex[:8]}"
    return _WORKER_ID


_WORKER_ID = ""
_WORKER_PID = -1


class QoS(kombu_redis.QoS):
    """kombu's acknowledgement emulation; deliveries the fetch script recorded end in a script."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owned: set[str] = set()  # tags FETCH recorded for this channel
        self._deaths: set[str] = set()  # tags whose process died running them (requests.py)

    def died(self, delivery_tag: str) -> None:
        """The process running this delivery died: its requeue counts towards poison."""
        self._deaths.add(delivery_tag)

    def append(self, message: Any, delivery_tag: str) -> None:
        channel: Channel = self.channel
        recorded = channel._recorded
        if recorded is not None and recorded[0] == delivery_tag:
            channel._recorded = None
            self._owned.add(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # the in-memory bookkeeping only
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if delivery_tag in self._owned:
            channel: Channel = self.channel
            if not channel.ack_later(delivery_tag):
                # (forgotten only once settled: a failed call leaves it to a later one)
                channel.settle_acks([delivery_tag])
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if delivery_tag in self._owned:
            # A requeue goes to the back of its queue, as kombu's does; one after the process
            # running it died (reject_on_worker_lost) counts towards the poison limit, one a
            # job asked for (Reject(requeue=True)) does not.
            death = requeue and delivery_tag in self._deaths
            self.channel._settle(delivery_tag, "tail" if requeue else "ack", death=death)
            self._owned.discard(delivery_tag)
            self._deaths.discard(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().reject(delivery_tag, requeue=requeue)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        tag = bytes_to_str(tag)
        if tag in self._owned:  # the warm-shutdown requeue: back at the head, not a death
            self.channel._settle(tag, "tail" if leftmost else "head")
            self._owned.discard(tag)
        else:
            super().restore_by_tag(tag, client, leftmost)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu's visibility-timeout restore, for records no worker of this transport owns."""
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        channel: Channel = self.channel
        keys = channel.keys
        with channel.conn_or_acquire() as client:
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    unowned = channel._script(scripts.VISIBLE)(
                        keys=[
                            channel._prefixed(self.unacked_index_key),
                            keys.inflight,
                            keys.workers,
                        ],
                        args=[time.time() - self.visibility_timeout, num or -1, time.time()],
                    )
                    for tag in unowned or []:
                        kombu_redis.QoS.restore_by_tag(self, tag, client)
            except kombu_redis.MutexHeld:
                pass
            except redis.ResponseError as exc:  # a full `noeviction` Redis: try on the next scan
                logger.warning("Redis refused the visibility-timeout scan: %s", exc)


class Message(virtual.Message):
    """kombu's message; its decoded body (`payload`) is the one the delivery's checks decoded,
    where that is what kombu's decoding would give (`envelope.checked_task`), instead of
    Celery's worker decoding it again. `checked` says so (`app.delivery.requests`)."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        super().__init__(payload, channel=channel, **kwargs)
        recorded: tuple[str, Any] | None = getattr(channel, "_recorded", None)
        self.checked = False
        if recorded is not None and recorded[0] == self.delivery_tag and recorded[1] is not None:
            self.checked, self._decoded_cache = True, recorded[1]


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with the delivery path described in this module's docstring."""

    QoS = QoS
    Message = Message
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "fetch_wait",
        "fetch_most",
        "heartbeat_interval",
        "heartbeat_timeout",
        "poison_after",
        "queue_aliases",
        "check_tasks",
        "drain_rejected",
        "schedule_after",
        "poll_interval",
        "wait_replicas",
        "wait_timeout",
        "hold_window",
    )
    fetch_wait = DEFAULT_FETCH_WAIT
    #: The most messages one fetch hands out (fewer when the prefetch window is fuller).
    fetch_most = DEFAULT_FETCH_MOST
    #: Seconds between a worker's heartbeats, and without one before it counts as dead.
    heartbeat_interval = heartbeat.DEFAULT_INTERVAL
    heartbeat_timeout = heartbeat.DEFAULT_TIMEOUT
    #: Deaths of the process holding a message before it is dead-lettered as poison.
    poison_after = 3
    #: {queue consumed: (other list names taken as that queue)}.
    queue_aliases: dict[str, tuple[str, ...]] = {}  # noqa: RUF012  (a kombu transport option)
    #: Check Celery's protocol before delivering (celeryconfig turns it on for the workers).
    check_tasks = False
    #: Write rejected messages to the dead-letter store (celeryconfig turns it on).
    drain_rejected = False
    #: After Redis refuses a fetch (a full `noeviction` server answers OOM), the seconds before
    #: the next: the script wrote nothing, so every message is still queued.
    refused_backoff = 1.0
    #: A message due more than this many seconds ahead waits in the scheduled set.
    schedule_after = scheduled.SCHEDULE_AFTER
    #: The longest the scheduled-set poller sleeps (it wakes sooner for the next due job).
    poll_interval = scheduled.POLL_INTERVAL
    #: Replicas that must confirm each publish (Redis's WAIT) before it returns; 0: none.
    wait_replicas = 0
    #: Seconds a publish waits for those replicas before raising NotReplicated.
    wait_timeout = DEFAULT_WAIT_TIMEOUT
    #: (threads, least, most, ahead): the messages held grow with the pace, from `least` to
    #: `most` per thread (app.delivery.window; the threads pool sets it); None: the prefetch
    #: window alone.
    hold_window: tuple[int, int, int, float] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The delivery being handed to the consumer: its tag (recorded by the fetch script,
        # for QoS.append) and its body as the checks decoded it (or None, for Message).
        self._recorded: tuple[str, Any] | None = None
        self._idle = False  # the last fetch found every queue empty: wait before the next
        self._pending: str | None = None  # "fetch" or "wait": the command whose reply is due
        self._fetch_keys: list[tuple[str, str]] = []  # (list key, queue delivered as)
        self._refused_until = 0.0
        #: A message on its last chance was handed out, or is next in its queue: fetch nothing
        #: more until this channel holds nothing (it runs alone; see scripts.FETCH).
        self._alone = False
        self._fetch_sha: str | None = None
        self._next_tag = 1  # the number in this channel's next delivery tag
        self._fetch_packed: dict[tuple[Any, ...], tuple[int, bytes, bytes]] = {}
        self._acks: list[str] = []  # acknowledged, not yet settled (see ack_later)
        self._acks_sent: list[str] = []  # acknowledgements riding on the pending fetch
        self._acks_timer: Any = None  # settles them if the hold window keeps fetches back
        self._scripts: dict[str, Any] = {}
        self._heartbeat: heartbeat.Heartbeat | None = None
        self._noack_queues: set[str] = set()  # popped, never recorded: nothing will ack them
        self._flow_held: dict[str, flow.Held] = {}  # tag -> concurrency slots it holds
        #: This channel's name in the heartbeat records: each consuming channel is a worker.
        self.worker = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:10]}"
        super().__init__(*args, **kwargs)
        if not self.ack_emulation:
            raise ValueError("app.delivery needs kombu's ack emulation (acks_late relies on it)")
        self.keys = Keys(self.global_keyprefix or "")
        self.fetch_most = max(1, int(self.fetch_most))
        self.queue_aliases = {q: tuple(names) for q, names in dict(self.queue_aliases).items()}
        self._window = HoldWindow(*self.hold_window) if self.hold_window else None

    def heartbeat_pool(self, params: dict[str, Any]) -> redis.ConnectionPool:
        """A pool of the heartbeat's own on this channel's Redis (see heartbeat.for_channel)."""
        return redis.ConnectionPool(**params)

    def heartbeat_location(self, params: dict[str, Any]) -> tuple[str, ...]:
        """What tells this channel's Redis apart, for sharing one heartbeat per process."""
        return tuple(str(params.get(name)) for name in ("host", "port", "path", "db", "username"))

    def _prefixed(self, key: str) -> str:
        return f"{self.global_keyprefix}{key}" if self.global_keyprefix else key

    # Scripts ---------------------------------------------------------------------------------

    def _record_keys(self) -> list[str]:
        """The keys of a delivery's records, the first three of every script that touches
        them: kombu's unacked hash and its index, and the in-flight hash."""
        return [
            self._prefixed(self.unacked_key),
            self._prefixed(self.unacked_index_key),
            self.keys.inflight,
        ]

    @property
    def plain_client(self) -> redis.Redis:
        """A redis-py client on the channel's pool that prefixes nothing (scripts name keys)."""
        client = self.__dict__.get("_plain_client")
        if client is None:
            client = self.__dict__["_plain_client"] = redis.Redis(connection_pool=self.pool)
        return client

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.plain_client.register_script(source)
        return script

    def ack_later(self, tag: str) -> bool:
        """Leave the acknowledgement of `tag` for later, if called on the thread of the event
        loop (where Celery's worker acknowledges): the acknowledgements of one turn of the loop
        ride on the channel's next fetch (the fetch script settles them), or are settled in one
        script on the loop's next turn if the channel is waiting on empty queues or not
        fetching. Anywhere else (no event loop, another thread), False: settle it now."""
        hub = get_event_loop()
        if hub is None or getattr(hub, "_loop_thread", None) != threading.get_ident():
            return False
        self._acks.append(tag)
        if len(self._acks) == 1:
            hub.call_soon(self._flush_acks_unless_fetching)
        return True

    def _flush_acks_unless_fetching(self) -> None:
        # Under load the loop's tick, right after this, sends the next fetch, which carries
        # them (or a fetch is on its way, whose reply makes the next one). A channel waiting on
        # empty queues (up to fetch_wait) or not fetching at all settles them now.
        if self._pending == "wait" or not (self.active_queues and self.qos.can_consume()):
            self.flush_acks()

    def flush_acks(self) -> None:
        """Settle the acknowledgements left for later. If Redis cannot be reached, they stay
        for the next flush; the channel's close tries once more, and what it cannot settle is
        handed out again by the heartbeat recovery (a job acknowledged is then run twice, as
        after a crash just before its acknowledgement)."""
        tags, self._acks = self._acks, []
        if not tags or self.closed:
            return
        try:
            self.settle_acks(tags)
        except Exception:
            self._acks[:0] = tags
            logger.warning(
                "could not acknowledge %d deliveries; trying again", len(tags), exc_info=True
            )

    def settle_acks(self, tags: list[str]) -> None:
        """Acknowledge these recorded deliveries in one script."""
        keys = self.keys
        gone = self._script(scripts.ACK)(keys=self._record_keys(), args=[keys.held(""), *tags])
        self._settled(tags, gone)

    def _settled(self, tags: list[str], gone: list[bytes] | None) -> None:
        """What follows the acknowledgement of `tags` in Redis (`gone`: those already gone)."""
        owned, held = self.qos._owned, self._flow_held
        if self._window is not None:
            self._window.settled(len(tags))
        for tag in tags:
            owned.discard(tag)
            if tag in held:
                flow.release(self, tag)
        for lost in gone or ():
            logger.warning(
                "delivery %s was acknowledged after it had been taken back from this worker "
                "(its heartbeat had lapsed); the job may have run twice",
                bytes_to_str(lost),
            )

    def _settle(self, tag: str, how: str, death: bool = False) -> None:
        keys = self.keys
        found = self._script(scripts.SETTLE)(
            keys=self._record_keys(),
            args=[tag, how, "1" if death else "0", keys.held(""), heartbeat.DEATHS_TTL],
        )
        if self._window is not None:
            self._window.settled(1)
        if tag in self._flow_held:
            flow.release(self, tag)
        if not found and how == "ack":
            logger.warning(
                "delivery %s was acknowledged after it had been taken back from this worker "
                "(its heartbeat had lapsed); the job may have run twice",
                tag,
            )

    def quarantine(self, tag: str, queue: str, reason: str) -> None:
        """Take the recorded delivery `tag` out of circulation, for the dead-letter store."""
        header = heartbeat.rejected_header(queue, tag, reason)
        self._script(scripts.QUARANTINE)(
            keys=[*self._record_keys(), self.keys.rejected],
            args=[tag, header, self.keys.held("")],
        )
        if tag in self._flow_held:
            flow.release(self, tag)
        logger.error(
            "message on queue %r taken out of circulation for the dead-letter store: %s",
            queue,
            reason,
            extra={"event": "rejected_message", "queue": queue, "reason": reason},
        )
        if self._heartbeat is not None:
            self._heartbeat.wake()

    # Publishing ------------------------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """kombu's publish, except that a message due later waits in the scheduled set."""
        due = scheduled.due_time(message)
        later = due is not None and due - time.time() > float(self.schedule_after)
        batch = kwargs.get("_publish_batch")
        # BROKER_WAIT_REPLICAS: BulkPublish waits once per batch; a message alone, or in
        # kombu's own publish batch (which reads no replies), waits as it is published.
        if self.wait_replicas and (batch is None or isinstance(batch, kombu_redis.PublishBatch)):
            self._put_replicated(queue, message, due if later else None)
            return
        if not later:
            super()._put(queue, message, **kwargs)
            return
        assert due is not None
        kwargs.pop("_publish_batch", None)
        keys = self.keys
        arguments = self._schedule_arguments(queue, message, due)
        if batch is not None:  # kombu's publish batch (and BulkPublish) send it in a pipeline
            batch.add(
                "eval", scripts.SCHEDULE, 2, keys.schedule, keys.schedule_messages, *arguments
            )
            return
        self._script(scripts.SCHEDULE)(
            keys=[keys.schedule, keys.schedule_messages], args=list(arguments)
        )

    def _schedule_arguments(
        self, queue: str, message: dict[str, Any], due: float
    ) -> tuple[str, ...]:
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        return (
            scheduled.member_base(message),
            repr(due),
            scheduled.entry_header(queue, self._prefixed(key), message),
            dumps(message),
        )

    def _put_replicated(self, queue: str, message: dict[str, Any], due: float | None) -> None:
        """Publish as `_put` does, then WAIT for `wait_replicas` on the same connection."""
        with self.plain_client.pipeline(transaction=False) as pipe:
            if due is None:
                key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
                pipe.lpush(self._prefixed(key), dumps(message))
                if self._expires and queue in self._expires:
                    for pri in self.priority_steps:
                        pipe.pexpire(
                            self._prefixed(self._q_for_pri(queue, pri)), self._expires[queue]
                        )
            else:
                keys = self.keys
                pipe.eval(
                    scripts.SCHEDULE,
                    2,
                    keys.schedule,
                    keys.schedule_messages,
                    *self._schedule_arguments(queue, message, due),
                )
            self.wait_for_replicas(pipe)
            replies = pipe.execute()
        self.check_replicated(replies[-1])

    def wait_for_replicas(self, pipe: Any) -> None:
        """Queue a WAIT for `wait_replicas` at the end of `pipe` (nothing when 0)."""
        if self.wait_replicas:
            pipe.execute_command(
                "WAIT", int(self.wait_replicas), int(float(self.wait_timeout) * 1000)
            )

    def check_replicated(self, confirmed: Any) -> None:
        """Raise NotReplicated when WAIT's reply is short of `wait_replicas`."""
        if int(confirmed) < int(self.wait_replicas):
            raise NotReplicated(int(confirmed), int(self.wait_replicas), float(self.wait_timeout))

    def _list_key(self, queue: str) -> str:
        """The Redis list the message delivered as `queue` was taken from."""
        return self._prefixed(next((k for k, q in self._fetch_keys if q == queue), queue))

    def defer(self, tag: str, queue: str, payload: dict[str, Any], due: float) -> None:
        """Move the recorded delivery `tag`, due at `due`, into the scheduled set."""
        key = self._list_key(queue)
        keys = self.keys
        self._script(scripts.DEFER)(
            keys=[
                keys.schedule,
                keys.schedule_messages,
                *self._record_keys(),
            ],
            args=[
                scheduled.member_base(payload),
                repr(due),
                scheduled.entry_header(queue, key, payload),
                tag,
                keys.held(""),
            ],
        )
        logger.info(
            "message %s on queue %r is due in %.1f s: it waits in the scheduled set",
            scheduled.member_base(payload) or tag,
            queue,
            due - time.time(),
            extra={"event": "deferred", "queue": queue},
        )

    # Fetching --------------------------------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._noack_queues.add(queue)
        else:
            self._noack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _agent(self) -> heartbeat.Heartbeat:
        if self._heartbeat is None:
            self._heartbeat = heartbeat.for_channel(self)
        return self._heartbeat

    def _fetch_order(self) -> list[tuple[str, str]]:
        queues = self._queue_cycle.consume(len(self.active_queues))
        return [
            (self._q_for_pri(name, pri), queue)
            for pri in self.priority_steps
            for queue in queues
            for name in (queue, *self.queue_aliases.get(queue, ()))
        ]

    def _holding(self) -> int:
        """Deliveries handed to the consumer and not yet acknowledged."""
        qos = self.qos
        return len(qos._delivered) - len(qos._dirty)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if time.monotonic() < self._refused_until or (self._alone and self._holding()):
            self.flush_acks()
            return  # nothing is sent; the event loop asks again on a later tick
        room = self._window_room()
        if room is not None and room <= 0:
            self._settle_acks_soon()
            return  # (the next acknowledgement's tick asks again)
        self._alone = False
        order = self._fetch_order()
        if not order:
            return
        agent = self._agent()
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        if self._idle:
            self.flush_acks()
            wait = min(self.fetch_wait, timeout if timeout is not None else self.brpop_timeout)
            paused = agent.paused
            first = next((key for key, queue in order if queue not in paused), None)
            key = self._prefixed(first) if first is not None else self.keys.idle
            self._pending = "wait"
            connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", wait)
            return
        self._fetch_keys = order
        self._pending = "fetch"
        if self._fetch_sha is None:
            self._fetch_sha = self.plain_client.script_load(scripts.FETCH)
        noack = self._noack_queues
        shape = (self._fetch_sha, *order, *(queue in noack for _, queue in order))
        packed = self._fetch_packed.get(shape)
        if packed is None:
            packed = self._fetch_packed[shape] = self._pack_fetch(order)
        # As many messages as the prefetch window has room for (Celery's worker: its
        # concurrency x the prefetch multiplier, less what it holds), each tagged
        # `<worker>.<number>` from this number on.
        most = max(1, min(self.fetch_most, self.qos.can_consume_max_estimate() or 1))
        if room is not None:
            most = min(most, room)
        number, self._next_tag = self._next_tag, self._next_tag + most
        # The command is the same from one fetch to the next but for the time, the first tag,
        # the count and whether the channel holds anything: the rest is packed once per order
        # of queues (packing it took a tenth of the loop).
        dynamic = (
            bulk_string(repr(time.time()))
            + bulk_string(number)
            + bulk_string(most)
            + (_HOLDS_SOME if self._holding() else _HOLDS_NOTHING)
        )
        # The acknowledgements left for later ride on it (settled once its reply is read).
        acks, self._acks = self._acks, []
        self._acks_sent = acks
        count, head, tail = packed
        connection.send_packed_command(
            [
                b"*%d\r\n" % (count + len(acks)),
                head + dynamic + tail + b"".join(bulk_string(tag) for tag in acks),
            ]
        )

    def _window_room(self) -> int | None:
        """The messages the hold window lets the next fetch take; None without one."""
        window = self._window
        if window is None:
            return None
        return window.size(time.monotonic()) - self._holding()

    def _settle_acks_soon(self) -> None:
        """While the hold window keeps fetches back, settle the acknowledgements left for the
        next fetch within ACKS_WAIT seconds if no fetch has carried them by then."""
        if not self._acks or self._acks_timer is not None:
            return
        hub = get_event_loop()
        if hub is None:
            self.flush_acks()
            return
        self._acks_timer = hub.call_later(ACKS_WAIT, self._acks_waited)

    def _acks_waited(self) -> None:
        self._acks_timer = None
        if self._pending != "fetch":  # (a fetch on its way: the next carries them, or waits)
            self.flush_acks()

    def _pack_fetch(self, order: list[tuple[str, str]]) -> tuple[int, bytes, bytes]:
        """The fetch's EVALSHA for this order, packed (RESP): its length without the
        acknowledgements, and its arguments before and after those that change from one fetch
        to the next (the time, the first tag, the count, whether the channel holds nothing)."""
        keys = self.keys
        noack = self._noack_queues
        head = [
            "EVALSHA",
            self._fetch_sha,
            7 + len(order),
            *self._record_keys(),
            keys.held(self.worker),
            keys.workers,
            keys.rejected,
            keys.paused,
            *(self._prefixed(key) for key, _ in order),
        ]
        tail: list[Any] = [
            f"{self.worker}.",
            self.worker,
            self.poison_after,
            keys.deliveries,
            heartbeat.DEATHS_TTL,
        ]
        for _, queue in order:
            tail += [queue, "0" if queue in noack else "1"]
        tail.append(keys.held(""))
        return (
            len(head) + 4 + len(tail),
            b"".join(bulk_string(arg) for arg in head),
            b"".join(bulk_string(arg) for arg in tail),
        )

    def _brpop_read(self, **options: Any) -> bool:
        try:
            pending = self._pending
            self._pending = None
            acks, self._acks_sent = self._acks_sent, []
            try:
                reply = self.client.parse_response(
                    self.client.connection, "EVALSHA" if pending == "fetch" else "BLMOVE", **options
                )
            except self.connection_errors:
                # The reply is lost: the acknowledgements it carried go again (one that landed
                # is found gone then, and logged so). As kombu: disconnect, so that the next
                # poll reconnects.
                self._acks[:0] = acks
                self.client.connection.disconnect()
                raise
            except self.ResponseError as exc:
                self._acks[:0] = acks  # the script did not run, or stopped before them
                if str(exc).startswith("NOSCRIPT"):  # Redis restarted: load the script again
                    self._fetch_sha = None
                    raise virtual.Empty() from None
                # Redis refused the command (OOM on a full `noeviction` server, most likely).
                # kombu's worker would stop on this; the fetch wrote nothing, so wait and retry.
                self._refused_until = time.monotonic() + self.refused_backoff
                logger.warning(
                    "Redis refused to hand out a message (%s); every message stays queued; "
                    "trying again in %g s",
                    exc,
                    self.refused_backoff,
                )
                raise virtual.Empty() from None
            if pending != "fetch":  # the wait ended: a message arrived, or the wait timed out
                self._idle = False
                raise virtual.Empty()
            gone, position, *taken = reply
            if acks:
                self._settled(acks, gone)
            if not position:
                self._idle = True
                raise virtual.Empty()
            self._idle = False
            _, queue = self._fetch_keys[int(position) - 1]
            self._queue_cycle.rotate(queue)
            delivered = False
            for item, outcome, tag in taken:
                outcome = int(outcome)
                if outcome in (_ALONE, _WAITS_ALONE):  # (handed out alone, or waiting to be)
                    self._alone = True
                    if outcome == _WAITS_ALONE:
                        continue
                    outcome = _RECORDED
                try:
                    self._take(item, queue, outcome, bytes_to_str(tag))
                    delivered = True
                except virtual.Empty:  # accounted for (dead-lettered, deferred): the next one
                    pass
            if not delivered:
                raise virtual.Empty()
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def _take(self, item: bytes, queue: str, outcome: int, tag: str) -> None:
        """Deliver what the fetch script handed out, or account for it."""
        if outcome in (_NOT_JSON, _POISON):
            what = "is not a JSON object" if outcome == _NOT_JSON else "kept killing its worker"
            logger.error(
                "message on queue %r %s; taken out of circulation for the dead-letter store: %r",
                queue,
                what,
                bytes(item[:200]),
                extra={"event": "rejected_message", "queue": queue},
            )
            self._agent().wake()
            raise virtual.Empty()
        problem: str | None = None
        body: Any = None  # the body as kombu decodes it, where the checks decoded it so
        try:
            payload = loads(bytes_to_str(item))
        except (ValueError, TypeError, UnicodeDecodeError):
            payload = None
        except RecursionError:  # the fetch script's cjson reads 1000 levels; Python gives out first
            payload, problem = None, "the message is nested too deeply to decode"
        try:
            if problem is None:
                if self.check_tasks and outcome == _RECORDED:  # not pidbox replies
                    problem, body = checked_task(payload, self._known_task, item)  # (and envelope)
                else:
                    problem = envelope_problem(payload, item)
        except Exception as exc:  # a shape no check foresaw: it must not stop the worker either
            logger.exception("checking a message on queue %r raised", queue)
            problem = f"checking it raised {type(exc).__name__}: {exc}"
        if problem is not None:
            if outcome == _RECORDED:
                self.quarantine(tag, queue, problem)
            else:  # a no_ack consumer's queue (pidbox replies): nothing to keep
                logger.error("dropped a message on queue %r: %s", queue, problem)
            raise virtual.Empty()
        if outcome == _RECORDED:
            due = scheduled.due_time(payload)
            if due is not None and due - self._redis_now() > float(self.schedule_after):
                self.defer(tag, queue, payload, due)  # a foreign producer's future job
                raise virtual.Empty()
            if not flow.admit(self, tag, queue, self._list_key(queue), payload):
                raise virtual.Empty()  # over a limit: it waits in the scheduled set
        properties = payload["properties"]
        properties["delivery_tag"] = tag
        info = properties.get("delivery_info") or {}
        properties["delivery_info"] = {
            **info,
            "exchange": info.get("exchange") if isinstance(info.get("exchange"), str) else "",
            "routing_key": queue,
        }
        if outcome != _RECORDED:
            self.connection._deliver(payload, queue)
            return
        self._recorded = (tag, body)
        try:
            self.connection._deliver(payload, queue)
        except self.connection_errors:
            raise
        except Exception as exc:
            # Whatever kombu or Celery raised on this message would stop the worker; the
            # message goes to the dead-letter store instead.
            logger.exception("handling a message on queue %r raised", queue)
            self.qos._owned.discard(tag)
            self.quarantine(tag, queue, f"the consumer raised {type(exc).__name__}: {exc}")
            self.qos._delivered.pop(tag, None)
        finally:
            self._recorded = None

    def _redis_now(self) -> float:
        """Redis's clock as this process last measured it (the poller's clock)."""
        poller = self._agent().poller
        return time.time() + (poller.clock_offset if poller is not None else 0.0)

    @staticmethod
    def _known_task(name: str) -> bool:
        return name in get_current_app().tasks

    def close(self) -> None:
        agent, self._heartbeat = self._heartbeat, None
        if self._in_poll and not self.closed:
            # kombu's close reads the pending fetch's reply first and lets a connection error
            # out, before the channel counts as closed; Celery then closes the transport and
            # closes this channel again with no connection to make a pool from, which raised
            # AttributeError and stopped the worker (seen in a sentinel failover). The
            # connection is gone: forget the reply; what the channel holds is put back below,
            # or by the heartbeat recovery.
            try:
                self._brpop_read()
            except (virtual.Empty, *self.connection_errors):
                pass
        self.flush_acks()  # (after that reply: the acknowledgements it carried, if it was lost)
        try:
            super().close()  # puts back what it holds, unless Redis is gone
        except AttributeError:
            # The same second close, by another path: nothing to make a pool from.
            if getattr(self.connection, "client", None) is not None:
                raise
            logger.warning("channel closed after its transport; what it held is recovered")
        finally:
            # Stop beating either way: what could not be put back now is recovered when the
            # beat lapses, by any live worker.
            if agent is not None:
                agent.release(self)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the delivery path of `Channel`."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """`Channel` on the master Redis sentinels name: kombu's SentinelChannel supplies the
    connections (found through the sentinels, failing over with the master), `Channel` the
    delivery path. Needs the `master_name` transport option (BROKER_SENTINEL_MASTER)."""

    from_transport_options = (  # type: ignore[assignment]
        *Channel.from_transport_options,
        "master_name",
        "min_other_sentinels",
        "sentinel_kwargs",
        "sentinel_fanout_compat",
        "sentinels",
    )
    #: [(host, port)] of every sentinel. celeryconfig gives them here and the broker URL as the
    #: first sentinel alone: a URL list would make kombu's connection failover switch to the
    #: next URL with the transport its scheme names, kombu's stock sentinel transport.
    sentinels: tuple[tuple[str, int], ...] = ()

    def sentinel_nodes(self) -> list[tuple[str, int]]:
        """Every sentinel: the `sentinels` option's, then the broker URLs'."""
        nodes = [(str(host), int(port)) for host, port in self.sentinels or ()]
        conninfo = self.connection.client
        for url in map(url_to_parts, conninfo.alt or [conninfo.as_uri()]):
            if url.scheme == "sentinel" and url.hostname:
                node = (url.hostname, url.port or kombu_redis.SentinelTransport.default_port)
                if node not in nodes:
                    nodes.append(node)
        return nodes or [(conninfo.hostname or "127.0.0.1", int(conninfo.port or 26379))]

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        """kombu's, on every sentinel of `sentinel_nodes` (kombu reads the URLs only)."""
        from redis.sentinel import Sentinel

        params = dict(self._connparams(asynchronous))
        params.pop("host", None)
        params.pop("port", None)
        manager = Sentinel(
            self.sentinel_nodes(),
            min_other_sentinels=int(getattr(self, "min_other_sentinels", 0) or 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None),
            **params,
        )
        if asynchronous:  # kept so that kombu's _disconnect_pools closes them (kombu#1108)
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        master = getattr(self, "master_name", None)
        if master is None:
            raise ValueError("'master_name' transport option must be specified.")
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        return manager.master_for(master, redis.Redis, **credentials).connection_pool

    def heartbeat_pool(self, params: dict[str, Any]) -> redis.ConnectionPool:
        """A pool of the heartbeat's own on the master (see heartbeat.for_channel)."""
        from redis.sentinel import Sentinel

        nodes = self.sentinel_nodes()
        options = {
            k: v
            for k, v in params.items()
            if k not in ("host", "port", "connection_class", "max_connections")
        }
        timeouts = {k: v for k, v in options.items() if k.startswith("socket_") and v}
        sentinels = Sentinel(
            nodes or [(params["host"], params["port"])],
            min_other_sentinels=int(getattr(self, "min_other_sentinels", 0) or 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None) or timeouts,
            **options,
        )
        master = getattr(self, "master_name", None)
        if master is None:
            raise ValueError("'master_name' transport option must be specified.")
        pool: redis.ConnectionPool = sentinels.master_for(master).connection_pool
        return pool

    def heartbeat_location(self, params: dict[str, Any]) -> tuple[str, ...]:
        """What tells this channel's Redis apart, for sharing one heartbeat per process."""
        nodes = ";".join(f"{host}:{port}" for host, port in self.sentinel_nodes())
        return ("sentinel", str(getattr(self, "master_name", "")), nodes, str(params.get("db")))


class SentinelTransport(Transport):
    """This transport on the master Redis sentinels name (`sentinel://` URLs)."""

    Channel = SentinelChannel
    default_port = kombu_redis.SentinelTransport.default_port  # type: ignore[assignment]


class SocketTransport(Transport):
    """The same transport for a Redis unix socket. kombu hands a `redis+socket://` URL whole to
    the channel, which reads the socket path and database from it; a transport that says it
    parses its own URLs gets the same treatment for the `socket://` URL it is given here."""

    can_parse_url = True


#: The paths Celery's `broker_transport` setting names these transports by.
TRANSPORT = f"{__name__}:Transport"
SOCKET_TRANSPORT = f"{__name__}:SocketTransport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


def broker_transport(broker_url: str) -> tuple[str, str | None]:
    """The broker URL and `broker_transport` for this app: this transport for Redis URLs.

    Only this app's connections use it: nothing global in kombu changes. kombu takes a
    `redis+socket://` URL's transport from its scheme, ignoring the setting, so that URL is
    given as the `socket://` URL kombu's Redis channel reads; and it switches to the next of
    several `;`-separated URLs with the transport of that URL's scheme, so a sentinel:// list
    is given as its first URL (the others go in the `sentinels` transport option).
    """
    scheme = broker_url.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        return broker_url, TRANSPORT
    if scheme == "sentinel":  # the first sentinel; the others in the `sentinels` option
        return broker_url.split(";", 1)[0].strip(), SENTINEL_TRANSPORT
    if scheme == "redis+socket":
        return broker_url.removeprefix("redis+"), SOCKET_TRANSPORT
    return broker_url, None
