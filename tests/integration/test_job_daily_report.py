"""jobs.daily_report: the local day's figures, stored once per date, emailed once."""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal

from celery.worker import WorkController
from sqlalchemy import func, select, update

from app.db import session_scope
from app.devservers.smtp import SmtpServer
from app.jobs import daily_report
from app.models import Order, Report, User
from tests.integration.conftest import run_at_once
from tests.integration.factories import make_order, make_product, make_user, scalar

DAY = dt.date(2026, 3, 14)


def placed_at(order_id: int, moment: dt.datetime, *, total: str, status: str) -> None:
    with session_scope() as session:
        session.execute(
            update(Order)
            .where(Order.id == order_id)
            .values(
                created_at=moment,
                total=Decimal(total),
                status=status,
                processed_at=moment if status == "processed" else None,
            )
        )


def test_the_report_sums_the_days_orders_and_new_users(
    worker: WorkController, smtp: SmtpServer
) -> None:
    user, product = make_user(), make_product()
    noon = dt.datetime.combine(DAY, dt.time(12), tzinfo=dt.UTC)
    for total, status, moment in [
        ("10.00", "processed", noon),
        ("5.50", "processed", noon),
        ("99.00", "pending", noon),
        ("7.00", "processed", noon + dt.timedelta(days=1)),
    ]:
        placed_at(make_order(user, [(product, 1, "1")]), moment, total=total, status=status)
    with session_scope() as session:
        session.execute(update(User).values(created_at=noon))

    data = daily_report.delay(DAY.isoformat()).get(timeout=30)

    assert data == {
        "date": "2026-03-14",
        "timezone": "UTC",
        "orders": 3,
        "revenue": "15.50",
        "new_users": 1,
    }
    [mail] = smtp.wait_for_messages(1, timeout=30)
    assert mail.message["Subject"] == "Daily report for 2026-03-14"
    assert "ops@example.com" in mail.message["To"]


def test_concurrent_runs_store_one_report_and_none_fails(smtp: SmtpServer) -> None:
    results = run_at_once(lambda: daily_report.perform_now(DAY.isoformat()), copies=4)

    assert all(isinstance(r, dict) for r in results), results
    assert scalar(select(func.count()).select_from(Report)) == 1
    smtp.wait_for_messages(1, timeout=30)  # the worker sends it, after the report's commit
    time.sleep(1)  # room for a second one, which must not come
    assert len(smtp.messages) == 1


def test_without_a_date_it_reports_yesterday() -> None:
    data = daily_report.perform_now()
    assert data["date"] == (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()


def test_a_date_that_is_not_one_is_discarded() -> None:
    assert daily_report.apply(("yesterday",)).result is None
    assert scalar(select(func.count()).select_from(Report)) == 0
