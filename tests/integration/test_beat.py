"""One scheduler fires each tick, however many beats run, and a restart repeats none."""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis

from app.settings import redis_client_url
from tests.integration.conftest import Services, celery_process, flush_broker, isolated_broker

INTERVAL = 1.0  # QUEUE_DEPTH_INTERVAL for these beats: the queue-depth entry fires every second


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
