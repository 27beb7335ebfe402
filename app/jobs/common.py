"""Policies and argument checks several jobs share."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from sqlalchemy.exc import InterfaceError, OperationalError

from app.jobs.policies import RetryOn

#: The database went away or refused a connection: wait and try again, longer each time, on
#: ActiveJob's `:polynomially_longer` schedule for 25 attempts (about three weeks in all, as
#: Sidekiq's default retry); each wait is in Redis's scheduled set, not in a worker.
DATABASE_UNAVAILABLE = RetryOn(OperationalError, InterfaceError, wait="polynomial", attempts=25)


def nonzero(value: Any) -> str | None:
    """A check: the value is not zero."""
    return None if value != 0 else "must not be zero"


def within(low: int, high: int) -> Any:
    """A check: the value lies in [low, high] (absurd numbers are refused, not stored)."""

    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}, got {value}"

    return check


def iso_date(value: Any) -> str | None:
    """A check: the value is a date as YYYY-MM-DD."""
    try:
        dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        return f"must be a date as YYYY-MM-DD, got {value!r}"
    return None


def one_of(kind: str, choices: tuple[str, ...]) -> Any:
    """A check: the value is one of `choices` (`kind` names them in the message)."""

    def check(value: Any) -> str | None:
        if value in choices:
            return None
        return f"must be {kind} (one of {', '.join(choices)}), got {value!r}"

    return check


def key_text(value: Any) -> str | None:
    """A check: an idempotency key of 1 to 200 characters."""
    return None if 0 < len(value) <= 200 else "must be 1 to 200 characters"


IsoDate = Annotated[str, iso_date]
IdempotencyKey = Annotated[str, key_text]
