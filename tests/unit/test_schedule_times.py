"""`jobs-service schedule` shows the time a beat entry runs next, to the second."""

from __future__ import annotations

import datetime as dt

from celery.schedules import crontab

from app.operations import next_run_time

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_the_daily_report_after_beat_ran_it_is_due_at_00_05_00_tomorrow() -> None:
    now = at("2026-03-01T12:00:00.900")
    daily = crontab(minute=5, hour=0, nowfun=lambda: now)

    shown = next_run_time(daily, at("2026-03-01T00:05:00.370"), lambda: now)

    assert shown == at("2026-03-02T00:05:00")


def test_the_daily_report_never_run_is_due_at_00_05_00_not_00_04_59() -> None:
    now = at("2026-03-01T00:00:00.600")
    daily = crontab(minute=5, hour=0, nowfun=lambda: now)

    assert next_run_time(daily, None, lambda: now) == at("2026-03-01T00:05:00")
