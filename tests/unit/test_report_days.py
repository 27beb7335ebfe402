"""The daily report's day is the local day of APP_TIMEZONE, DST included."""

from __future__ import annotations

import datetime as dt

from app.services.reports import day_bounds, yesterday


def test_yesterday_is_taken_in_the_configured_zone() -> None:
    # 23:30 UTC on 1 March is already 2 March in Tokyo, still 1 March in New York.
    now = dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.UTC)
    assert yesterday("Asia/Tokyo", now) == dt.date(2026, 3, 1)
    assert yesterday("America/New_York", now) == dt.date(2026, 2, 28)
    assert yesterday("UTC", now) == dt.date(2026, 2, 28)


def test_a_local_day_runs_midnight_to_midnight_even_across_a_dst_change() -> None:
    start, end = day_bounds(dt.date(2026, 3, 29), "Europe/Berlin")  # clocks go forward

    assert start.astimezone(dt.UTC) == dt.datetime(2026, 3, 28, 23, 0, tzinfo=dt.UTC)
    assert end.astimezone(dt.UTC) == dt.datetime(2026, 3, 29, 22, 0, tzinfo=dt.UTC)
    assert end - start == dt.timedelta(hours=24)  # aware arithmetic in one zone: wall clock
    assert end.astimezone(dt.UTC) - start.astimezone(dt.UTC) == dt.timedelta(hours=23)
