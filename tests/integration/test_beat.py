"""One scheduler fires each tick, however many beats run; a restart repeats none; a beat waiting
for the lock takes over soon after the holder dies."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import redis

from app import celery
from app.settings import redis_client_url
from tests.integration.conftest import Services, celery_process, flush_broker, isolated_broker

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

INTERVAL = 1.0  # QUEUE_DEPTH_INTERVAL for these beats: the queue-depth entry fires every second
LOCK_TIMEOUT = 30  # celeryconfig.redbeat_lock_timeout: a dead holder's lock expires this late
LOOP_INTERVAL = 5  # celeryconfig.beat_max_loop_interval: a waiting beat tries the lock this often


class TickWatcher:
    """Watches the `urgent` queue of a broker no worker consumes; notes when each tick lands."""

    def __init__(self, broker: str) -> None:
        url = redis_client_url(broker)
        assert url is not None
        self.client = redis.Redis.from_url(url)
        self.arrivals: list[float] = []

    def watch(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            now, depth = time.monotonic(), int(self.client.llen("urgent"))
            self.arrivals.extend([now] * (depth - len(self.arrivals)))
            time.sleep(0.02)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    def senders(self) -> list[int]:
        """The process id of the beat that sent each tick, in arrival order (the `origin`
        header Celery stamps on a message, `gen<pid>@<host>`)."""
        newest_first = self.client.lrange("urgent", 0, -1)  # kombu LPUSHes each message
        origins = [json.loads(raw)["headers"]["origin"] for raw in reversed(newest_first)]
        return [int(origin.removeprefix("gen").split("@")[0]) for origin in origins]


def beat_env(services: Services, broker: str) -> dict[str, str]:
    return {
        **os.environ,
        "BROKER_URL": broker,
        "DATABASE_URL": services.database_url,
        "QUEUE_DEPTH_INTERVAL": str(INTERVAL),
    }


def started(watcher: TickWatcher, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not watcher.arrivals:
        assert time.monotonic() < deadline, "no beat sent anything"
        watcher.watch(0.2)


def test_two_beats_send_each_tick_once(services: Services, tmp_path: Path) -> None:
    broker = isolated_broker(services.broker_url, 12)
    flush_broker(broker)
    watcher = TickWatcher(broker)
    env = beat_env(services, broker)

    with (
        celery_process(["beat", "--loglevel", "INFO"], env, tmp_path / "beat-a.log"),
        celery_process(["beat", "--loglevel", "INFO"], env, tmp_path / "beat-b.log"),
    ):
        started(watcher)
        first = len(watcher.arrivals)
        watcher.watch(10.0)

    ticks = len(watcher.arrivals) - first
    # One scheduler: about one tick a second (two unlocked beats would send about twenty).
    assert 8 <= ticks <= 12, watcher.arrivals
    assert min(watcher.gaps()) > INTERVAL / 2, watcher.gaps()
    logs = (tmp_path / "beat-a.log").read_text() + (tmp_path / "beat-b.log").read_text()
    assert logs.count("beat: Acquired lock") == 1


def test_a_restarted_beat_resumes_without_repeating_a_tick(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 12)
    flush_broker(broker)
    watcher = TickWatcher(broker)
    env = beat_env(services, broker)

    with celery_process(["beat", "--loglevel", "INFO"], env, tmp_path / "beat-1.log"):
        started(watcher)
        watcher.watch(4.0)
    watcher.watch(0.5)  # count what the beat sent up to its exit
    before = len(watcher.arrivals)
    watcher.watch(3.0)  # no beat runs: ticks fall due and wait
    assert len(watcher.arrivals) == before
    restarted_at = time.monotonic()
    with celery_process(["beat", "--loglevel", "INFO"], env, tmp_path / "beat-2.log"):
        watcher.watch(6.0)

    after = watcher.arrivals[before:]
    # The tick that fell due while no beat ran goes out once, promptly; then one a second.
    assert after and after[0] - restarted_at < 10
    assert 4 <= len(after) <= 8, after
    assert min(watcher.gaps()) > INTERVAL / 2, watcher.gaps()


@pytest.mark.heavy
def test_a_waiting_beat_takes_over_when_the_holder_is_killed(
    services: Services, tmp_path: Path
) -> None:
    # The holder renews its lock at every wake-up, a waiting beat tries it every loop interval.
    # (An unknown setting name is silently ignored: check Celery and RedBeat read these.)
    assert celery.conf.redbeat_lock_timeout == LOCK_TIMEOUT
    assert celery.conf.beat_max_loop_interval == LOOP_INTERVAL
    broker = isolated_broker(services.broker_url, 1)
    flush_broker(broker)
    watcher = TickWatcher(broker)
    env = beat_env(services, broker)
    log_a, log_b = tmp_path / "beat-a.log", tmp_path / "beat-b.log"

    with celery_process(["beat", "--loglevel", "INFO"], env, log_a) as beat_a:
        started(watcher)
        with celery_process(["beat", "--loglevel", "INFO"], env, log_b) as beat_b:
            deadline = time.monotonic() + 30
            while "beat: Starting..." not in log_b.read_text():  # then B blocks on the lock
                assert time.monotonic() < deadline, log_b.read_text()
                watcher.watch(0.2)
            watcher.watch(3.0)  # both run: A sends, B waits
            assert "beat: Acquired lock" not in log_b.read_text()

            beat_a.kill()  # SIGKILL: A cannot release its lock, the lock has to expire
            killed_at = time.monotonic()
            deadline = killed_at + LOCK_TIMEOUT + 10
            while beat_b.pid not in watcher.senders():
                assert time.monotonic() < deadline, f"no tick from B {LOCK_TIMEOUT + 10} s on"
                watcher.watch(0.2)
            watcher.watch(3.0)  # B goes on at the interval
            senders = watcher.senders()[: len(watcher.arrivals)]

    took_over = watcher.arrivals[senders.index(beat_b.pid)] - killed_at
    print(f"beat B sent its first tick {took_over:.1f} s after beat A was SIGKILLed")
    # A renewed its lock every second, so it expired 29-30 s after the kill, and B tries the
    # lock every 5 s: B waited for the lock to expire, then took it within one try.
    assert LOCK_TIMEOUT - LOOP_INTERVAL < took_over <= LOCK_TIMEOUT + LOOP_INTERVAL + 2
    # One sender at a time: A's ticks, then B's, never interleaved.
    a_ticks = senders.count(beat_a.pid)
    assert a_ticks >= 3, senders
    assert senders == [beat_a.pid] * a_ticks + [beat_b.pid] * (len(senders) - a_ticks), senders
    # No tick twice: the one that fell due while no beat sent goes out once, then one a second.
    assert min(watcher.gaps()) > INTERVAL / 2, watcher.gaps()
    assert 3 <= len(senders) - a_ticks <= 6, senders
    assert log_b.read_text().count("beat: Acquired lock") == 1
