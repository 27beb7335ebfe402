"""Each worker process's heartbeat, and the recovery of what dead workers held.

A process that fetches from a Redis (see `app.delivery.transport`) runs one `Heartbeat` thread
for it. Every `interval` seconds the thread:

- writes the process's heartbeat, in Redis's clock, with the queues it consumes;
- reads the paused queues (the fetch script checks them too; the channel uses this copy to
  choose where to wait when idle);
- puts back what workers whose heartbeat is `timeout` seconds old held, at the head of the
  queues it came from, in one script (`scripts.RECOVER`): the script forgets each dead worker
  as it restores its messages, so each message is put back once however many workers recover;
- writes messages taken out of circulation to the dead-letter store (`app.delivery.rejected`).

A thread, not the worker's event loop, so that a long job, a blocked loop or a busy solo pool
never makes a live worker look dead. After losing Redis (a restart, a network cut) a process
recovers nobody until it has beaten for `timeout` seconds again, so that every other live
worker has had the time to beat again too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import redis

from app.delivery import flow, scheduled, scripts
from app.delivery.records import Keys, paused

if TYPE_CHECKING:
    from app.delivery.transport import Channel

#: Seconds between two heartbeats of a worker process.
DEFAULT_INTERVAL = 1.0
#: Seconds without a heartbeat after which a worker's messages are put back.
DEFAULT_TIMEOUT = 5.0
#: Dead workers recovered by one script call (the next call takes the rest).
RECOVER_BATCH = 20
#: How long a message's death count outlives its last death (deleted on acknowledgement).
DEATHS_TTL = 14 * 24 * 3600
#: Seconds between sweeps for concurrency slots whose holder vanished (and after every recovery).
REAP_EVERY = 10.0

logger = logging.getLogger(__name__)


def rejected_header(queue: str, tag: str, reason: str) -> str:
    """The header line of an entry of the rejected list (see app.delivery.scripts)."""
    return json.dumps({"queue": queue, "tag": tag, "reason": reason[:2000]})


class Heartbeat:
    """One process's heartbeats, recovery and dead-letter drain for one Redis.

    Each consuming channel is a worker of its own in the records (`Channel.worker`): a channel
    that closes without putting back what it held (its connection was lost mid-fetch) stops
    beating, and its messages are recovered like a dead process's, here or elsewhere.
    """

    def __init__(
        self,
        pool: redis.ConnectionPool,
        keys: Keys,
        unacked: tuple[str, str],
        interval: float,
        timeout: float,
        drain_rejected: bool = False,
        poll_interval: float = scheduled.POLL_INTERVAL,
    ) -> None:
        self.client = redis.Redis(connection_pool=pool)
        self.keys = keys
        self.unacked = unacked  # kombu's unacked hash and its index
        self.interval = interval
        self.timeout = timeout
        #: Write rejected messages to the service's dead-letter store (its workers only: a
        #: foreign app sharing the transport has no such database).
        self.drain_rejected = drain_rejected
        self.paused: frozenset[str] = frozenset()
        self._channels: weakref.WeakSet[Channel] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delivery heartbeat", daemon=True)
        self._beat_script = self.client.register_script(scripts.HEARTBEAT)
        self._recover_script = self.client.register_script(scripts.RECOVER)
        self._registered: set[str] = set()
        self._healthy_since: float | None = None
        self._reaped = 0.0
        self._failing = False
        #: Moves due jobs from the scheduled set into their queues (a thread of its own, so
        #: that its pace does not follow the heartbeat's).
        self.poller: scheduled.Poller | None = scheduled.Poller(self.client, keys, poll_interval)

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive() and not self._stop.is_set()

    def attach(self, channel: Channel) -> None:
        """Beat for `channel` (registered at once, before it fetches)."""
        with self._lock:
            self._channels.add(channel)
        with contextlib.suppress(redis.RedisError):  # the thread retries
            self._beat_for(channel)

    def release(self, channel: Channel) -> None:
        """`channel` closed: stop beating for it, and forget it if it holds nothing."""
        with self._lock:
            self._channels.discard(channel)
            self._registered.discard(channel.worker)
            idle = not self._channels
        with contextlib.suppress(redis.RedisError):
            self.client.eval(
                scripts.RETIRE,
                3,
                self.keys.workers,
                self.keys.held(channel.worker),
                self.keys.worker_info + channel.worker,
                channel.worker,
            )
        if idle:
            self.stop()

    def wake(self) -> None:
        """Run a round now (a message was rejected: write it to the dead-letter store)."""
        self._wake.set()

    def start(self) -> None:
        """Keep beating in the thread, and polling the scheduled set in another."""
        self._thread.start()
        if self.poller is not None:
            self.poller.start()

    def stop(self) -> None:
        """Stop the threads."""
        self._stop.set()
        self._wake.set()
        if self.poller is not None:
            self.poller.stop()

    def beat(self) -> None:
        """Write every attached channel's heartbeat and read the paused queues."""
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            self._beat_for(channel)
        self.paused = frozenset(paused(self.client, self.keys.prefix))

    def _beat_for(self, channel: Channel) -> None:
        worker = channel.worker
        queues: dict[str, None] = {}
        for queue in channel.active_queues:
            queues[queue] = None
            queues.update(dict.fromkeys(channel.queue_aliases.get(queue, ())))
        info = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": list(queues),
                "concurrency": concurrency,
            }
        )
        added = self._beat_script(
            keys=[self.keys.workers, self.keys.worker_info + worker],
            args=[worker, info, int(self.timeout * 4) + 1],
        )
        if added and worker in self._registered:
            logger.error(
                "worker %s found itself declared dead (no heartbeat for %g s): what it held was "
                "put back in its queues and may run twice",
                worker,
                self.timeout,
            )
        self._registered.add(worker)

    def recover(self) -> list[tuple[str, int]]:
        """Put back what dead workers held; return (worker, messages put back) for each."""
        keys = self.keys
        reply = self._recover_script(
            keys=[keys.workers, keys.inflight, *self.unacked],
            args=[self.timeout, keys.held(""), keys.worker_info, RECOVER_BATCH, DEATHS_TTL],
        )
        recovered = [
            (bytes(reply[i]).decode(), int(reply[i + 1])) for i in range(0, len(reply or []), 2)
        ]
        for worker, count in recovered:
            if count:
                logger.warning(
                    "recovered %d message(s) held by worker %s, whose heartbeat stopped; they "
                    "are back at the head of their queues",
                    count,
                    worker,
                    extra={"event": "recovered", "dead_worker": worker, "recovered": count},
                )
                _count_recovered(count)
        return recovered

    def round(self) -> None:
        """One heartbeat round: beat, recover (once healthy long enough), drain rejections."""
        self.beat()
        now = time.monotonic()
        if self._healthy_since is None:
            self._healthy_since = now
        if now - self._healthy_since >= self.timeout:
            recovered = self.recover()
            if recovered or now - self._reaped >= REAP_EVERY:
                self._reaped = now
                freed = flow.reap(self.client, self.keys, self.timeout)
                if freed:
                    logger.warning(
                        "took back %d concurrency slot(s) whose holder died or ran past the "
                        "limit's duration",
                        freed,
                        extra={"event": "slots_reaped", "freed": freed},
                    )
        if not self.drain_rejected:
            return
        from app.delivery import rejected

        rejected.drain(self.client, self.keys, f"{socket.gethostname()}.{os.getpid()}")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
                if self._failing:
                    logger.warning("the delivery heartbeat reaches Redis again")
                self._failing = False
            except Exception as exc:
                self._healthy_since = None
                if not self._failing:
                    logger.warning("the delivery heartbeat failed: %s; retrying", exc)
                self._failing = True
            self._wake.wait(self.interval)
            self._wake.clear()


