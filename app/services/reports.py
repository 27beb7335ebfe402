"""The daily report: the day's orders, revenue and new users, stored once per date."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.models import Order, Report, User

REPORT_TYPE = "daily"


@dataclass(frozen=True)
class DailyReport:
    """A stored daily report."""

    report_id: int
    date: dt.date
    data: dict[str, Any]
    created: bool  # False: it existed already (an earlier or concurrent run made it)


def yesterday(timezone: str, now: dt.datetime | None = None) -> dt.date:
    """The day before today, in `timezone`."""
    moment = now or dt.datetime.now(dt.UTC)
    return (moment.astimezone(ZoneInfo(timezone)) - dt.timedelta(days=1)).date()


def day_bounds(date: dt.date, timezone: str) -> tuple[dt.datetime, dt.datetime]:
    """The local day `date` in `timezone` as a half-open [start, end) of aware datetimes."""
    zone = ZoneInfo(timezone)
    start = dt.datetime.combine(date, dt.time.min, tzinfo=zone)
    end = dt.datetime.combine(date + dt.timedelta(days=1), dt.time.min, tzinfo=zone)
    return start, end  # DST days are 23 or 25 hours long; midnight to midnight still holds


def report_data(session: Session, date: dt.date, timezone: str) -> dict[str, Any]:
    """The day's figures, from SQL aggregates over the indexed created_at columns."""
    start, end = day_bounds(date, timezone)
    orders, revenue = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Order.status == "processed", Order.total))), 0),
        ).where(Order.created_at >= start, Order.created_at < end)
    ).one()
    new_users = session.scalar(
        select(func.count())
        .select_from(User)
        .where(User.created_at >= start, User.created_at < end)
    )
    return {
        "date": date.isoformat(),
        "timezone": timezone,
        "orders": int(orders),
        "revenue": str(Decimal(revenue).quantize(Decimal("0.01"))),
        "new_users": int(new_users or 0),
    }


def create_daily_report(session: Session, date: dt.date, timezone: str) -> DailyReport:
    """Store the day's report unless it exists; concurrent runs make one and neither fails.

    `INSERT ... ON CONFLICT DO NOTHING` on the unique (date, type): where the guide checks
    for an existing report and then inserts (a race), the constraint decides.
    """
    data = report_data(session, date, timezone)
    report_id = session.scalar(
        insert(Report)
        .values(date=date, report_type=REPORT_TYPE, data=data)
        .on_conflict_do_nothing(index_elements=["date", "type"])
        .returning(Report.id)
    )
    if report_id is not None:
        return DailyReport(report_id, date, data, created=True)
    existing = session.execute(
        select(Report.id, Report.data).where(Report.date == date, Report.report_type == REPORT_TYPE)
    ).one()
    return DailyReport(existing.id, date, existing.data, created=False)
