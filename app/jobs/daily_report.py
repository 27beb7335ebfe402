"""jobs.daily_report(date=None)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from app.db import session_scope
from app.jobs.base import job
from app.jobs.common import DATABASE_UNAVAILABLE, IsoDate
from app.jobs.send_email import send_email
from app.services import reports
from app.settings import get_settings


@job("jobs.daily_report", queue_as="low", retry_on=[DATABASE_UNAVAILABLE])
def daily_report(date: IsoDate | None = None) -> dict[str, Any]:
    """Store the report of `date` (yesterday in APP_TIMEZONE by default), then email it."""
    settings = get_settings()
    day = dt.date.fromisoformat(date) if date else reports.yesterday(settings.app_timezone)
    with session_scope() as session:
        report = reports.create_daily_report(session, day, settings.app_timezone)
        send_email.delay(
            None,
            "daily_report",
            idempotency_key=f"daily-report:{day.isoformat()}",
            context={**report.data, "to": list(settings.report_recipients)},
        )
    return report.data