def _count_recovered(count: int) -> None:
    try:
        from app.jobs.instrumentation import metrics

        metrics().incr("delivery.recovered", count)
    except Exception:  # metrics never stop recovery
        logger.debug("could not count recovered messages", exc_info=True)


_agents: dict[tuple[Any, ...], Heartbeat] = {}
_agents_lock = threading.Lock()


#: The worker's pool size, for the web view (set by `note_concurrency` when a worker starts).
concurrency: int | None = None


def note_concurrency(sender: Any = None, **_: Any) -> None:
    """Remember the starting worker's concurrency (connected to `worker_init`)."""
    global concurrency
    value = getattr(sender, "concurrency", None)
    concurrency = int(value) if isinstance(value, int) else None


def for_channel(channel: Channel) -> Heartbeat:
    """This process's heartbeat for the Redis of `channel`, started if need be."""
    params = dict(channel._connparams())
    # Every heartbeat command is a short script: a broker gone silent must not hang the thread,
    # nor a channel's close (which retires its worker through this pool).
    timeout = float(channel.heartbeat_timeout)
    params["socket_timeout"] = min(float(params.get("socket_timeout") or timeout), timeout)
    if "path" not in params:  # (a unix socket connection takes no connect timeout)
        connect = params.get("socket_connect_timeout") or timeout
        params["socket_connect_timeout"] = min(float(connect), timeout)
    key = (os.getpid(), channel.heartbeat_location(params), channel.keys.prefix)
    with _agents_lock:
        agent = _agents.get(key)
        if agent is None or not agent.alive:
            agent = Heartbeat(
                channel.heartbeat_pool(params),
                channel.keys,
                (
                    channel._prefixed(channel.unacked_key),
                    channel._prefixed(channel.unacked_index_key),
                ),
                float(channel.heartbeat_interval),
                float(channel.heartbeat_timeout),
                drain_rejected=bool(channel.drain_rejected),
                poll_interval=float(channel.poll_interval),
            )
            _agents[key] = agent
            agent.start()
    agent.attach(channel)
    return agent
