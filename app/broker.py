"""kombu's Redis transport, with the message taken and recorded as unacknowledged atomically.

kombu's Redis transport takes a message with `BRPOP` and then, in a second command, records it
in the `unacked` hash that the visibility timeout restores from. A worker killed outright (or a
Redis server that dies) between the two loses that message: it is in no queue and in no hash.

This transport closes that window. A Lua script pops the message from the first non-empty queue
(in the channel's queue order: weighted, round robin or strict) and writes it to `unacked` and
its index in the same step; Redis runs a script as one unit, and persists and replicates its
writes together. When every queue is empty, the channel waits with `BLMOVE q q RIGHT RIGHT`,
which blocks until the first queue of the order has a message and leaves it where it was, then
runs the script again. Redis has no blocking form of "wait for any of these lists without taking
anything", so a message arriving on another queue while the worker is idle waits at most
`fetch_wait` seconds (a transport option, 0.1 s by default); under load there is no waiting.

Everything else is kombu's: the message format, the `unacked` records (so kombu's own restore,
acknowledgement, warm-shutdown requeue and a stock kombu worker on the same Redis all work with
it), publishing, and the non-asynchronous `basic_get` path (not used by workers). Producers need
nothing: any Celery or kombu client that publishes to Redis feeds this transport's workers.

`install()` (called by `celeryconfig`) registers it for the `redis`, `rediss` and `redis+socket`
URLs through kombu's transport aliases.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

#: KEYS: the unacked hash, its index, then the queues in the order to try them.
#: ARGV: the time to index the message at (the worker's clock, as kombu's own records use).
#: Returns false when every queue is empty, else {position of the queue, message, recorded}.
#: The message is read first and popped last: Redis does not undo a script's earlier writes
#: when a later command fails (a full `noeviction` server refuses ZADD and HSET, never RPOP),
#: so a failed record leaves the message in its queue. A message the script cannot read (not
#: kombu's JSON envelope, no delivery tag) is popped and returned unrecorded, and the channel
#: logs and skips it.
FETCH_SCRIPT = """
for i = 3, #KEYS do
  local item = redis.call('LINDEX', KEYS[i], -1)
  if item then
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      local tag = message.properties.delivery_tag
      local info = message.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table'
          and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info.exchange)
          .. ',' .. cjson.encode(info.routing_key) .. ']')
        redis.call('RPOP', KEYS[i])
        return {i - 2, item, 1}
      end
    end
    redis.call('RPOP', KEYS[i])
    return {i - 2, item, 0}
  end
end
return false
"""

#: How long an idle channel blocks on its first queue before looking at all of them again.
DEFAULT_FETCH_WAIT = 0.1

logger = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    """kombu's Redis acknowledgement emulation; skips the record the fetch script made."""

    def append(self, message: Any, delivery_tag: str) -> None:
        channel: Channel = self.channel
        if channel._recorded_tag is not None and channel._recorded_tag == delivery_tag:
            channel._recorded_tag = None
            virtual.QoS.append(self, message, delivery_tag)  # the in-memory bookkeeping only
        else:
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    """Fetches with FETCH_SCRIPT; waits with a non-consuming BLMOVE when the queues are empty."""

    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "fetch_wait")  # type: ignore[assignment]
    fetch_wait = DEFAULT_FETCH_WAIT
    #: After Redis refuses a fetch (a full `noeviction` server answers OOM), the seconds before
    #: the next: the script wrote nothing, so every message is still queued.
    refused_backoff = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._recorded_tag: str | None = None
        self._idle = False  # the last fetch found every queue empty: wait before the next
        self._pending: str | None = None  # "fetch" or "wait": the command whose reply is due
        self._fetch_keys: list[str] = []
        self._refused_until = 0.0
        super().__init__(*args, **kwargs)
        if not self.ack_emulation:
            raise ValueError("app.broker needs kombu's ack emulation (acks_late relies on it)")

    def _prefixed(self, key: str) -> str:
        return f"{self.global_keyprefix}{key}" if self.global_keyprefix else key

    def _brpop_start(self, timeout: float | None = None) -> None:
        if time.monotonic() < self._refused_until:
            return  # nothing is sent; the event loop asks again on a later tick
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        if self._idle:
            wait = min(self.fetch_wait, timeout if timeout is not None else self.brpop_timeout)
            first = self._prefixed(keys[0])
            self._pending = "wait"
            connection.send_command("BLMOVE", first, first, "RIGHT", "RIGHT", wait)
        else:
            self._fetch_keys = keys
            self._pending = "fetch"
            connection.send_command(
                "EVAL",
                FETCH_SCRIPT,
                2 + len(keys),
                self._prefixed(self.unacked_key),
                self._prefixed(self.unacked_index_key),
                *(self._prefixed(key) for key in keys),
                repr(time.time()),
            )

    def _brpop_read(self, **options: Any) -> bool:
        try:
            pending = self._pending
            self._pending = None
            try:
                reply = self.client.parse_response(
                    self.client.connection, "EVAL" if pending == "fetch" else "BLMOVE", **options
                )
            except self.connection_errors:
                # As kombu: disconnect, so that the next poll reconnects.
                self.client.connection.disconnect()
                raise
            except self.ResponseError as exc:
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
            if not reply:
                self._idle = True
                raise virtual.Empty()
            self._idle = False
            position, item, recorded = reply
            key = self._fetch_keys[int(position) - 1]
            queue = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            try:
                payload = loads(bytes_to_str(item))
                payload["properties"]["delivery_tag"]
            except (ValueError, TypeError, KeyError):
                # Not a kombu message at all (kombu's BRPOP path would raise here and stop
                # the consumer): say so, and go on with the next one.
                logger.error(
                    "dropped an item on queue %r that is not a kombu message: %r",
                    queue,
                    bytes(item[:200]),
                )
                raise virtual.Empty() from None
            if int(recorded):
                self._recorded_tag = payload["properties"]["delivery_tag"]
            try:
                self.connection._deliver(payload, queue)
            finally:
                self._recorded_tag = None
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the atomic fetch of `Channel`."""

    Channel = Channel


def install() -> None:
    """Make the `redis`, `rediss` and `redis+socket` broker URLs use this transport."""
    for alias in ("redis", "rediss"):  # redis+socket:// resolves through "redis"
        kombu_transport.TRANSPORT_ALIASES[alias] = "app.broker:Transport"
        # kombu caches the class an alias resolved to; forget one resolved before this ran.
        kombu_transport._transport_cache.pop(alias, None)
