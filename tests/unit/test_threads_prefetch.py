"""The threads pool's prefetch multiplier (app.threads.prefetch_multiplier): THREADS_PREFETCH
unless the worker was given another multiplier than the configured one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app import threads
from app.settings import load_settings


def worker(given: int, configured: int = 1) -> SimpleNamespace:
    conf = SimpleNamespace(worker_prefetch_multiplier=configured)
    return SimpleNamespace(app=SimpleNamespace(conf=conf), prefetch_multiplier=given)


@pytest.fixture
def threads_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings({"THREADS_PREFETCH": "3"})
    monkeypatch.setattr(threads, "get_settings", lambda: settings)


def test_two_messages_a_thread_by_default() -> None:
    assert threads.prefetch_multiplier(worker(1)) == load_settings({}).threads_prefetch == 2


@pytest.mark.usefixtures("threads_prefetch")
def test_threads_prefetch_sets_it_when_the_worker_has_the_configured_multiplier() -> None:
    assert threads.prefetch_multiplier(worker(1)) == 3


@pytest.mark.usefixtures("threads_prefetch")
def test_a_multiplier_given_to_the_worker_wins() -> None:
    assert threads.prefetch_multiplier(worker(5)) == 5
    assert threads.prefetch_multiplier(worker(0)) == 0  # Celery's "no limit"
    assert threads.prefetch_multiplier(worker(4, configured=4)) == 3


def test_the_hold_window_grows_from_threads_prefetch_to_four_a_thread() -> None:
    assert threads.hold_window(worker(1), 8, 2) == (8, 2, 4, 0.02)
    assert threads.hold_window(worker(1), 8, 1) == (8, 1, 4, 0.02)


def test_no_hold_window_when_off_given_or_already_the_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert threads.hold_window(worker(4), 8, 4) is None  # --prefetch-multiplier 4: as given
    assert threads.hold_window(worker(1), 8, 4) is None  # THREADS_PREFETCH=4: the most already
    settings = load_settings({"THREADS_HOLD_AHEAD": "0"})
    monkeypatch.setattr(threads, "get_settings", lambda: settings)
    assert threads.hold_window(worker(1), 8, 2) is None


def test_no_hold_window_on_rabbitmq(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings({"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})
    monkeypatch.setattr(threads, "get_settings", lambda: settings)
    assert threads.hold_window(worker(1), 8, 2) is None
